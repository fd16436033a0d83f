"""``python -m d2sd.train``: train a DFlash / D2SD variable-prefix drafter.

With no arguments it runs the embedded demo: the shipped tiny Qwen3 target regenerates the
responses of the built-in prompts, its hidden states are extracted online, and a VP drafter
(preset ``tiny``, D2 on) trains on the CPU with the torch backend (about 30 s on 2 idle cores).

Real runs name a target and data::

    python -m d2sd.train --target /models/Qwen3-8B --data chats.jsonl --preset qwen3-8b
    python -m d2sd.train --target /models/Qwen3-8B --cache cache/ --preset qwen3-8b
    torchrun --nproc_per_node 8 -m d2sd.train --target ... --data ... --preset qwen3-8b [--fsdp]
    python -m d2sd.train --resume runs/qwen3-8b-20260101-120000
    python -m d2sd.train --preset qwen3-8b --target ... --print-config > run.yaml   # then: --config run.yaml

``main()`` is config -> data -> model -> loop; every knob has a ``--help`` line.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import queue
import random
import signal
import sys
import threading
import time
import typing
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import d2kernels

from . import checkpoint as ckpt
from . import data
from . import distributed as ddist
from .assets import tiny_target_path
from .cache import TargetCache
from .cli import UsageError, log
from .config import PRESETS, DrafterConfig, TrainConfig, get_preset
from .data import collate as pad_batch
from .data import has_anchor_run, tokenize_chat
from .models import build_drafter
from .models.checkpoint import TARGET_PARTS, drafter_json, drafter_state_dict, read_weights
from .runconfig import DRAFTER_KNOBS, dump_config, read_config
from .target import load_target, resolve_model, target_hidden_states
from .trackers import check_report_to, open_trackers, parse_report_to

__all__ = [
    "main", "train", "run_training", "TrainResult", "TrainingStopped", "build_parser", "resolve_run",
    "resolve_options", "Batcher", "forward_backward", "make_scheduler",
]

# Run options replayed on --resume (everything but where to resume from and the one-shot actions).
NOT_REPLAYED = {"resume", "config", "print_config"}


class NonFinite(RuntimeError):
    """A NaN / inf loss, gradient or weight: training stops before it reaches a checkpoint."""


# Exit status of a run stopped by a fault found while training (non-finite values, a failed save);
# 2 is bad input found before the first step.
EXIT_STOPPED = 3


# ============================================================================ config


def _field_type(cls, name: str):
    hints = typing.get_type_hints(cls)
    t = hints[name]
    args = [a for a in typing.get_args(t) if a is not type(None)]
    optional = len(args) < len(typing.get_args(t))
    if optional and len(args) == 1:
        t = args[0]
    return t, optional


def _parse_optional(conv):
    def parse(s: str):
        return None if s.lower() in ("none", "null") else conv(s)

    parse.__name__ = conv.__name__
    return parse


def _add_dataclass_options(group, cls, names: dict[str, str] | None = None) -> None:
    """One ``--kebab-name`` option per field of ``cls`` (or per ``names``), typed from the annotation."""
    defaults = {f.name: f for f in dataclasses.fields(cls)}
    for name in names or defaults:
        f = defaults[name]
        t, optional = _field_type(cls, name)
        if names:
            help_ = names[name] + " (default: the preset's, else derived from the target)"
        else:
            help_ = f.metadata.get("help", name.replace("_", " ")) + f" (default {f.default}; a preset may set it)"
        flag = "--" + name.replace("_", "-")
        origin = typing.get_origin(t) or t
        if t is bool:
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, help=help_)
        elif origin in (list, tuple):
            group.add_argument(flag, dest=name, type=int, nargs="+", metavar="N", help=help_)
        else:
            conv = _parse_optional(t) if optional else t
            group.add_argument(flag, dest=name, type=conv, choices=f.metadata.get("choices"), help=help_)


def build_parser() -> argparse.ArgumentParser:
    # SUPPRESS: only options given on the command line appear, so presets and a resumed run's
    # saved options can be layered under them.
    p = argparse.ArgumentParser(
        prog="python -m d2sd.train",
        description=__doc__.split("\n\n")[0],
        argument_default=argparse.SUPPRESS,
    )
    g = p.add_argument_group("run")
    g.add_argument("--target", help="target model dir, Hugging Face layout (default: the shipped tiny Qwen3)")
    g.add_argument("--data", help="chat JSONL file ({'messages': [...]} per line)")
    g.add_argument("--cache", help="DeepSpec-style offline target cache dir (written by python -m d2sd.cache)")
    g.add_argument("--preset", choices=sorted(PRESETS), help="named hyperparameters (default: tiny)")
    g.add_argument("--out", help="run dir (default: runs/<preset>-<time>)")
    g.add_argument("--resume", nargs="?", const="", metavar="DIR",
                   help="resume a run dir or one checkpoint (bare: the --out dir); exact continuation")
    g.add_argument("--device", help="cuda / cpu (default: cuda:LOCAL_RANK when available)")
    g.add_argument("--backend", choices=("auto", "triton", "torch", "cuda"),
                   help="d2kernels backend (auto: triton on CUDA, torch on CPU)")
    g.add_argument("--fsdp", action="store_true", help="shard the drafter with FSDP2 fully_shard instead of DDP")
    g.add_argument("--compile", dest="compile", action=argparse.BooleanOptionalAction,
                   help="torch.compile the drafter's decoder layers (default: on for CUDA, off on CPU)")
    g.add_argument("--profile-steps", type=int, metavar="N",
                   help="profile N steps after the first 3 (torch.profiler): top kernels and the device's "
                        "busy share go to RUN_DIR/profile.txt")
    g.add_argument("--d2", dest="enable_d2_feature", action=argparse.BooleanOptionalAction,
                   help="D2 (variable-prefix) training; --no-d2 = plain DFlash")
    g.add_argument("--dflash-labels", dest="dflash_labels", choices=("shifted", "same"),
                   help="DFlash-mode labels: shifted (DeepSpec, slot k predicts token a+k+1) or same")
    g.add_argument("--config", metavar="FILE",
                   help="YAML or JSON file of options (keys: option names, e.g. lr, target_layer_ids, d2); "
                        "layered over the preset, under a resumed run's options and the command line")
    g.add_argument("--print-config", action="store_true",
                   help="print the resolved options as a --config file (YAML) and exit")
    g.add_argument("--report-to", dest="report_to", metavar="LIST",
                   help="trackers besides metrics.jsonl: tensorboard, wandb, both comma-separated, or none "
                        "(default tensorboard when installed; WANDB_MODE=offline works without a network)")
    _add_dataclass_options(p.add_argument_group("training (TrainConfig)"), TrainConfig)
    _add_dataclass_options(p.add_argument_group("drafter (DrafterConfig)"), DrafterConfig, DRAFTER_KNOBS)
    return p


@dataclass
class Run:
    """Everything resolved before training: options, configs, paths."""

    opts: dict[str, Any]  # the options as given (replayed on --resume)
    preset: str
    train: TrainConfig
    drafter_args: dict[str, Any]
    target: Optional[str]
    data: Optional[str]
    cache: Optional[str]
    out: Path
    device: Optional[str]
    fsdp: bool
    compile: Optional[bool] = None  # None: on for CUDA
    resume_from: Optional[Path] = None
    resume_state: Optional[dict] = None
    print_config: bool = False

    @property
    def embedded(self) -> bool:
        return self.data is None and self.cache is None


def resolve_run(argv: Optional[list[str]] = None) -> Run:
    """Layer TrainConfig defaults < preset < --config file < resumed run's options < command line."""
    parser = build_parser()
    return _resolve(vars(parser.parse_args(argv)), parser)


