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
import random
import signal
import sys
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from . import checkpoint as ckpt
from . import distributed as ddist
from .config import TrainConfig, get_preset, PRESETS

__all__ = ["main", "build_parser", "resolve_run", "Batcher", "forward_backward", "make_scheduler"]

# Fields of DrafterConfig that are training knobs (build_drafter kwargs); the transformer dims
# come from the target. enable_d2_feature / dflash_labels / backend have their own options.
DRAFTER_KNOBS = {
    "num_draft_layers": "number of drafter decoder layers",
    "target_layer_ids": "target layers whose hidden states feed the drafter (-1 = embeddings)",
    "block_size": "draft block size B (anchor + B-1 slots)",
    "mask_token_id": "token id of [MASK] in the draft slots",
    "num_anchors": "anchors (blocks) sampled per sequence",
    "d2_prefix_weight_base": "D2 prefix-length law P(p) ~ base**p (base < 1 favours short prefixes)",
    "loss_decay_gamma": "loss weight decay exp(-offset/gamma) along the block (<= 0: none)",
}
# Run options replayed on --resume (everything but where to resume from and the one-shot actions).
NOT_REPLAYED = {"resume", "config", "print_config"}


class UsageError(Exception):
    """Bad input found before training starts: printed without a traceback, nothing is lost."""


def log(msg: str) -> None:
    if os.environ.get("RANK", "0") == "0":  # one copy of each message under torchrun
        print(f"[d2sd] {msg}", flush=True)


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
    from .config import DrafterConfig

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
    resume_from: Optional[Path] = None
    resume_state: Optional[dict] = None
    print_config: bool = False

    @property
    def embedded(self) -> bool:
        return self.data is None and self.cache is None


def resolve_run(argv: Optional[list[str]] = None) -> Run:
    """Layer TrainConfig defaults < preset < --config file < resumed run's options < command line."""
    parser = build_parser()
    given = vars(parser.parse_args(argv))
    if "config" in given:
        from .runconfig import read_config

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
        cli = vars(parser.parse_args(argv))  # the command line alone wins over the resumed options
        opts = {**given, **state["run_opts"], **cli}
        opts = {k: v for k, v in opts.items() if k not in NOT_REPLAYED}
        if "out" not in given:
            opts["out"] = str(resume_from.parent.parent)
    else:
        opts = {k: v for k, v in given.items() if k not in NOT_REPLAYED}
    if "report_to" in opts:
        from .trackers import check_report_to

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
    if resume_from is None and ckpt.list_checkpoints(out / "checkpoints"):
        raise UsageError(f"{out} already holds checkpoints: continue it with --resume {out}, or pick another --out")
    return Run(
        opts=opts, preset=preset_name, train=train, drafter_args=drafter_args,
        target=opts.get("target"), data=opts.get("data"), cache=opts.get("cache"), out=out,
        device=opts.get("device"), fsdp=bool(opts.get("fsdp", False)),
        resume_from=resume_from, resume_state=state, print_config=bool(given.get("print_config")),
    )


def _check_train_config(t: TrainConfig) -> None:
    problems = []
    for name in ("max_steps", "global_batch_size", "micro_batch_size", "max_length", "log_every"):
        if getattr(t, name) < 1:
            problems.append(f"{name} must be >= 1, got {getattr(t, name)}")
    if not 0 <= t.warmup_ratio < 1:
        problems.append(f"warmup_ratio must be in [0, 1), got {t.warmup_ratio}")
    if t.schedule not in ("cosine", "linear", "constant"):
        problems.append(f"schedule must be cosine, linear or constant, got {t.schedule!r}")
    if not t.lr > 0:
        problems.append(f"lr must be > 0, got {t.lr}")
    if problems:
        raise UsageError("bad training config: " + "; ".join(problems))


# ============================================================================ target + data


