"""Configs of the drafter (``DrafterConfig``) and of training (``TrainConfig``), plus named presets.

A preset is a dict ``{"drafter": kwargs of build_drafter, "train": TrainConfig overrides}``.
Published hyperparameters (DeepSpec DFlash configs): block 7, 512 anchors, decay gamma 4.0,
5 draft layers, D2 on with prefix-length base 0.9.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

__all__ = [
    "DrafterConfig",
    "TrainConfig",
    "PRESETS",
    "get_preset",
    "default_target_layer_ids",
    "QWEN3_MASK_TOKEN_ID",
]

QWEN3_MASK_TOKEN_ID = 151669
DRAFTER_TYPES = ("qwen3", "gemma4")
DFLASH_LABELS = ("shifted", "same")


def default_target_layer_ids(num_target_layers: int, num_layers: int) -> list[int]:
    """Evenly spaced target layers from layer 1 to ``num_target_layers - 3`` (the DFlash default).

    For 36 target layers and 5 picks this is ``[1, 9, 17, 25, 33]``; for 40, ``[1, 10, 19, 28, 37]``.
    Small targets where that span is too short fall back to evenly spaced distinct layers.
    """
    n, k = int(num_target_layers), int(num_layers)
    if k < 1 or n < 1:
        raise ValueError(f"need num_target_layers >= 1 and num_layers >= 1, got {n} and {k}")
    if k == 1:
        return [n // 2]
    start, end = 1, n - 3
    ids = [int(round(start + i * (end - start) / (k - 1))) for i in range(k)]
    if all(a < b for a, b in zip(ids, ids[1:])) and ids[0] >= 0 and ids[-1] < n:
        return ids
    if k > n:
        raise ValueError(f"cannot pick {k} distinct layers from a {n}-layer target")
    # Short targets: spread over every layer, still distinct and increasing.
    return [int(round(i * (n - 1) / (k - 1))) for i in range(k)]


# ----------------------------------------------------------------------------- drafter


@dataclass
class DrafterConfig:
    """Everything that defines a drafter: its transformer dims, its link to the target, its training rule.

    ``hidden_size`` equals the target's hidden size (embed_tokens and lm_head are the target's).
    """

    model_type: str = "qwen3"  # "qwen3" | "gemma4": which decoder-layer family
    # transformer dims (copied from the target config by build_drafter)
    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 128
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 16
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_parameters: dict = field(default_factory=lambda: {"rope_type": "default", "rope_theta": 1_000_000.0})
    max_position_embeddings: int = 40960
    attention_bias: bool = False
    attn_scale: Optional[float] = None  # softmax scale; None = head_dim ** -0.5 (Gemma4: 1.0)
    embed_scale: float = 1.0  # input embeddings are multiplied by this (Gemma4: sqrt(hidden))
    final_logit_softcapping: Optional[float] = None  # Gemma-style c * tanh(logits / c)
    # link to the target
    num_target_layers: int = 4
    target_layer_ids: list = field(default_factory=lambda: [1, 2])
    # drafting / training rule
    num_draft_layers: int = 1
    block_size: int = 7
    mask_token_id: int = 0
    num_anchors: int = 512
    enable_d2_feature: bool = True
    d2_prefix_weight_base: float = 0.9
    loss_decay_gamma: Optional[float] = 4.0
    dflash_labels: str = "shifted"  # DFlash mode labels: "shifted" (DeepSpec) | "same" (z-lab/SpecForge)
    backend: str = "auto"  # d2kernels backend: "auto" | "torch" | "triton" | "cuda"

    @property
    def target_hidden_size(self) -> int:
        return self.hidden_size

    @property
    def num_target_features(self) -> int:
        """``L``: number of target layers concatenated in ``target_hidden [.., L*H]``."""
        return len(self.target_layer_ids)

    @property
    def same_position_labels(self) -> bool:
        """True when slot ``k`` predicts ``input_ids[anchor+k]`` (D2 mode or dflash_labels='same')."""
        return bool(self.enable_d2_feature) or self.dflash_labels == "same"

    def validate(self) -> "DrafterConfig":
        """Raise ``ValueError`` with a clear message on any inconsistent field; returns self."""
        if self.model_type not in DRAFTER_TYPES:
            raise ValueError(f"model_type must be one of {DRAFTER_TYPES}, got {self.model_type!r}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "num_target_layers", "num_draft_layers", "num_anchors"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if not isinstance(self.block_size, int) or isinstance(self.block_size, bool) or self.block_size < 1:
            raise ValueError(f"block_size must be an integer >= 1, got {self.block_size!r}")
        ids = list(self.target_layer_ids)
        if not ids:
            raise ValueError("target_layer_ids must not be empty")
        if any(not isinstance(i, int) or isinstance(i, bool) for i in ids):
            raise ValueError(f"target_layer_ids must be integers, got {ids}")
        if any(b <= a for a, b in zip(ids, ids[1:])):
            raise ValueError(f"target_layer_ids must be strictly increasing, got {ids}")
        if ids[0] < -1 or ids[-1] >= self.num_target_layers:
            raise ValueError(
                f"target_layer_ids must lie in [-1, {self.num_target_layers}) (-1 = embedding output, "
                f"l = output of target layer l of {self.num_target_layers}), got {ids}"
            )
        if not isinstance(self.mask_token_id, int) or not 0 <= self.mask_token_id < self.vocab_size:
            raise ValueError(f"mask_token_id={self.mask_token_id!r} must be a token id in [0, {self.vocab_size})")
        if not float(self.d2_prefix_weight_base) > 0:
            raise ValueError(f"d2_prefix_weight_base must be > 0, got {self.d2_prefix_weight_base}")
        g = self.loss_decay_gamma
        if g is not None and (isinstance(g, bool) or not isinstance(g, (int, float)) or g != g):
            raise ValueError(f"loss_decay_gamma must be a number (<= 0: no decay) or None, got {g!r}")
        if self.dflash_labels not in DFLASH_LABELS:
            raise ValueError(f"dflash_labels must be 'shifted' or 'same', got {self.dflash_labels!r}")
        if self.backend not in ("auto", "torch", "triton", "cuda"):
            raise ValueError(f"backend must be 'auto', 'torch', 'triton' or 'cuda', got {self.backend!r}")
        if self.final_logit_softcapping is not None and not self.final_logit_softcapping > 0:
            raise ValueError(f"final_logit_softcapping must be > 0 or None, got {self.final_logit_softcapping}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DrafterConfig":
        """Build from a dict, ignoring keys that are not fields (e.g. extra keys of a config.json)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: copy.deepcopy(v) for k, v in d.items() if k in names}
        if "target_layer_ids" in kwargs:
            kwargs["target_layer_ids"] = [int(i) for i in kwargs["target_layer_ids"]]
        return cls(**kwargs)