def resolve_options(options: dict[str, Any]) -> Run:
    """``resolve_run`` for keyword options (the options' ``dest`` names, e.g. ``max_steps=``,
    ``enable_d2_feature=`` for ``--d2``), as ``train()`` takes them."""
    parser = build_parser()
    known = {a.dest for a in parser._actions if a.dest != "help"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise UsageError(f"unknown training option(s) {unknown}; see python -m d2sd.train --help (use the "
                         "options' names with underscores, e.g. max_steps=)")
    return _resolve(dict(options), parser)


def _resolve(cli: dict[str, Any], parser: argparse.ArgumentParser) -> Run:
    given = dict(cli)
    if "config" in given:
        try:
            given = {**read_config(given["config"], parser, NOT_REPLAYED), **given}
        except ValueError as e:
            raise UsageError(str(e)) from None
    resume_from, state = None, None
    if "resume" in given:
        where = given["resume"] or given.get("out")
        if not where:
            raise UsageError("bare --resume needs --out DIR (or pass the run dir: --resume DIR)")
        resume_from = ckpt.resolve_resume(Path(where), log=log)
        state = ckpt.load_trainer_state(resume_from)
        if not isinstance(state.get("run_opts"), dict):
            raise ckpt.CorruptCheckpoint(f"{resume_from}: its trainer state holds no run options")
        opts = {**given, **state["run_opts"], **cli}  # the command line alone wins over the resumed options
        opts = {k: v for k, v in opts.items() if k not in NOT_REPLAYED}
        if "out" not in given:
            opts["out"] = str(resume_from.parent.parent)
    else:
        opts = {k: v for k, v in given.items() if k not in NOT_REPLAYED}
    if "report_to" in opts:
        try:
            check_report_to(opts["report_to"])
        except (ValueError, ImportError) as e:
            raise UsageError(str(e)) from None
    for k in ("target", "data", "cache"):
        # Absolute, so that --resume works from any working directory (a Hub id stays an id).
        if k in given and given[k] and (k != "target" or os.path.exists(os.path.expanduser(given[k]))):
            opts[k] = os.path.abspath(os.path.expanduser(given[k]))
    preset_name = opts.get("preset", "tiny")
    preset = get_preset(preset_name)
    train_names = {f.name for f in dataclasses.fields(TrainConfig)}
    train = TrainConfig(**{**preset.get("train", {}), **{k: opts[k] for k in train_names if k in opts}})
    drafter_names = set(DRAFTER_KNOBS) | {"enable_d2_feature", "dflash_labels", "backend"}
    drafter_args = {**preset.get("drafter", {}), **{k: opts[k] for k in drafter_names if k in opts}}
    if "backend" not in drafter_args:
        drafter_args["backend"] = "auto"
    _check_train_config(train)
    out = Path(opts["out"]) if "out" in opts else Path("runs") / f"{preset_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if not given.get("print_config"):  # a printed config names a run dir only when one was given
        opts.setdefault("out", str(out))
    _check_run_options(opts, train, drafter_args, out)
    if state is not None:
        _check_resume_changes(state, opts, train, drafter_args, drafter_names)
    if resume_from is None and ckpt.list_checkpoints(out / "checkpoints"):
        raise UsageError(f"{out} already holds checkpoints: continue it with --resume {out}, or pick another --out")
    return Run(
        opts=opts, preset=preset_name, train=train, drafter_args=drafter_args,
        target=opts.get("target"), data=opts.get("data"), cache=opts.get("cache"), out=out,
        device=opts.get("device"), fsdp=bool(opts.get("fsdp", False)), compile=opts.get("compile"),
        resume_from=resume_from, resume_state=state, print_config=bool(given.get("print_config")),
    )


def _check_train_config(t: TrainConfig) -> None:
    problems = []
    for name in ("max_steps", "global_batch_size", "micro_batch_size", "max_length", "log_every", "max_new_tokens"):
        if getattr(t, name) < 1:
            problems.append(f"{name} must be >= 1, got {getattr(t, name)}")
    if t.skip_nonfinite < 0:
        problems.append(f"skip_nonfinite must be >= 0, got {t.skip_nonfinite}")
    if not 0 <= t.warmup_ratio < 1:
        problems.append(f"warmup_ratio must be in [0, 1), got {t.warmup_ratio}")
    if t.schedule not in ("cosine", "linear", "constant"):
        problems.append(f"schedule must be cosine, linear or constant, got {t.schedule!r}")
    # AdamW's step is about lr per weight: above 1 it only diverges (and inf / nan never train).
    if not 0 < t.lr <= 1:
        problems.append(f"lr must be in (0, 1], got {t.lr}")
    if not 0 <= t.min_lr_ratio <= 1:
        problems.append(f"min_lr_ratio must be in [0, 1], got {t.min_lr_ratio}")
    if not (0 <= t.weight_decay and math.isfinite(t.weight_decay)):
        problems.append(f"weight_decay must be a finite number >= 0, got {t.weight_decay}")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(t, name) < 1:
            problems.append(f"{name} must be in [0, 1), got {getattr(t, name)}")
    if not (0 < t.adam_eps and math.isfinite(t.adam_eps)):
        problems.append(f"adam_eps must be a finite number > 0, got {t.adam_eps}")
    if math.isnan(t.grad_clip):
        problems.append("grad_clip must be a number (<= 0: no clipping), got nan")
    if problems:
        raise UsageError("bad training config: " + "; ".join(problems))


def _check_run_options(opts: dict, t: TrainConfig, drafter_args: dict, out: Path) -> None:
    """Options that would fail late (device, backend, block, anchors, --out) are refused before any work."""
    B = drafter_args.get("block_size")
    if B is not None and B < 2:
        raise UsageError(f"--block-size must be >= 2 (a block of {B} holds only the anchor: nothing to draft), got {B}")
    N = drafter_args.get("num_anchors")
    if N is not None and not 1 <= N < t.max_length:
        raise UsageError(f"--num-anchors must be in [1, --max-length {t.max_length}) (a sequence of L tokens has at "
                         f"most L-1 anchor positions), got {N}")
    name = opts.get("device")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name is not None:
        try:
            device = torch.device(name)
        except RuntimeError:
            raise UsageError(f"--device {name}: not a device name (use cpu, cuda or cuda:N)") from None
        if device.type not in ("cpu", "cuda"):
            raise UsageError(f"--device {name}: only cpu and cuda devices are supported")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"--device {name}: no CUDA GPU is visible to torch (torch.cuda.is_available() is False)")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    backend = drafter_args.get("backend", "auto")
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if device.type != "cuda" and (backend == "cuda" or (backend == "triton" and not interpreted)):
        raise UsageError(f"--backend {backend} needs a CUDA device, the run is on {device} "
                         f"(use --backend auto or torch{'' if backend == 'cuda' else ', or TRITON_INTERPRET=1'})")
    problem = ckpt.output_path_problem(out)
    if problem:
        raise UsageError(f"--out {out}: {problem}")