def load_target_model(run: Run, device: torch.device):
    """``(model, tokenizer)``: a frozen target, bf16 on GPU, fp32 on CPU; clear error when missing."""
    from .target import load_target

    path = run.target
    if path is None:
        from .assets import tiny_target_path

        path = tiny_target_path()
    from .target import resolve_model

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
    from . import data

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
    if stats.get("truncated"):
        log(f"truncated {stats['truncated']} record(s) to --max-length {t.max_length}")
    if not samples:
        raise UsageError("no training record has an assistant token to learn from")
    return samples


EMBEDDED_PROMPTS = 256


def _tokenize_records(records, tokenizer, max_length: int) -> tuple[list[dict], dict]:
    """In-memory chat records -> samples, with the same stats as ``data.load_chat_jsonl``."""
    from .data import tokenize_chat

    samples, stats = [], {"records": len(records), "samples": 0, "skipped_no_assistant": 0, "truncated": 0}
    for r in records:
        s = tokenize_chat(r, tokenizer, None)
        if len(s["input_ids"]) > max_length:
            stats["truncated"] += 1
            s = {k: v[:max_length] for k, v in s.items()}
        if int(s["loss_mask"].sum()) == 0:
            stats["skipped_no_assistant"] += 1
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
        rec = self.cache[i]
        return {k: rec[k][: self.max_length] for k in ("input_ids", "loss_mask", "target_hidden")}


def _cache_samples(run: Run, target) -> _CacheSamples:
    from .cache import TargetCache

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
    log(f"cache {run.cache}: {len(cache)} samples, layers {cache.target_layer_ids}, hidden {cache.hidden_size}")
    return _CacheSamples(cache, run.train.max_length)


# ============================================================================ batches


@dataclass
class Micro:
    """One micro-batch: its global index inside the step (seeds its anchors) and its records."""

    index: int
    records: list[dict]


class Batcher:
    """Deterministic, resumable order over records: a fresh permutation per epoch (seed + epoch).

    A global batch is the next ``global_batch_size`` records; it is cut into micro-batches of
    ``micro_batch_size`` and micro-batch ``i`` goes to rank ``i % world_size``. ``state_dict()``
    is the data position.
    """

    def __init__(self, n: int, global_batch_size: int, micro_batch_size: int, world_size: int, rank: int, seed: int):
        per = micro_batch_size * world_size
        if global_batch_size % per:
            raise UsageError(
                f"global_batch_size={global_batch_size} must be a multiple of "
                f"micro_batch_size*world_size = {micro_batch_size}*{world_size}"
            )
        self.n, self.gbs, self.mbs = n, global_batch_size, micro_batch_size
        self.world, self.rank, self.seed = world_size, rank, seed
        self.epoch, self.cursor = 0, 0

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
    from .data import collate as pad_batch

    return {k: v.to(device, non_blocking=True) for k, v in pad_batch(samples, pad_id).items()}


def online_features(target, layer_ids: list[int]) -> Callable[[dict], torch.Tensor]:
    """``batch -> target_hidden [b, S, L*H]`` from the frozen target (no grad)."""
    from .target import target_hidden_states

    def features(batch: dict) -> torch.Tensor:
        if "target_hidden" in batch:
            return batch["target_hidden"]
        with torch.no_grad():
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
) -> StepStats:
    """Accumulate the gradient of one global batch into ``.grad``.

    Each micro-batch backpropagates ``loss_num * world_size``; DDP / FSDP average over ranks and
    the gradients are then divided by the global ``Σw + 1e-6``: the result is the gradient of the
    global weighted mean, whatever the split over ranks and micro-batches (SPEC).
    """
    # Running sums stay on the model's device: one transfer per step, not one sync per micro-batch.
    num = den = correct = count = tokens = 0
    amp_ctx = torch.autocast("cuda", dtype=torch.bfloat16) if amp else contextlib.nullcontext()
    for j, (index, batch) in enumerate(micros):
        generator.manual_seed(anchor_seed(seed, step, index))
        target_hidden = features(batch)
        with ddist.no_sync(model, j < len(micros) - 1):
            with amp_ctx:
                out = model(batch["input_ids"], target_hidden, batch["loss_mask"], generator=generator)
            (out.loss_num * info.world_size).backward()
        num = num + out.loss_num.detach().double()
        den = den + out.loss_den.detach().double()
        correct = correct + out.correct_per_slot.detach()
        count = count + out.count_per_slot.detach()
        tokens = tokens + batch["attention_mask"].sum()
    B = correct.numel()
    tot = ddist.all_reduce_sum([num, den, correct, count, tokens], info)
    g_num, g_den = float(tot[0]), float(tot[1])
    scale = 1.0 / (g_den + 1e-6)
    for p in model.parameters():
        if p.grad is not None:
            p.grad.mul_(scale)
    return StepStats(
        loss=g_num * scale,
        den=g_den,
        correct=tot[2:2 + B].round().long(),
        count=tot[2 + B:2 + 2 * B].round().long(),
        tokens=int(tot[-1]),
    )


