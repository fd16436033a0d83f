"""d2kernels: fused kernels for training DFlash / D2SD (variable-prefix) drafters.

Public API (semantics: docs/semantics.md): ``layout`` helpers, ``varprefix_attention``, ``noise_embedding``,
``decayed_cross_entropy``; their ``nn.Module`` faces in ``d2kernels.modules`` (``NoiseEmbedding``,
``VarPrefixAttention``, ``DecayedCrossEntropy``). Imports neither ``transformers`` nor ``d2sd``.
"""
from . import layout, modules
from ._checks import set_validation, validation
from .attention import VarPrefixLayout, varprefix_attention, varprefix_layout
from .cross_entropy import decayed_cross_entropy
from .embedding import noise_embedding
from .layout import (
    decay_weights,
    draft_positions,
    draft_targets,
    draft_token_ids,
    sample_anchors,
    sample_prefix_lengths,
)
from .modules import DecayedCrossEntropy, NoiseEmbedding, VarPrefixAttention

__version__ = "0.1.0"

__all__ = [
    "layout",
    "varprefix_attention",
    "varprefix_layout",
    "VarPrefixLayout",
    "noise_embedding",
    "decayed_cross_entropy",
    "modules",
    "NoiseEmbedding",
    "VarPrefixAttention",
    "DecayedCrossEntropy",
    "sample_anchors",
    "sample_prefix_lengths",
    "draft_token_ids",
    "draft_positions",
    "draft_targets",
    "decay_weights",
    "set_validation",
    "validation",
]