# Options a resumed run cannot change: they define the model, the data or the data order.
FIXED_ON_RESUME = ("preset", "data", "cache", "seed", "global_batch_size", "max_length", "max_new_tokens")


def _check_resume_changes(state: dict, opts: dict, t: TrainConfig, drafter_args: dict, drafter_names) -> None:
    """Refuse changes a checkpoint cannot follow; report the ones applied (lr, schedule, steps, ...)."""
    saved_opts, saved_train = state["run_opts"], state.get("train_config") or {}
    saved_drafter = state.get("drafter_config") or {}
    now_train = dataclasses.asdict(t)
    refused = []
    for k in FIXED_ON_RESUME:
        old = saved_train[k] if k in saved_train else saved_opts.get(k, "tiny" if k == "preset" else None)
        new = now_train[k] if k in now_train else opts.get(k, "tiny" if k == "preset" else None)
        if old != new:
            refused.append((k, old, new))
    for k in sorted(drafter_names - {"backend"}):
        if k in saved_drafter and k not in drafter_args:
            drafter_args[k] = saved_drafter[k]  # the checkpoint's drafter, knob for knob
        elif k in saved_drafter and drafter_args[k] != saved_drafter[k]:
            refused.append((k, saved_drafter[k], drafter_args[k]))
    if refused:
        raise UsageError("--resume cannot change " + "; ".join(
            f"--{k.replace('_', '-')} (the checkpoint has {old}, now {new})" for k, old, new in refused
        ) + ": start a new run (another --out) for that")
    step = int(state["step"])
    if t.max_steps <= step:
        raise UsageError(f"--max-steps {t.max_steps} is not above the checkpoint's step {step}: nothing to train "
                         f"(pass a larger --max-steps to continue)")
    changed = [f"{k} {saved_train[k]} -> {v}" for k, v in now_train.items() if k in saved_train and saved_train[k] != v]
    if changed:
        log("resume applies the changed options: " + ", ".join(changed))


# ============================================================================ target + data


def load_target_model(run: Run, device: torch.device):
    """``(model, tokenizer)``: a frozen target, bf16 on GPU, fp32 on CPU; clear error when missing."""
    path = run.target
    if path is None:
        path = tiny_target_path()
    try:
        path = resolve_model(path)
    except FileNotFoundError as e:
        raise UsageError(f"target {e}") from None
    if not Path(path).exists():
        raise UsageError(f"target path {path} does not exist (pass a Hugging Face model dir or Hub id with --target)")
    # bf16 on GPU; with a cache the target is never run (only its embeddings are copied): bf16 too.
    dtype = torch.bfloat16 if device.type == "cuda" or run.cache else torch.float32
    try:
        model, tokenizer = load_target(path, device, dtype)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot load target {path}: {e}") from None
    model.eval().requires_grad_(False)
    return model, tokenizer


def _target_dims(model) -> tuple[int, int]:
    cfg = model.config
    cfg = getattr(cfg, "text_config", None) or cfg
    return int(cfg.hidden_size), int(cfg.num_hidden_layers)


def check_target_matches(run: Run, model) -> None:
    """The preset's target layers must exist in the target, and its hidden size must match."""
    H, n_layers = _target_dims(model)
    ids = list(run.drafter_args.get("target_layer_ids") or [])
    bad = [i for i in ids if not -1 <= int(i) < n_layers]
    where = run.target or "the tiny target"
    if bad:
        raise UsageError(
            f"preset {run.preset!r} uses target layers {ids}, but {where} has {n_layers} layers "
            f"(valid ids -1..{n_layers - 1}); pick the preset of this target or pass --target-layer-ids"
        )
    want = run.drafter_args.get("hidden_size")
    if want is not None and int(want) != H:
        raise UsageError(f"preset {run.preset!r} expects target hidden size {want}, {where} has {H}")
    if run.resume_state is not None:
        saved = run.resume_state["drafter_config"]
        if int(saved["hidden_size"]) != H or int(saved["num_target_layers"]) != n_layers:
            raise UsageError(
                f"the checkpoint's drafter was trained on a target with hidden {saved['hidden_size']} and "
                f"{saved['num_target_layers']} layers; {where} has hidden {H} and {n_layers} layers"
            )


def fill_mask_token(run: Run, tokenizer) -> None:
    """Without a preset / --mask-token-id, use the tokenizer's mask token (e.g. the tiny target's ``<|mask|>``)."""
    if "mask_token_id" in run.drafter_args:
        return
    mid = tokenizer.mask_token_id
    if mid is None:
        mid = tokenizer.get_vocab().get("<|mask|>")
    if mid is not None:
        run.drafter_args["mask_token_id"] = int(mid)
        log(f"mask token id {mid} (from the tokenizer)")


