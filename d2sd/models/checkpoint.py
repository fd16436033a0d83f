"""Drafter checkpoints in two formats.

``deepspec`` (DeepSpec's own ``Qwen3DSparkModel`` / ``Gemma4DSparkModel`` checkpoint): ``config.json``
is the target's text config with ``architectures: ["Qwen3DSparkModel"]`` (or Gemma4's),
``num_hidden_layers`` = the draft layers, ``num_target_layers``, ``block_size``, ``mask_token_id``,
``target_layer_ids``, ``num_anchors``, ``enable_confidence_head: false``, ``markov_rank: 0``,
``tie_word_embeddings: false``, ``layer_types``; our training rule rides along where DeepSpec's
loader ignores it (``enable_d2_feature``, ``d2_prefix_weight_base`` at the top, the rest under
``d2sd``). ``model.safetensors`` holds every weight under the state-dict names of docs/semantics.md, embed_tokens and lm_head
included (Gemma4 adds DeepSpec's ``layers.{i}.layer_scalar`` buffers, all 1). Folders written by
older d2sd versions (``architectures: ["D2SDDrafter"]``, flat DrafterConfig fields) still load.

``dflash`` (z-lab / SpecForge ``DFlashDraftModel``): ``config.json`` = the drafter's Qwen3 config +
``block_size``, ``num_target_layers``, ``dflash_config: {target_layer_ids, mask_token_id}``;
``model.safetensors`` holds ``layers.*``, ``fc``, ``hidden_norm``, ``norm`` only: embed_tokens and
lm_head come from the target at load time. That model predicts the token at the slot's own
position, so only same-position drafters (D2 / VP drafters, or ``dflash_labels='same'``) export to it.
"""
from __future__ import annotations

import json
import os
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..config import DrafterConfig
from ..target import resolve_model
from .families import drafter_class, drafter_config_from_target, qwen3_config_of, text_config

if TYPE_CHECKING:
    from .base import Drafter

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# architectures of deepspec-format folders written by d2sd before it wrote DeepSpec's own config (still read)
DEEPSPEC_ARCH = "D2SDDrafter"

WEIGHTS_INDEX_NAME = "model.safetensors.index.json"

__all__ = [
    "save_drafter", "load_drafter", "detect_format", "FORMATS", "check_dflash_exportable", "drafter_json",
    "read_weights", "weight_files", "shard_name", "vp_untrained_slots", "readable_by_all", "deepspec_config_of",
    "drafter_state_dict",
]

FORMATS = ("deepspec", "dflash")
DFLASH_ARCH = "DFlashDraftModel"
DEEPSPEC_ARCHS = {"qwen3": "Qwen3DSparkModel", "gemma4": "Gemma4DSparkModel"}
TARGET_PARTS = ("embed_tokens.weight", "lm_head.weight")
# Fields a dflash config.json cannot express; kept under this key so a round trip is lossless.
D2SD_EXTRA_KEY = "d2sd"
D2SD_EXTRA_FIELDS = (
    "num_anchors", "enable_d2_feature", "d2_prefix_weight_base", "loss_decay_gamma", "dflash_labels", "backend",
)
# What a DeepSpec config.json cannot express (it has no training rule beyond anchors, and the family
# fixes the scales); enable_d2_feature / d2_prefix_weight_base sit at its top level (DeepSpec PR #2).
DEEPSPEC_EXTRA_FIELDS = (
    "loss_decay_gamma", "dflash_labels", "backend", "attn_scale", "embed_scale", "final_logit_softcapping",
)
# Gemma4DSparkDecoderLayer's persistent scalar buffer (always 1: nothing trains it).
LAYER_SCALAR = "layers.{}.layer_scalar"


def check_dflash_exportable(cfg: DrafterConfig) -> None:
    """Raise ``ValueError`` explaining why ``cfg`` cannot be written as a z-lab DFlashDraftModel."""
    if cfg.model_type != "qwen3":
        raise ValueError(
            f"the dflash (z-lab/SpecForge DFlashDraftModel) format is a Qwen3 drafter; this drafter is "
            f"{cfg.model_type!r}. Use format='deepspec'."
        )
    if not cfg.same_position_labels:
        raise ValueError(
            "refusing to export a shifted-label DFlash drafter (dflash_labels='shifted', D2 off) to the "
            "dflash format: DFlashDraftModel's slot k predicts the token AT position anchor+k, while this "
            "drafter was trained to predict anchor+k+1, so every proposal would be off by one. Export it "
            "with format='deepspec', or train with dflash_labels='same' (or D2 on) for z-lab/SpecForge."
        )