# ----------------------------------------------------------------------------- training
# Owned by the trainer (d2sd/train.py); kept in its own section so both sides can edit.
# Every field becomes a ``python -m d2sd.train`` option; the ``help`` metadata is its --help line.


@dataclass
class TrainConfig:
    """Optimization and bookkeeping knobs of ``python -m d2sd.train``."""

    lr: float = field(default=6e-4, metadata={"help": "peak AdamW learning rate"})
    min_lr_ratio: float = field(default=0.0, metadata={"help": "final lr as a fraction of --lr"})
    warmup_ratio: float = field(default=0.04, metadata={"help": "fraction of max_steps spent in linear warmup"})
    schedule: str = field(
        default="cosine",
        metadata={"help": "decay after warmup", "choices": ("cosine", "linear", "constant")},
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (matrices only)"})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2"})
    adam_eps: float = field(default=1e-8, metadata={"help": "AdamW epsilon"})
    max_steps: int = field(default=1000, metadata={"help": "optimizer steps to train"})
    global_batch_size: int = field(
        default=16, metadata={"help": "sequences per optimizer step, over all ranks (gradient accumulation fills it)"}
    )
    micro_batch_size: int = field(default=1, metadata={"help": "sequences per forward pass per rank"})
    max_length: int = field(default=4096, metadata={"help": "truncate tokenized sequences to this many tokens"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the global gradient norm to this (<= 0: off)"})
    skip_nonfinite: int = field(
        default=0,
        metadata={"help": "skip up to N steps whose loss or gradient is NaN/inf (no optimizer step), then stop "
                          "(0: stop at the first)"},
    )
    seed: int = field(default=0, metadata={"help": "seed of data order, anchors, prefixes and init"})
    save_every: int = field(default=500, metadata={"help": "checkpoint every N steps (<= 0: only at the end)"})
    keep_last: int = field(default=2, metadata={"help": "keep the newest K checkpoints"})
    log_every: int = field(default=10, metadata={"help": "log metrics every N steps"})
    max_new_tokens: int = field(
        default=64, metadata={"help": "response length when the target regenerates the built-in prompts"}
    )


# ----------------------------------------------------------------------------- presets

def _published(target_layer_ids: list[int], **extra) -> dict:
    """The published DFlash/D2 recipe (DeepSpec configs): block 7, 512 anchors, gamma 4, 5 layers, D2 on."""
    drafter = dict(
        num_draft_layers=5, target_layer_ids=target_layer_ids, block_size=7, num_anchors=512,
        loss_decay_gamma=4.0, enable_d2_feature=True, d2_prefix_weight_base=0.9, **extra,
    )
    return {"drafter": drafter, "train": dict(max_length=4096)}


PRESETS: dict[str, dict] = {
    # A drafter for the shipped tiny Qwen3 target: CPU-fast, for smoke tests and examples.
    "tiny": {
        "drafter": dict(
            num_draft_layers=2, block_size=4, num_anchors=16, loss_decay_gamma=4.0,
            enable_d2_feature=True, d2_prefix_weight_base=0.9,
        ),
        # The embedded `python -m d2sd.train` demo: ~25 s on 2 idle CPU cores, loss falls ~15x.
        "train": dict(lr=2e-3, max_steps=300, global_batch_size=8, micro_batch_size=8, max_length=256,
                      save_every=150, log_every=10, warmup_ratio=0.05, max_new_tokens=48),
    },
    "qwen3-4b": _published([1, 9, 17, 25, 33], mask_token_id=QWEN3_MASK_TOKEN_ID),
    "qwen3-8b": _published([1, 9, 17, 25, 33], mask_token_id=QWEN3_MASK_TOKEN_ID),
    "qwen3-14b": _published([1, 10, 19, 28, 37], mask_token_id=QWEN3_MASK_TOKEN_ID),
    # Gemma4's mask id comes from the target config/tokenizer (build_drafter's default), not a constant.
    "gemma4-12b": _published([5, 17, 29, 41, 46]),
}


def get_preset(name: str) -> dict:
    """A deep copy of preset ``name`` (``{"drafter": {...}, "train": {...}}``)."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return copy.deepcopy(PRESETS[name])