def load_examples(run: Run, target, tokenizer):
    """Training samples ``{input_ids, loss_mask[, target_hidden]}`` (a list, or a lazy cache view)."""
    t = run.train
    try:
        if run.cache is not None:
            return _cache_samples(run, target)
        if run.data is not None:
            if not Path(run.data).exists():
                raise UsageError(f"--data {run.data}: no such file")
            samples, stats = data.load_chat_data(run.data, tokenizer, t.max_length)
        else:
            log(f"the target regenerates {EMBEDDED_PROMPTS} built-in responses (max {t.max_new_tokens} new tokens)")
            records = data.default_corpus(EMBEDDED_PROMPTS, seed=t.seed, target=target, tokenizer=tokenizer,
                                          max_new_tokens=t.max_new_tokens)
            samples, stats = _tokenize_records(records, tokenizer, t.max_length)
    except ValueError as e:
        raise UsageError(str(e)) from None
    log("data: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in stats.items()))
    if stats.get("skipped_no_assistant"):
        log(f"skipped {stats['skipped_no_assistant']} record(s) with no assistant tokens")
    if stats.get("skipped_past_max_length"):
        log(f"skipped {stats['skipped_past_max_length']} record(s) whose assistant tokens all lie past "
            f"--max-length {t.max_length}")
    if stats.get("truncated"):
        log(f"truncated {stats['truncated']} record(s) to --max-length {t.max_length}")
    if not samples:
        raise UsageError("no training record has an assistant token to learn from")
    _check_learnable(run, [s["loss_mask"] for s in samples])
    return samples


def _anchor_run(run: Run) -> int:
    """Consecutive supervised tokens one block needs for a non-zero loss: the anchor + the first label
    (D2: + the visible prefix slot, p >= 2)."""
    B = int(run.drafter_args.get("block_size") or 2)
    return 3 if run.drafter_args.get("enable_d2_feature", True) and B >= 3 else 2


def _check_learnable(run: Run, loss_masks) -> None:
    need = _anchor_run(run)
    if not any(has_anchor_run(m, need) for m in loss_masks):
        raise UsageError(f"no training record has {need} consecutive assistant tokens (an anchor and a token to "
                         "predict): every loss would be 0, nothing to learn (are the assistant turns empty?)")


EMBEDDED_PROMPTS = 256


def _tokenize_records(records, tokenizer, max_length: int) -> tuple[list[dict], dict]:
    """In-memory chat records -> samples, with the same stats as ``data.load_chat_jsonl``."""
    samples, stats = [], {"records": len(records), "samples": 0, "skipped_no_assistant": 0,
                          "skipped_past_max_length": 0, "truncated": 0}
    for r in records:
        s = tokenize_chat(r, tokenizer, None)
        had_assistant = bool(s["loss_mask"].any())
        if len(s["input_ids"]) > max_length:
            stats["truncated"] += 1
            s = {k: v[:max_length] for k, v in s.items()}
        if int(s["loss_mask"].sum()) == 0:
            stats["skipped_past_max_length" if had_assistant else "skipped_no_assistant"] += 1
            continue
        samples.append(s)
    stats["samples"] = len(samples)
    return samples, stats


class _CacheSamples:
    """Lazy view of a TargetCache: samples cut to ``max_length``, read when a batch needs them."""

    def __init__(self, cache, max_length: int):
        self.cache, self.max_length = cache, max_length

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, i: int) -> dict:
        return self.cache.training_sample(i, self.max_length)

    def lengths(self) -> list[int]:
        return [min(self.cache.seq_len(i), self.max_length) for i in range(len(self.cache))]


def _cache_samples(run: Run, target) -> _CacheSamples:
    try:
        cache = TargetCache(run.cache)
    except FileNotFoundError as e:
        raise UsageError(f"--cache {run.cache}: {e}") from None
    want = list(run.drafter_args.get("target_layer_ids") or [])
    if not want:
        run.drafter_args["target_layer_ids"] = list(cache.target_layer_ids)
    elif list(cache.target_layer_ids) != want:
        raise UsageError(
            f"--cache {run.cache} holds target layers {cache.target_layer_ids}, the drafter wants {want} "
            f"(pass --target-layer-ids {' '.join(map(str, cache.target_layer_ids))} or rebuild the cache)"
        )
    H = _target_dims(target)[0]
    if cache.hidden_size != H:
        raise UsageError(f"--cache {run.cache} was made by a target with hidden size {cache.hidden_size}; "
                         f"this target has {H}")
    # Shards, index and token ids are checked now, not when a bad sample is drawn hours in.
    vocab = target.get_input_embeddings().weight.shape[0]
    need = _anchor_run(run)
    if not cache.validate(vocab, run.train.max_length, need):
        raise UsageError(f"--cache {run.cache}: no sample has {need} consecutive supervised tokens within "
                         f"--max-length {run.train.max_length}: nothing to learn")
    log(f"cache {run.cache}: {len(cache)} samples, layers {cache.target_layer_ids}, hidden {cache.hidden_size}")
    return _CacheSamples(cache, run.train.max_length)


# ============================================================================ batches


class Batcher:
    """Deterministic, resumable order over records: a fresh permutation per epoch (seed + epoch).

    A global batch is the next ``global_batch_size`` records; given ``lengths``, they are sorted by
    length, then cut into micro-batches of ``micro_batch_size``, and micro-batch ``i`` goes to rank
    ``i % world_size``. ``state_dict()`` is the data position.
    """

    def __init__(self, n: int, global_batch_size: int, micro_batch_size: int, world_size: int, rank: int, seed: int,
                 lengths: Optional[list[int]] = None):
        per = micro_batch_size * world_size
        if global_batch_size % per:
            raise UsageError(
                f"global_batch_size={global_batch_size} must be a multiple of "
                f"micro_batch_size*world_size = {micro_batch_size}*{world_size}"
            )
        self.n, self.gbs, self.mbs = n, global_batch_size, micro_batch_size
        self.world, self.rank, self.seed = world_size, rank, seed
        self.epoch, self.cursor = 0, 0
        self.lengths = lengths

    @property
    def accum_steps(self) -> int:
        return self.gbs // (self.mbs * self.world)

    def _order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def next(self) -> list[list[int]]:
        """Record indices of this rank's micro-batches of the next global batch."""
        picked = []
        while len(picked) < self.gbs:
            order = self._order(self.epoch)
            take = min(self.gbs - len(picked), self.n - self.cursor)
            picked += order[self.cursor:self.cursor + take]
            self.cursor += take
            if self.cursor == self.n:
                self.epoch, self.cursor = self.epoch + 1, 0
        if self.lengths is not None and self.mbs > 1:
            # Length buckets: micro-batches of similar lengths pad (and compute) little.
            picked.sort(key=lambda k: (self.lengths[k], k))
        micros = [picked[i:i + self.mbs] for i in range(0, self.gbs, self.mbs)]
        return [(i, m) for i, m in enumerate(micros) if i % self.world == self.rank]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "n": self.n}

    def load_state_dict(self, s: dict) -> None:
        if s["n"] != self.n:
            raise UsageError(f"the checkpoint was trained on {s['n']} records, this data has {self.n}")
        self.epoch, self.cursor = s["epoch"], s["cursor"]