def vp_untrained_slots(cfg: DrafterConfig) -> list[int]:
    """Draft slots a D2 (VP) drafter never learned to fill: 1 .. p_min-1, always visible in training."""
    if not cfg.enable_d2_feature:
        return []
    return list(range(1, min(2, cfg.block_size - 1)))


def _state_dict_cpu(drafter: Drafter) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in drafter.state_dict().items()}


def drafter_json(cfg: DrafterConfig, dtype: torch.dtype, format: str = "deepspec") -> dict:
    """The ``config.json`` body of a drafter of config ``cfg`` whose trainable weights are ``dtype``."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if format == "deepspec":
        return deepspec_config_of(cfg, dtype)
    check_dflash_exportable(cfg)
    config = qwen3_config_of(cfg).to_dict()
    config.update(
        architectures=[DFLASH_ARCH],
        block_size=cfg.block_size,
        num_target_layers=cfg.num_target_layers,
        dflash_config={"target_layer_ids": list(cfg.target_layer_ids), "mask_token_id": cfg.mask_token_id},
        dtype=str(dtype).replace("torch.", ""),
    )
    config[D2SD_EXTRA_KEY] = {k: getattr(cfg, k) for k in D2SD_EXTRA_FIELDS}
    untrained = vp_untrained_slots(cfg)
    if untrained:
        # A plain DFlash reader ignores the d2sd block: say it where a person reading the config looks.
        config.update(d2sd_trained_as="vp", d2sd_untrained_slots=untrained)
    return config


def save_drafter(drafter: Drafter, save_directory: str, format: str = "deepspec") -> None:
    config = drafter_json(drafter.config, drafter.fc.weight.dtype, format)
    sd = _state_dict_cpu(drafter)
    if format == "deepspec" and drafter.config.model_type == "gemma4":
        dtype = drafter.fc.weight.dtype
        sd.update({LAYER_SCALAR.format(i): torch.ones(1, dtype=dtype) for i in range(drafter.config.num_draft_layers)})
    if format == "dflash":
        for k in TARGET_PARTS:
            sd.pop(k)
    os.makedirs(save_directory, exist_ok=True)
    write_json(config, os.path.join(save_directory, CONFIG_NAME))
    save_file(sd, os.path.join(save_directory, WEIGHTS_NAME), metadata={"format": "pt", "d2sd_format": format})
    readable_by_all(os.path.join(save_directory, WEIGHTS_NAME))


_UMASK = os.umask(0)
os.umask(_UMASK)  # read once at import: umask() is process-wide, so never toggled while threads write files


def readable_by_all(path) -> None:
    """Mode 0666 & ~umask, as a plain open() gives: safetensors creates its files 0600, and a
    checkpoint is meant to be shared like any other file."""
    os.chmod(path, 0o666 & ~_UMASK)


def shard_name(i: int, n: int) -> str:
    """Hugging Face's shard file name ``model-0000i-of-0000n.safetensors`` (i from 1)."""
    return f"model-{i:05d}-of-{n:05d}.safetensors"


def weight_files(path: str) -> list[str]:
    """The safetensors files of a drafter folder: ``model.safetensors``, or the shards its index names."""
    single = os.path.join(path, WEIGHTS_NAME)
    if os.path.isfile(single):
        return [single]
    index = os.path.join(path, WEIGHTS_INDEX_NAME)
    if not os.path.isfile(index):
        return []
    try:
        weight_map = read_json(index)["weight_map"]
        names = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{index}: not a safetensors index ({e})") from None
    files = [os.path.join(path, n) for n in names]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise ValueError(f"{index} names shard(s) that are missing: {missing}")
    return files


