"""Drafters as ``transformers.PreTrainedModel``: ``D2SDDrafterModel`` and its ``D2SDDrafterConfig``.

A thin face over a ``Drafter``: the drafter's own modules are registered on it directly (same
objects, same state-dict names, so ``state_dict()`` is DeepSpec's layout), ``forward`` /
``draft_logits`` are the drafter's, and the checkpoint conventions are transformers':

    model = D2SDDrafterModel.from_pretrained("org/qwen3-8b-vp")          # a folder or a Hub id
    model.save_pretrained("out")                                          # DeepSpec's format
    model.save_pretrained("out-dflash", format="dflash")                 # vLLM / SGLang / SpecForge
    model.push_to_hub("org/qwen3-8b-vp")                                  # the same files, uploaded
    model.drafter                                                         # the d2sd Drafter

The files are the drafter formats of ``d2sd.models.checkpoint`` (DeepSpec's ``Qwen3DSparkModel``
config, or ``DFlashDraftModel``), not a config of this class, so DeepSpec, vLLM and SGLang read
them with their own classes; ``D2SDDrafterConfig`` carries the ``DrafterConfig`` in memory.
"""
from __future__ import annotations

from typing import Optional

from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from ..config import DrafterConfig
from .base import Drafter
from .checkpoint import load_drafter
from .families import drafter_class

__all__ = ["D2SDDrafterConfig", "D2SDDrafterModel"]


class D2SDDrafterConfig(PretrainedConfig):
    """A ``PretrainedConfig`` holding a ``DrafterConfig`` (as the dict ``drafter``)."""

    model_type = "d2sd_drafter"

    def __init__(self, drafter: Optional[dict] = None, **kwargs):
        self.drafter = dict(drafter) if drafter is not None else DrafterConfig().to_dict()
        super().__init__(**kwargs)

    @property
    def drafter_config(self) -> DrafterConfig:
        return DrafterConfig.from_dict(self.drafter).validate()


class D2SDDrafterModel(PreTrainedModel):
    """A DFlash / D2SD drafter with the transformers model API (see the module docstring)."""

    config_class = D2SDDrafterConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    _no_split_modules = []

    def __init__(self, config: D2SDDrafterConfig, drafter: Optional[Drafter] = None):
        super().__init__(config)
        if drafter is None:
            cfg = config.drafter_config
            drafter = drafter_class(cfg.model_type)(cfg)
        # Not a child module: its children are ours, so the state dict has no "drafter." prefix.
        self.__dict__["drafter"] = drafter
        for name, child in drafter.named_children():
            self.add_module(name, child)

    @classmethod
    def from_drafter(cls, drafter: Drafter) -> "D2SDDrafterModel":
        """Wrap an existing drafter (shares its modules and weights)."""
        return cls(D2SDDrafterConfig(drafter=drafter.config.to_dict()), drafter=drafter)

    def _init_weights(self, module: nn.Module) -> None:
        """The drafter initialized its weights (and copies embed/lm_head from the target)."""

    def forward(self, *args, **kwargs):
        """``Drafter.forward``: ``(input_ids, target_hidden, loss_mask, ...)`` -> ``DrafterOutput``."""
        return self.drafter(*args, **kwargs)

    def draft_logits(self, *args, **kwargs):
        return self.drafter.draft_logits(*args, **kwargs)

    def init_from_target(self, target_model: nn.Module) -> "D2SDDrafterModel":
        self.drafter.init_from_target(target_model)
        return self

    def get_input_embeddings(self) -> nn.Module:
        return self.drafter.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.drafter.lm_head

    def save_pretrained(self, save_directory: str, format: str = "deepspec", push_to_hub: bool = False,
                        **kwargs) -> None:
        """Write the drafter folder (``format``: "deepspec" or "dflash"); transformers' other keywords
        (``max_shard_size``, ``safe_serialization``...) are accepted and ignored: one safetensors file."""
        self.drafter.save_pretrained(save_directory, format=format)
        if push_to_hub:
            self.push_to_hub(kwargs.get("repo_id") or save_directory, token=kwargs.get("token"))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, *args, target: Optional[nn.Module] = None,
                        device=None, dtype=None, backend: Optional[str] = None, revision: Optional[str] = None,
                        **kwargs) -> "D2SDDrafterModel":
        """Load a drafter folder or Hub id (``org/name``; ``revision``), either format: see ``load_drafter``
        (``target`` is needed for a dflash folder). ``torch_dtype`` is accepted for ``dtype``."""
        dtype = dtype if dtype is not None else kwargs.pop("torch_dtype", None)
        path = f"{pretrained_model_name_or_path}@{revision}" if revision else pretrained_model_name_or_path
        return cls.from_drafter(load_drafter(path, target=target, device=device, dtype=dtype, backend=backend))