def make_optimizer(model: torch.nn.Module, t: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps)


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
    """The drafter (initialized from the target, or the checkpoint's weights), wrapped for DDP / FSDP."""
    from .models import build_drafter

    torch.manual_seed(run.train.seed)
    try:
        drafter = build_drafter(target.config, **run.drafter_args)
    except (ValueError, TypeError) as e:
        raise UsageError(f"cannot build the drafter: {e}") from None
    drafter.init_from_target(target)
    if run.resume_from is not None:
        from safetensors.torch import load_file

        from .models.checkpoint import drafter_state_dict

        sd = load_file(str(run.resume_from / ckpt.DRAFTER_DIR / "model.safetensors"))
        drafter.load_state_dict(drafter_state_dict(sd, drafter.config))
    drafter.to(info.device)
    return drafter, ddist.wrap_model(drafter, info, fsdp=run.fsdp)


def _full_state(model, optimizer, run: Run):
    """``(model_sd, optim_sd)`` as full tensors on CPU (gathered from FSDP shards when sharded)."""
    if run.fsdp and dist_enabled():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return None, optimizer.state_dict()


def dist_enabled() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def save(run: Run, step: int, model, optimizer, scheduler, batcher: Batcher, gen, info, drafter) -> Optional[Path]:
    model_sd, optim_sd = _full_state(model, optimizer, run)
    path = None
    if info.is_main:
        def write_drafter(d: Path) -> None:
            if model_sd is not None:
                # FSDP: save_pretrained reads a full (gathered) copy, not the local shards.
                cls = next(c for c in type(drafter).__mro__ if not c.__name__.startswith("FSDP"))
                clone = cls(drafter.config)
                clone.load_state_dict(model_sd)
                clone.save_pretrained(str(d))
            else:
                drafter.save_pretrained(str(d))

        state = {
            "step": step,
            "optimizer": optim_sd,
            "scheduler": scheduler.state_dict(),
            "data": batcher.state_dict(),
            "rng": ckpt.capture_rng_state(gen),
            "run_opts": run.opts,
            "train_config": dataclasses.asdict(run.train),
            "drafter_config": drafter.config.to_dict(),
            "world_size": info.world_size,
            "fsdp": run.fsdp,
        }
        path = ckpt.save_checkpoint(run.out / "checkpoints", step, write_drafter, state, run.train.keep_last)
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
    batcher.load_state_dict(s["data"])
    ckpt.restore_rng_state(s["rng"], gen)
    return int(s["step"])


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
            self.rows = [r for r in map(json.loads, self.path.read_text().splitlines()) if r["step"] <= resume_step]
        elif self.path.exists():
            self.path.unlink()
        with open(self.path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in self.rows)
        from .trackers import open_trackers, parse_report_to

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
        a1.plot(steps, [r["loss"] for r in self.rows])
        a1.set(xlabel="step", ylabel="loss", title="decayed CE loss")
        a2.plot(steps, [r["acc"] for r in self.rows], label="all slots")
        B = len(self.rows[-1]["acc_per_slot"])
        for k in range(B):
            ys = [r["acc_per_slot"][k] for r in self.rows]
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