def read_weights(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of a drafter folder (single file or sharded), on the CPU."""
    sd: dict[str, torch.Tensor] = {}
    for f in weight_files(path):
        try:
            sd.update(load_file(f))
        except Exception as e:  # safetensors' SafetensorError has no narrower public base
            if type(e).__name__ != "SafetensorError" and not isinstance(e, OSError):
                raise
            raise ValueError(f"cannot read {f} (damaged or truncated file?): {e}") from None
    return sd


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def deepspec_config_of(cfg: DrafterConfig, dtype: torch.dtype = torch.float32) -> dict:
    """The ``config.json`` DeepSpec's ``Qwen3DSparkModel`` / ``Gemma4DSparkModel`` would write for ``cfg``."""
    n = cfg.num_draft_layers
    if cfg.model_type == "qwen3":
        config = qwen3_config_of(cfg).to_dict()
    else:
        # Gemma4's text config; the draft layers have the target's global-layer geometry.
        config = dict(
            model_type="gemma4_text", vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size, num_attention_heads=cfg.num_attention_heads,
            num_key_value_heads=cfg.num_key_value_heads, num_global_key_value_heads=cfg.num_key_value_heads,
            head_dim=cfg.head_dim, global_head_dim=cfg.head_dim, attention_k_eq_v=False,
            hidden_activation=cfg.hidden_act, rms_norm_eps=cfg.rms_norm_eps,
            rope_parameters={"full_attention": dict(cfg.rope_parameters), "sliding_attention": dict(cfg.rope_parameters)},
            max_position_embeddings=cfg.max_position_embeddings, attention_bias=cfg.attention_bias,
            attention_dropout=0.0, final_logit_softcapping=cfg.final_logit_softcapping, initializer_range=0.02,
            enable_moe_block=False, hidden_size_per_layer_input=0, num_kv_shared_layers=0, use_double_wide_mlp=False,
        )
    config.update(
        architectures=[DEEPSPEC_ARCHS[cfg.model_type]],
        num_hidden_layers=n,
        num_target_layers=cfg.num_target_layers,
        block_size=cfg.block_size,
        tie_word_embeddings=False,
        layer_types=["full_attention"] * n,
        mask_token_id=cfg.mask_token_id,
        target_layer_ids=list(cfg.target_layer_ids),
        num_anchors=cfg.num_anchors,
        enable_confidence_head=False,
        markov_rank=0,
        enable_d2_feature=bool(cfg.enable_d2_feature),
        d2_prefix_weight_base=float(cfg.d2_prefix_weight_base),
        dtype=_dtype_name(dtype),
    )
    config[D2SD_EXTRA_KEY] = {k: getattr(cfg, k) for k in DEEPSPEC_EXTRA_FIELDS}
    return config


def detect_format(config: dict) -> Optional[str]:
    """``"deepspec"``, ``"dflash"`` or None for a parsed config.json."""
    arch = config.get("architectures") or []
    if DFLASH_ARCH in arch or "dflash_config" in config:
        return "dflash"
    if set(arch) & {DEEPSPEC_ARCH, *DEEPSPEC_ARCHS.values()}:
        return "deepspec"
    if all(k in config for k in ("block_size", "target_layer_ids", "mask_token_id")):
        return "deepspec"
    return None


def _gemma4_geometry(config: dict) -> tuple[int, int]:
    """``(head_dim, kv_heads)`` of a DeepSpec Gemma4 drafter: its layers use the global-layer geometry,
    stored flat (``global_head_dim``...) or, by newer transformers, under ``per_layer_config``."""
    per_layer = config.get("per_layer_config") or {}
    first = per_layer.get("0") or per_layer.get(0) or {}
    head_dim = config.get("global_head_dim") or first.get("head_dim") or config["head_dim"]
    kv = config.get("num_key_value_heads")
    if config.get("attention_k_eq_v"):
        kv = config.get("num_global_key_value_heads") or first.get("num_key_value_heads") or kv
    return int(head_dim), int(kv)


def _config_from_deepspec(config: dict) -> DrafterConfig:
    """DrafterConfig of a DeepSpec DSpark ``config.json`` (``num_hidden_layers`` = the draft layers)."""
    if DEEPSPEC_ARCH in (config.get("architectures") or []) and "num_draft_layers" in config:
        return DrafterConfig.from_dict(config).validate()  # written by d2sd before it wrote DeepSpec's format
    need = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "block_size", "target_layer_ids",
            "mask_token_id")
    missing = [k for k in need if k not in config]
    if missing:
        raise ValueError(f"DeepSpec drafter config.json lacks {missing}")
    heads = [h for h, on in (("a Markov head", int(config.get("markov_rank") or 0) > 0),
                             ("a confidence head", bool(config.get("enable_confidence_head")))) if on]
    if heads:
        raise ValueError(
            f"this DSpark drafter has {' and '.join(heads)}; d2sd trains and runs plain DFlash / VP drafters "
            "(markov_rank 0, no confidence head), so loading it would silently drop part of the model"
        )
    ids = [int(i) for i in config["target_layer_ids"]]
    tc = dict(config, num_hidden_layers=int(config.get("num_target_layers") or max(ids) + 1), layer_types=[])
    if str(config.get("model_type", "")).startswith("gemma4") or "Gemma4DSparkModel" in (config.get("architectures") or []):
        tc["model_type"] = "gemma4"
        tc["head_dim"], tc["num_key_value_heads"] = _gemma4_geometry(config)
        tc.update(global_head_dim=None, per_layer_config=None)
    extra = {k: v for k, v in (config.get(D2SD_EXTRA_KEY) or {}).items() if k in DEEPSPEC_EXTRA_FIELDS}
    return drafter_config_from_target(
        SimpleNamespace(**tc),
        num_draft_layers=int(config["num_hidden_layers"]),
        target_layer_ids=ids,
        block_size=int(config["block_size"]),
        mask_token_id=int(config["mask_token_id"]),
        num_anchors=int(config.get("num_anchors", 512)),
        # DeepSpec's DSpark drafters are shifted-label DFlash drafters unless its D2 fields say otherwise.
        enable_d2_feature=bool(config.get("enable_d2_feature", False)),
        d2_prefix_weight_base=float(config.get("d2_prefix_weight_base", 0.9)),
        **extra,
    )