def collate(samples: list[dict], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """``data.collate`` (right padding, loss_mask 0 on pads), moved to ``device``."""
    pin = device.type == "cuda"
    return {k: v.to(device, non_blocking=pin) for k, v in pad_batch(samples, pad_id, pin_memory=pin).items()}


def check_token_ids(batch: dict[str, torch.Tensor], vocab_size: int, where: str) -> None:
    """Token ids must lie in [0, vocab): checked on the host copy, so the GPU step needs no check (no sync)."""
    ids = batch["input_ids"]
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        bad = ids[(ids < 0) | (ids >= vocab_size)].unique()[:8].tolist()
        raise UsageError(f"{where}: token ids {bad} are outside the drafter's vocabulary [0, {vocab_size})")


class Prefetcher:
    """Prepares the next global batches on a background thread, so the GPU never waits on the data.

    The thread draws the record indices (``Batcher.next``), reads the records (a cache's features
    straight from the memory-mapped shards), pads them into page-locked memory and, on CUDA, starts
    their host->device copy on a side stream. ``next()`` hands the loop one global batch, already on
    the device, together with the batcher state *after* it: a checkpoint records what training
    consumed, not what was read ahead.
    """

    def __init__(self, batcher: "Batcher", examples, pad_id: int, device: torch.device, vocab_size: int,
                 depth: int = 2):
        self.batcher, self.examples, self.pad_id, self.device = batcher, examples, pad_id, device
        self.vocab_size = vocab_size
        self.cuda = device.type == "cuda"
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="d2sd-prefetch", daemon=True)
        self._thread.start()

    def _prepare(self):
        micros = []
        for i, idx in self.batcher.next():
            host = pad_batch([self.examples[k] for k in idx], self.pad_id, pin_memory=self.cuda)
            check_token_ids(host, self.vocab_size, f"records {idx}")
            micros.append((i, host))
        state = self.batcher.state_dict()
        if not self.cuda:
            return micros, state, None
        with torch.cuda.stream(self._stream):
            micros = [(i, {k: v.to(self.device, non_blocking=True) for k, v in b.items()}) for i, b in micros]
            done = torch.cuda.current_stream().record_event()
        return micros, state, done

    def _run(self) -> None:
        try:
            if self.cuda:
                torch.cuda.set_device(self.device)  # the current device is per thread
                self._stream = torch.cuda.Stream(self.device)
            while not self._stop.is_set():
                item = self._prepare()
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # handed to the training thread by next()
            self._queue.put(e)

    def next(self) -> tuple[list[tuple[int, dict]], dict]:
        """``(micro-batches on the device, batcher state after them)`` of the next global batch."""
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        micros, state, done = item
        if done is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(done)
            for _, b in micros:
                for t in b.values():
                    t.record_stream(stream)  # allocated on the side stream, used and freed on this one
        return micros, state

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.1)
            except queue.Empty:
                pass
        self._thread.join()


def online_features(target, layer_ids: list[int]) -> Callable[[dict], torch.Tensor]:
    """``batch -> target_hidden [b, S, L*H]`` from the frozen target (no grad).

    SDPA's cuDNN backend is kept out of the target: it plans anew for every sequence length, about
    2 ms of host time per attention call (72 ms per 3.5k-token forward of a 36-layer target, with
    the GPU idle), where the flash backend costs microseconds.
    """
    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

    def features(batch: dict) -> torch.Tensor:
        if "target_hidden" in batch:
            return batch["target_hidden"]
        with torch.no_grad(), sdpa_kernel(backends):
            return target_hidden_states(target, batch["input_ids"], batch["attention_mask"], layer_ids)

    return features


# ============================================================================ step


def anchor_seed(seed: int, step: int, micro_index: int) -> int:
    """Seed of the anchor / prefix draws of one micro-batch: independent of world size and restarts."""
    h = hashlib.blake2b(f"{seed}:{step}:{micro_index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


@dataclass
class StepStats:
    loss: float
    den: float
    correct: torch.Tensor  # [B] long, summed over ranks
    count: torch.Tensor  # [B] long
    tokens: int
    grad_norm: Optional[float] = None  # after scaling, before clipping (when forward_backward clipped)


def forward_backward(
    model: torch.nn.Module,
    micros: list[tuple[int, dict]],
    features: Callable[[dict], torch.Tensor],
    info: ddist.DistInfo,
    *,
    seed: int,
    step: int,
    generator: torch.Generator,
    amp: bool = False,
    grad_clip: Optional[float] = None,
) -> StepStats:
    """Accumulate the gradient of one global batch into ``.grad``.

    Each micro-batch backpropagates ``loss_num * world_size``; DDP / FSDP average over ranks and
    the gradients are then divided by the global ``Σw + 1e-6``: the result is the gradient of the
    global weighted mean, whatever the split over ranks and micro-batches (docs/semantics.md). With ``grad_clip``
    (``<= 0``: norm only) the global gradient norm is computed and clipped too. The sums, the
    scaling and the clipping stay on the device; the step reads them back in one transfer at its end.
    The batch ids were checked on the host (``check_token_ids``), so the model runs with the
    d2kernels range checks off (each costs a device sync).
    """
    sums = None  # [num, den, correct[B], count[B], tokens] float64 on the device
    amp_ctx = torch.autocast("cuda", dtype=torch.bfloat16) if amp else contextlib.nullcontext()
    for j, (index, batch) in enumerate(micros):
        generator.manual_seed(anchor_seed(seed, step, index))
        target_hidden = features(batch)
        with ddist.no_sync(model, j < len(micros) - 1), d2kernels.validation("off"):
            with amp_ctx:
                out = model(batch["input_ids"], target_hidden, batch["loss_mask"], generator=generator)
            (out.loss_num * info.world_size).backward()
        part = torch.cat([
            out.loss_num.detach().double().view(1), out.loss_den.detach().double().view(1),
            out.correct_per_slot.double(), out.count_per_slot.double(), batch["attention_mask"].sum().double().view(1),
        ])
        sums = part if sums is None else sums + part
    B = (sums.numel() - 3) // 2
    tot = ddist.all_reduce_sum(sums, info, to_host=False)
    params = [p for p in model.parameters() if p.grad is not None]
    scale = (1.0 / (tot[1] + 1e-6)).float()
    if grad_clip is not None and params:
        # The norm of the summed gradients times 1/Σw is the norm of the scaled ones: one pass
        # scales and clips together (clip_grad_norm_'s own in-place multiply would be a second).
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
        norm = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm) * scale
        if grad_clip > 0:
            scale = scale * torch.clamp(grad_clip / (norm + 1e-6), max=1.0)
        tot = torch.cat([tot, norm.detach().double().view(1).to(tot.device)])
    if params:  # FSDP2 gradients are DTensors: scale their local shards
        torch._foreach_mul_([getattr(p.grad, "_local_tensor", p.grad) for p in params], scale)
    host = tot.cpu()  # the step's one device sync
    return StepStats(
        loss=float(host[0] / (host[1] + 1e-6)),
        den=float(host[1]),
        correct=host[2:2 + B].round().long(),
        count=host[2 + B:2 + 2 * B].round().long(),
        tokens=int(host[2 + 2 * B]),
        grad_norm=float(host[3 + 2 * B]) if grad_clip is not None else None,
    )


def make_optimizer(model: torch.nn.Module, t: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # One fused kernel per step on CUDA (the foreach default launches several per tensor group).
    fused = bool(params) and all(p.is_cuda for p in params)
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps, fused=fused or None)