def train_loop(run, model, drafter, optimizer, scheduler, batcher, examples, features, info, start_step,
               gen: torch.Generator, pad_id: int) -> dict:
    from tqdm import tqdm

    t = run.train
    metrics = Metrics(run.out, info.is_main, start_step if run.resume_from else None,
                      run.opts.get("report_to", "tensorboard"), config=run.opts)
    amp = info.device.type == "cuda"
    params = [p for p in model.parameters() if p.requires_grad]
    bar = tqdm(total=t.max_steps, initial=start_step, disable=not info.is_main, dynamic_ncols=True, file=sys.stderr)
    last = None
    step = start_step
    t0 = time.time()
    with StopFlag() as stop:
        while step < t.max_steps:
            micros = [(i, collate([examples[k] for k in idx], pad_id, info.device)) for i, idx in batcher.next()]
            ts = time.time()
            s = forward_backward(model, micros, features, info, seed=t.seed, step=step, generator=gen, amp=amp)
            gnorm = torch.nn.utils.clip_grad_norm_(params, t.grad_clip if t.grad_clip > 0 else float("inf"))
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            dt = time.time() - ts
            # None where a slot is never supervised (e.g. D2 prefix slots 0 and 1).
            acc_slot = [c / n if n else None for c, n in zip(s.correct.tolist(), s.count.tolist())]
            acc = float(s.correct.sum()) / max(1, int(s.count.sum()))
            bar.update(1)
            slots = "/".join("-" if a is None else f"{a:.2f}" for a in acc_slot)
            bar.set_postfix(loss=f"{s.loss:.3f}", acc=f"{acc:.3f}", acc_slot=slots, tok_s=f"{s.tokens / dt:.0f}")
            if step % t.log_every == 0 or step == t.max_steps:
                metrics.log({
                    "step": step, "loss": s.loss, "acc": acc, "acc_per_slot": acc_slot, "lr": lr,
                    "grad_norm": float(gnorm), "tokens_per_s": s.tokens / dt, "supervised_weight": s.den,
                    "time": time.time() - t0,
                })
            stopping = ddist.any_rank(stop.hit, info)
            if stopping or step == t.max_steps or (t.save_every > 0 and step % t.save_every == 0):
                last = save(run, step, model, optimizer, scheduler, batcher, gen, info, drafter)
            if stopping:
                bar.close()
                log(f"stop signal: checkpoint saved at step {step}; resume with --resume {run.out}")
                break
    bar.close()
    plot = metrics.plot(run.out)
    metrics.close()
    return {"step": step, "checkpoint": last, "plot": plot, "metrics": metrics, "seconds": time.time() - t0,
            "stopped": stop.hit}


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


def main(argv: Optional[list[str]] = None) -> int:
    try:
        run = resolve_run(argv)
        if run.print_config:
            from .runconfig import dump_config

            print(dump_config(run), end="")
            return 0
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
        batcher = Batcher(len(examples), run.train.global_batch_size, run.train.micro_batch_size,
                          info.world_size, info.rank, run.train.seed)
    except (UsageError, ckpt.CorruptCheckpoint, FileNotFoundError) as e:
        print(f"python -m d2sd.train: error: {e}", file=sys.stderr, flush=True)
        return 2
    start = 0
    gen = torch.Generator()  # anchor / prefix draws; reseeded per micro-batch by anchor_seed
    if run.resume_state is not None:
        start = restore(run, model, optimizer, scheduler, batcher, gen)
        log(f"resumed from {run.resume_from} at step {start}")
    if info.is_main:
        log(f"run dir {run.out}: {len(examples)} records, preset {run.preset}, "
            f"{sum(p.numel() for p in drafter.parameters() if p.requires_grad):,} trainable parameters, "
            f"{batcher.accum_steps} micro-batches/step/rank, device {info.device}, world {info.world_size}")
    result = train_loop(run, model, drafter, optimizer, scheduler, batcher, examples, features, info, start, gen, pad_id)
    if info.is_main:
        report(run, result)
    ddist.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