def drafter_state_dict(sd: dict[str, torch.Tensor], cfg: DrafterConfig, path: str = "model.safetensors") -> dict[str, torch.Tensor]:
    """DeepSpec weights -> ours: drop Gemma4's layer scalars (must be 1); a ``attention_k_eq_v`` layer
    (no v_proj: v is k_proj's output) gets v_proj = k_proj, the same function."""
    for i in range(cfg.num_draft_layers):
        s = sd.pop(LAYER_SCALAR.format(i), None)
        if s is not None and not torch.all(s == 1):
            raise ValueError(f"{path}: {LAYER_SCALAR.format(i)} = {s.tolist()}; d2sd's Gemma4 drafter has no layer scale")
        k, v = f"layers.{i}.self_attn.k_proj.weight", f"layers.{i}.self_attn.v_proj.weight"
        if cfg.model_type == "gemma4" and k in sd and v not in sd:
            sd[v] = sd[k].clone()
    return sd


def _config_from_dflash(config: dict) -> DrafterConfig:
    dc = config.get("dflash_config") or {}
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "block_size") if k not in config]
    missing += [f"dflash_config.{k}" for k in ("target_layer_ids", "mask_token_id") if k not in dc]
    if missing:
        raise ValueError(f"dflash config.json lacks {missing}")
    H, Hq = config["hidden_size"], config["num_attention_heads"]
    ids = [int(i) for i in dc["target_layer_ids"]]
    rope = config.get("rope_parameters") or {"rope_type": "default", "rope_theta": config.get("rope_theta", 1e6)}
    extra = config.get(D2SD_EXTRA_KEY) or {}
    fields = dict(
        model_type="qwen3",
        vocab_size=config["vocab_size"],
        hidden_size=H,
        intermediate_size=config["intermediate_size"],
        num_attention_heads=Hq,
        num_key_value_heads=config.get("num_key_value_heads") or Hq,
        head_dim=config.get("head_dim") or H // Hq,
        hidden_act=config.get("hidden_act", "silu"),
        rms_norm_eps=config.get("rms_norm_eps", 1e-6),
        rope_parameters=dict(rope),
        max_position_embeddings=config.get("max_position_embeddings", 40960),
        attention_bias=bool(config.get("attention_bias", False)),
        num_target_layers=config.get("num_target_layers") or (max(ids) + 1),
        target_layer_ids=ids,
        num_draft_layers=config["num_hidden_layers"],
        block_size=config["block_size"],
        mask_token_id=int(dc["mask_token_id"]),
        # A z-lab DFlash drafter is a same-position DFlash drafter (p = 1, no D2).
        enable_d2_feature=False,
        dflash_labels="same",
    )
    fields.update({k: v for k, v in extra.items() if k in D2SD_EXTRA_FIELDS})
    return DrafterConfig(**fields).validate()