def make_scheduler(optimizer: torch.optim.Optimizer, t: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over ``warmup_ratio * max_steps``, then cosine / linear decay to ``min_lr_ratio``."""
    warmup = int(math.ceil(t.warmup_ratio * t.max_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if t.schedule == "constant":
            return 1.0
        frac = min(1.0, (step - warmup) / max(1, t.max_steps - warmup))
        shape = 0.5 * (1 + math.cos(math.pi * frac)) if t.schedule == "cosine" else 1 - frac
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * shape

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ============================================================================ model


def build_model(run: Run, target, info: ddist.DistInfo):
    """The drafter (initialized from the target, or the checkpoint's weights), wrapped for DDP / FSDP.

    Built on its device (no multi-GB init on the CPU). Trainable weights are fp32 master copies
    that compute in bf16 under autocast on CUDA; the frozen embed_tokens / lm_head keep the
    target's dtype (see ``Drafter.init_from_target``). Decoder layers are compiled on CUDA
    unless ``--no-compile``.
    """
    torch.manual_seed(run.train.seed)
    try:
        with torch.device(info.device):
            drafter = build_drafter(target.config, **run.drafter_args)
    except (ValueError, TypeError) as e:
        raise UsageError(f"cannot build the drafter: {e}") from None
    drafter.init_from_target(target)
    if run.resume_from is not None:
        drafter.load_state_dict(drafter_state_dict(read_weights(str(run.resume_from / ckpt.DRAFTER_DIR)), drafter.config))
    drafter.to(info.device)
    if use_compile(run, info):
        drafter.compile_layers()
    return drafter, ddist.wrap_model(drafter, info, fsdp=run.fsdp)


def use_compile(run: Run, info: ddist.DistInfo) -> bool:
    return run.compile if run.compile is not None else info.device.type == "cuda"


def _full_state(model, optimizer, run: Run):
    """``(model_sd, optim_sd)``: full tensors gathered on CPU from FSDP shards; else the live ones
    (``(None, optimizer.state_dict())``: the checkpointer copies them to host itself)."""
    if run.fsdp and dist_enabled():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return None, optimizer.state_dict()


def dist_enabled() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def check_weights_finite(model, info: ddist.DistInfo, step: int) -> None:
    """Raise NonFinite when a trainable weight holds NaN / inf (one host sync; run before each save)."""
    flags = [torch.isfinite(getattr(p, "_local_tensor", p)).all() for p in model.parameters() if p.requires_grad]
    bad = bool(flags) and not bool(torch.stack(flags).all())
    if ddist.any_rank(bad, info):
        raise NonFinite(f"non-finite weights after step {step} (NaN/inf, e.g. from a too-high --lr): "
                        "no checkpoint written, the earlier ones are kept")


def check_finite(loss: float, grad_norm: Optional[float]) -> Optional[str]:
    """None for a finite step, else what is not finite (both values came back in the step's one transfer;
    they are global, so every rank decides alike)."""
    vals = (("loss", loss), ("gradient norm", grad_norm if grad_norm is not None else 0.0))
    bad = [f"{name} {v}" for name, v in vals if not math.isfinite(v)]
    return "non-finite " + " and ".join(bad) if bad else None


def save(run: Run, step: int, model, optimizer, scheduler, data_state: dict, gen, info, drafter,
         saver: Optional[ckpt.AsyncCheckpointer]) -> Optional[Path]:
    """Queue checkpoint ``step`` (rank 0 writes it in the background); returns its final path."""
    check_weights_finite(model, info, step)
    model_sd, optim_sd = _full_state(model, optimizer, run)
    path = None
    if info.is_main:
        state = {
            "step": step,
            "optimizer": optim_sd,
            "scheduler": scheduler.state_dict(),
            "data": data_state,
            "rng": ckpt.capture_rng_state(gen),
            "run_opts": run.opts,
            "train_config": dataclasses.asdict(run.train),
            "drafter_config": drafter.config.to_dict(),
            "world_size": info.world_size,
            "fsdp": run.fsdp,
        }
        sd = model_sd if model_sd is not None else drafter.state_dict()
        config = drafter_json(drafter.config, drafter.fc.weight.dtype)
        path = saver.save(step, config, sd, state)
    ddist.barrier(info)
    return path


def restore(run: Run, model, optimizer, scheduler, batcher: Batcher, gen) -> int:
    s = run.resume_state
    if run.fsdp and dist_enabled():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, s["optimizer"], options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(s["optimizer"])
    scheduler.load_state_dict(s["scheduler"])
    apply_train_config(optimizer, scheduler, run.train)
    batcher.load_state_dict(s["data"])
    ckpt.restore_rng_state(s["rng"], gen)
    return int(s["step"])


def apply_train_config(optimizer: torch.optim.Optimizer, scheduler, t: TrainConfig) -> None:
    """Put ``t``'s optimizer knobs into restored param groups and scheduler (their state_dicts carry the old ones).

    The lr schedule itself (warmup, shape, max_steps) is the new ``make_scheduler`` closure already; only
    the peak lr lives in the scheduler's ``base_lrs``, and the current lr is recomputed from the step.
    """
    factor = scheduler.lr_lambdas[0](scheduler.last_epoch)
    for i, g in enumerate(optimizer.param_groups):
        g.update(initial_lr=t.lr, lr=t.lr * factor, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps)
        if i == 0:  # make_optimizer's first group holds the matrices, the only ones decayed
            g["weight_decay"] = t.weight_decay
    scheduler.base_lrs = [t.lr] * len(optimizer.param_groups)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


# ============================================================================ metrics


class Metrics:
    """metrics.jsonl (one object per logged step), TensorBoard when importable, curves.png at the end."""

    def __init__(self, out: Path, enabled: bool, resume_step: Optional[int], report_to: str = "tensorboard",
                 config: Optional[dict] = None):
        self.path = out / "metrics.jsonl"
        self.enabled = enabled
        self.rows: list[dict] = []
        self.trackers = []
        if not enabled:
            return
        out.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            # Rows past the checkpoint came from the interrupted run; they are redone now.
            self.rows = [r for r in read_metrics(self.path) if r["step"] <= resume_step]
        # Replaced, never rewritten in place: a kill mid-write leaves the old history whole.
        _atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.rows))
        names = parse_report_to(report_to)
        self.trackers = open_trackers(names, out, config, resume_step, required=[] if report_to == "tensorboard" else names, log=log)

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        self.rows.append(row)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        for t in self.trackers:
            t.log(row)

    def plot(self, out: Path) -> Optional[Path]:
        """curves.png (loss + accuracy); None when matplotlib is missing or nothing was logged."""
        if not self.enabled or not self.rows:
            return None
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        steps = [r["step"] for r in self.rows]
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
        a1.plot(steps, [r.get("loss", float("nan")) for r in self.rows])
        a1.set(xlabel="step", ylabel="loss", title="decayed CE loss")
        a2.plot(steps, [r.get("acc", float("nan")) for r in self.rows], label="all slots")
        per_slot = [r.get("acc_per_slot") or [] for r in self.rows]
        for k in range(max(map(len, per_slot))):
            ys = [a[k] if k < len(a) else None for a in per_slot]
            if any(y is not None for y in ys):
                ys = [float("nan") if y is None else y for y in ys]
                a2.plot(steps, ys, lw=0.8, alpha=0.6, label=f"slot {k}")
        a2.set(xlabel="step", ylabel="accuracy", title="supervised-slot accuracy")
        a2.legend(fontsize=7)
        fig.tight_layout()
        path = out / "curves.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

    def close(self) -> None:
        for t in self.trackers:
            t.close()


def read_metrics(path: Path) -> list[dict]:
    """Rows of a metrics.jsonl; a torn last line (a kill mid-append) or a damaged line is dropped with a warning."""
    raw = path.read_bytes().split(b"\n")
    rows = []
    for n, line in enumerate(raw, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"))
            if not isinstance(row, dict) or type(row.get("step")) is not int:
                raise ValueError("not a metrics row")
        except ValueError as e:
            torn = n == len(raw)  # no newline after it: the write was cut
            log(f"warning: {path}:{n}: {'torn last line' if torn else 'unreadable line'} dropped ({e})")
            continue
        rows.append(row)
    return rows


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ============================================================================ loop


class StopFlag:
    """SIGTERM / SIGINT ask for a checkpoint at the end of the current step, then a clean exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.hit = False
        self._previous = {}

    def __enter__(self) -> "StopFlag":
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        self.hit = True


def new_window() -> dict:
    return {"tokens": 0, "start": time.time(), "save_stall": 0.0, "save_wait": 0.0, "data_wait": 0.0}


class StepProfiler:
    """``--profile-steps N``: torch.profiler over steps ``start .. start+N-1``, summarized to ``path``."""

    def __init__(self, path: Path, start: int, steps: int):
        self.path, self.start, self.stop = path, start, start + steps
        self.prof = None
        self.t0 = 0.0

    def before(self, step: int) -> None:
        if step == self.start and self.stop > self.start:
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.prof = profile(activities=acts)
            self.prof.__enter__()
            self.t0 = time.time()

    def covers(self, step: int) -> bool:
        """Whether step ``step`` (counted from 1, as logged) ran under the profiler."""
        return self.start < step <= self.stop

    def after(self, step: int) -> None:
        if self.prof is None or step < self.stop:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = time.time() - self.t0
        self.prof.__exit__(None, None, None)
        avg = self.prof.key_averages()
        # Kernels only: an aten op's device time is its kernels' time counted a second time.
        busy = sum(e.self_device_time_total for e in self.prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA) / 1e6
        table = avg.table(sort_by="self_device_time_total" if busy else "self_cpu_time_total", row_limit=30)
        self.path.write_text(f"steps {self.start + 1}..{self.stop}: wall {wall:.3f}s, device busy {busy:.3f}s "
                             f"({100 * busy / max(wall, 1e-9):.0f}%)\n{table}\n")
        log(f"profile of steps {self.start + 1}..{self.stop} (device busy {100 * busy / max(wall, 1e-9):.0f}% of "
            f"{wall:.2f}s): {self.path}")
        self.prof = None


def train_loop(run, model, drafter, optimizer, scheduler, batcher, examples, features, info, start_step,
               gen: torch.Generator, pad_id: int) -> dict:
    from tqdm import tqdm

    t = run.train
    metrics = Metrics(run.out, info.is_main, start_step if run.resume_from else None,
                      run.opts.get("report_to", "tensorboard"), config=run.opts)
    saver = ckpt.AsyncCheckpointer(run.out / "checkpoints", t.keep_last, frozen=TARGET_PARTS) if info.is_main else None
    prefetch = Prefetcher(batcher, examples, pad_id, info.device, drafter.config.vocab_size)
    amp = info.device.type == "cuda"
    bar = tqdm(total=t.max_steps, initial=start_step, disable=not info.is_main, dynamic_ncols=True, file=sys.stderr)
    last = None
    step = start_step
    t0 = time.time()
    window = new_window()  # since the last metrics row
    first = True
    failure, skipped = None, 0
    profiler = StepProfiler(run.out / "profile.txt", start=start_step + 3, steps=int(run.opts.get("profile_steps") or 0))
    try:
        with StopFlag() as stop:
            while step < t.max_steps:
                profiler.before(step)
                tw = time.time()
                micros, data_state = prefetch.next()
                ts = time.time()
                window["data_wait"] += ts - tw
                s = forward_backward(model, micros, features, info, seed=t.seed, step=step, generator=gen, amp=amp,
                                     grad_clip=t.grad_clip)
                bad = check_finite(s.loss, s.grad_norm)
                lr = scheduler.get_last_lr()[0]
                if bad is not None:
                    skipped += 1
                    if skipped > t.skip_nonfinite:
                        kept = last or run.resume_from
                        failure = (f"{bad} at step {step + 1}: stopped before its optimizer step, no checkpoint "
                                   f"written{f'; the last good checkpoint is {kept}' if kept else ''} (a NaN/inf in "
                                   "the data, e.g. a cached sample, or a too-high --lr; --skip-nonfinite N skips up "
                                   "to N such steps)")
                        break
                    log(f"{bad} at step {step + 1}: step skipped, no optimizer step "
                        f"({skipped} of --skip-nonfinite {t.skip_nonfinite})")
                else:
                    optimizer.step()
                with warnings.catch_warnings():  # a skipped first step is not the misuse torch warns about
                    warnings.filterwarnings("ignore", "Detected call of `lr_scheduler")
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                dt = time.time() - ts
                profiler.after(step)
                if first:
                    log(f"first step: {dt:.1f}s (includes{' compiling the layers and' if use_compile(run, info) else ''} "
                        f"the kernels' first launches)")
                    first = False
                    if saver is not None and not (run.fsdp and dist_enabled()):
                        saver.reserve(drafter.state_dict(), {"optimizer": optimizer.state_dict()})
                window["tokens"] += s.tokens
                # None where a slot is never supervised (e.g. D2 prefix slots 0 and 1).
                acc_slot = [c / n if n else None for c, n in zip(s.correct.tolist(), s.count.tolist())]
                acc = float(s.correct.sum()) / max(1, int(s.count.sum()))
                bar.update(1)
                slots = "/".join("-" if a is None else f"{a:.2f}" for a in acc_slot)
                bar.set_postfix(loss=f"{s.loss:.3f}", acc=f"{acc:.3f}", acc_slot=slots, tok_s=f"{s.tokens / dt:.0f}")
                stopping = ddist.any_rank(stop.hit, info)
                if stopping or step == t.max_steps or (t.save_every > 0 and step % t.save_every == 0):
                    tsave = time.time()
                    try:
                        last = save(run, step, model, optimizer, scheduler, data_state, gen, info, drafter, saver)
                    except (NonFinite, ckpt.CheckpointWriteError) as e:
                        failure = str(e)
                        break
                    window["save_stall"] += time.time() - tsave
                    window["save_wait"] += saver.wait_seconds if saver is not None else 0.0
                if step % t.log_every == 0 or step == t.max_steps:
                    now = time.time()
                    row = {
                        "step": step, "loss": s.loss, "acc": acc, "acc_per_slot": acc_slot, "lr": lr,
                        "grad_norm": s.grad_norm, "tokens_per_s": s.tokens / dt, "supervised_weight": s.den,
                        "time": now - t0, "step_s": dt, "tokens": window["tokens"],
                        # throughput over the logging window, data waits and save stalls included
                        "window_tokens_per_s": window["tokens"] / max(now - window["start"], 1e-9),
                        "save_stall_s": window["save_stall"],
                        "save_wait_s": window["save_wait"],  # part of the stall spent waiting for the previous write
                        "data_wait_s": window["data_wait"],
                        "save_write_s": saver.write_seconds if saver is not None else None,
                    }
                    if info.device.type == "cuda":
                        row["peak_mem_gib"] = torch.cuda.max_memory_allocated(info.device) / 2**30
                    if profiler.covers(step):
                        row["profiled"] = True  # slowed by the profiler: not a throughput sample
                    metrics.log(row)
                    window = new_window()
                if stopping:
                    break
            if saver is not None and failure is None:
                try:
                    saver.wait()  # the last checkpoint is on disk before the run reports it
                except ckpt.CheckpointWriteError as e:
                    failure = str(e)
            if stop.hit and failure is None:
                log(f"stop signal: checkpoint saved at step {step}; resume with --resume {run.out}")
    finally:
        prefetch.close()
    bar.close()
    plot = metrics.plot(run.out)
    metrics.close()
    return {"step": step, "checkpoint": last, "plot": plot, "metrics": metrics, "seconds": time.time() - t0,
            "stopped": stop.hit, "failure": failure}


def report(run: Run, result: dict) -> None:
    rows = result["metrics"].rows
    if rows:
        k = max(1, min(3, len(rows) // 4))
        first = sum(r["loss"] for r in rows[:k]) / k
        final = sum(r["loss"] for r in rows[-k:]) / k
        log(f"{result['step']} steps in {result['seconds']:.1f}s; loss {first:.3f} -> {final:.3f} "
            f"(mean of the first / last {k} logged steps), accuracy {rows[-1]['acc']:.3f}")
    log(f"run dir:    {run.out}")
    log(f"metrics:    {result['metrics'].path}")
    if result["plot"] is not None:
        log(f"curves:     {result['plot']}")
    else:
        log("curves:     not written (matplotlib is not installed: pip install matplotlib)")
    if result["checkpoint"] is not None:
        log(f"checkpoint: {result['checkpoint']}  (drafter: load_drafter('{result['checkpoint']}/drafter'))")


class TrainingStopped(RuntimeError):
    """Training stopped early for a reason given in the message (a non-finite step, a failed save)."""


@dataclass
class TrainResult:
    """What ``train()`` returns: where the run went and how it ended."""

    run_dir: Path
    checkpoint: Optional[Path]  # the last checkpoint written (``load_drafter(checkpoint / "drafter")``)
    steps: int
    metrics: list[dict]  # the logged rows (metrics.jsonl)
    stopped: bool  # a SIGTERM / SIGINT ended it early, after a checkpoint


def train(**options) -> TrainResult:
    """``python -m d2sd.train`` as a function: one keyword per option (its ``dest`` name).

        from d2sd.train import train
        r = train(target="/models/Qwen3-8B", data="chats.jsonl", preset="qwen3-8b", max_steps=2000)
        drafter = load_drafter(str(r.checkpoint / "drafter"))

    Raises ``UsageError`` on bad input (what the command reports with exit status 2) and
    ``TrainingStopped`` when training stops early (exit status 3).
    """
    return run_training(resolve_options(options))


def run_training(run: Run) -> TrainResult:
    """Set up (process group, target, data, drafter, optimizer, resume) and train ``run``."""
    info = ddist.setup(run.device)
    random.seed(run.train.seed)
    np.random.seed(run.train.seed)
    # With an offline cache the target only lends its embeddings / lm_head: keep it on the CPU.
    target, tokenizer = load_target_model(run, torch.device("cpu") if run.cache else info.device)
    check_target_matches(run, target)
    fill_mask_token(run, tokenizer)
    pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    examples = load_examples(run, target, tokenizer)
    drafter, model = build_model(run, target, info)
    features = online_features(None if run.cache else target, list(drafter.config.target_layer_ids))
    if run.cache:
        del target
    optimizer = make_optimizer(model, run.train)
    scheduler = make_scheduler(optimizer, run.train)
    lengths = examples.lengths() if hasattr(examples, "lengths") else [len(e["input_ids"]) for e in examples]
    batcher = Batcher(len(examples), run.train.global_batch_size, run.train.micro_batch_size,
                      info.world_size, info.rank, run.train.seed, lengths=lengths)
    start = 0
    gen = torch.Generator()  # anchor / prefix draws; reseeded per micro-batch by anchor_seed
    if run.resume_state is not None:
        start = restore(run, model, optimizer, scheduler, batcher, gen)
        log(f"resumed from {run.resume_from} at step {start}")
    if info.is_main:
        log(f"run dir {run.out}: {len(examples)} records, preset {run.preset}, "
            f"{sum(p.numel() for p in drafter.parameters() if p.requires_grad):,} trainable parameters, "
            f"{batcher.accum_steps} micro-batches/step/rank, device {info.device}, world {info.world_size}")
    result = train_loop(run, model, drafter, optimizer, scheduler, batcher, examples, features, info, start,
                        gen, pad_id)
    # Leave the process group together (also when stopping); a bad-input error before the loop
    # exits every rank the same way without it.
    ddist.teardown()
    if result["failure"] is not None:
        raise TrainingStopped(result["failure"])
    if info.is_main:
        report(run, result)
    return TrainResult(run_dir=run.out, checkpoint=result["checkpoint"], steps=result["step"],
                       metrics=result["metrics"].rows, stopped=result["stopped"])


def main(argv: Optional[list[str]] = None) -> int:
    try:
        run = resolve_run(argv)
        if run.print_config:
            print(dump_config(run), end="")
            return 0
        run_training(run)
    except (UsageError, ckpt.CorruptCheckpoint, FileNotFoundError) as e:
        print(f"python -m d2sd.train: error: {e}", file=sys.stderr, flush=True)
        return 2
    except TrainingStopped as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"python -m d2sd.train: error: {e}", file=sys.stderr, flush=True)
        return EXIT_STOPPED
    return 0


if __name__ == "__main__":
    sys.exit(main())