def _check_against_target(cfg: DrafterConfig, target: Any, path: str) -> None:
    tc = text_config(target)
    problems = []
    if getattr(tc, "hidden_size", cfg.hidden_size) != cfg.hidden_size:
        problems.append(f"hidden_size {cfg.hidden_size} != target's {tc.hidden_size}")
    if getattr(tc, "vocab_size", cfg.vocab_size) != cfg.vocab_size:
        problems.append(f"vocab_size {cfg.vocab_size} != target's {tc.vocab_size}")
    n = getattr(tc, "num_hidden_layers", None)
    if n is not None:
        if max(cfg.target_layer_ids) >= n:
            problems.append(f"target_layer_ids {cfg.target_layer_ids} reach past the target's {n} layers")
        elif cfg.num_target_layers != n:
            problems.append(f"num_target_layers {cfg.num_target_layers} != target's {n}")
    if problems:
        raise ValueError(f"drafter at {path} does not fit this target: " + "; ".join(problems))


def load_drafter(
    path: str,
    target: Optional[nn.Module] = None,
    *,
    device: Optional[torch.device | str] = None,
    dtype: Optional[torch.dtype] = None,
    backend: Optional[str] = None,
) -> Drafter:
    """Load a drafter folder of either format (``config.json`` + ``model.safetensors``).

    ``target`` (a transformers model): checked for fit (hidden size, vocab, layer ids); required for
    the dflash format, whose embed_tokens / lm_head are copied from it. ``dtype`` defaults to the
    saved weights' dtype; ``backend`` overrides the saved d2kernels backend.
    """
    path = resolve_model(path)  # a local folder or a Hub id (local Hub cache when offline)
    cfg_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"drafter checkpoint folder {path!r} does not exist")
    if not os.path.isfile(cfg_path) or not weight_files(path):
        raise ValueError(
            f"{path!r} is not a drafter checkpoint: expected {CONFIG_NAME} and {WEIGHTS_NAME} (or "
            f"{WEIGHTS_INDEX_NAME} and its shards), found {sorted(os.listdir(path))}"
        )
    w_path = ", ".join(weight_files(path))
    config = read_json(cfg_path)
    fmt = detect_format(config)
    if fmt is None:
        raise ValueError(
            f"{cfg_path} is neither a d2sd/DeepSpec drafter (architectures {sorted(DEEPSPEC_ARCHS.values())} with "
            f"block_size, target_layer_ids, mask_token_id) nor a z-lab/SpecForge DFlash drafter (architectures "
            f"['{DFLASH_ARCH}'] with dflash_config); got architectures={config.get('architectures')}"
        )
    cfg = _config_from_deepspec(config) if fmt == "deepspec" else _config_from_dflash(config)
    if backend is not None:
        cfg.backend = backend
    if fmt == "dflash" and target is None:
        raise ValueError(
            f"{path!r} is a z-lab/SpecForge DFlash checkpoint without embed_tokens/lm_head: pass the target "
            "model, load_drafter(path, target=model), to copy them from it"
        )
    if target is not None:
        _check_against_target(cfg, target, path)
    sd = read_weights(path)
    if fmt == "deepspec":
        sd = drafter_state_dict(sd, cfg, w_path)
    # A training checkpoint holds fp32 trainable weights beside bf16 frozen ones: the trainable ones decide.
    floats = [t.dtype for k, t in sd.items() if t.is_floating_point() and k not in TARGET_PARTS]
    dtype = dtype or (floats[0] if floats else torch.float32)
    drafter = drafter_class(cfg.model_type)(cfg).to(dtype)
    expected = set(drafter.state_dict())
    missing = expected - set(sd)
    unexpected = set(sd) - expected
    allowed_missing = set(TARGET_PARTS) if fmt == "dflash" else set()
    if unexpected or missing - allowed_missing:
        raise ValueError(
            f"weights in {w_path} do not match the {fmt} drafter of its config.json: "
            f"missing {sorted(missing - allowed_missing)[:8]}, unexpected {sorted(unexpected)[:8]}"
        )
    for k, t in sd.items():
        want = drafter.state_dict()[k].shape
        if tuple(t.shape) != tuple(want):
            raise ValueError(f"{w_path}: {k} has shape {tuple(t.shape)}, the config implies {tuple(want)}")
    drafter.load_state_dict(sd, strict=False)
    if fmt == "dflash":
        drafter.init_from_target(target)
    drafter.freeze_target_parts()
    if device is not None:
        drafter = drafter.to(device)
    return drafter


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def write_json(obj: dict, path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
