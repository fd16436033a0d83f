"""``python -m d2sd.eval``: greedy speculative decoding with DFlash and D2SD drafters, acceptance length.

With no arguments it runs the embedded demo: the shipped tiny Qwen3 target, the built-in prompts
(plus a second held-out draw), and a DFlash and a VP drafter trained with ``d2sd.train`` on the same
short budget (300 steps each, on the target's answers to 1024 built-in prompts of a third seed;
cached under ``runs/eval-drafters/`` and reused by later runs). Real runs name everything::

    python -m d2sd.eval --target Qwen/Qwen3-8B --dflash runs/dflash/drafter --vp runs/vp/drafter \\
        --data mtbench.jsonl --data gsm8k.jsonl --k 4 --max-new-tokens 256 --report report.json

Every method's output is checked token for token against plain greedy decoding of the target
(``lossless``). Metrics per dataset and method: acceptance length (tokens committed per target
forward, bonus token included), per-position acceptance, drafter and target time per step, and
end-to-end tokens/s against plain decoding. Printed as a table, written as JSON (``--report``) and
drawn as a plot (``--plot``, when matplotlib is importable). See ``d2sd/specdec.py`` for the
algorithms and the cost model.

Report JSON: ``{"schema_version", "methods": {method: metrics}, "datasets": {name: {"prompts",
"methods": {method: metrics}}}, "lossless", "d2sd_over_dflash", "config"}``; ``method`` is
``greedy`` (the reference), ``dflash``, ``d2sd``; ``metrics`` holds ``acceptance_length`` (tokens
committed per verify forward, bonus included; the prefill's first token is not counted),
``per_position_acceptance`` (``[j-1]`` = fraction of steps accepting >= j drafted tokens),
``accepted_histogram``, ``draft_ms_per_step``, ``target_ms_per_step``, ``prefill_ms``,
``rows_per_step`` (candidates verified per forward), ``tokens_per_s``, ``speedup_vs_greedy``,
``branch_win_rate`` / ``branch_win_by_prefix`` (D2SD: steps a VP branch beat the first draft),
``lossless`` and ``mismatched_prompts``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from . import cli, train
from .assets import tiny_target_path
from .chat import chat_messages
from .checkpoint import output_path_problem
from .cli import UsageError
from .data import builtin_prompts, decode_line, default_corpus, write_chat_jsonl
from .models import load_drafter
from .specdec import METHODS, DecodeResult, SlotDrafter, TargetVerifier, check_drafters, decode
from .target import load_target, resolve_model

__all__ = ["main", "build_parser", "summarize", "load_prompt_file", "encode_prompt", "evaluate"]

SCHEMA_VERSION = 1
DEFAULT_DRAFTER_CACHE = Path("runs") / "eval-drafters"


def log(msg: str) -> None:
    cli.log(msg, prefix="d2sd.eval")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m d2sd.eval",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("models")
    g.add_argument("--target", help="target model dir, Hugging Face layout (default: the shipped tiny Qwen3)")
    g.add_argument("--dflash", help="DFlash drafter dir (config.json + model.safetensors); "
                   "default with the tiny target: train or reuse one under --drafter-cache")
    g.add_argument("--vp", help="VP (D2, variable-prefix) drafter dir; same default as --dflash")
    g.add_argument("--device", help="cuda / cpu (default: cuda when available)")
    g.add_argument("--threads", type=int, default=None,
                   help="CPU intra-op threads (torch.set_num_threads); 1 is fastest for the tiny target")
    g.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16", "float64"), default="auto",
                   help="target and drafter dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    g = p.add_argument_group("decoding")
    g.add_argument("--data", action="append", metavar="FILE",
                   help="prompts JSONL, one dataset per file (repeatable); a line is {'prompt': str}, "
                   "{'messages': [...]} or {'conversations': [...]} (a trailing assistant turn is dropped). "
                   "Default: the built-in prompts (the embedded drafters train on them) and a "
                   "held-out draw of the same generator")
    g.add_argument("--num-prompts", type=int, default=None, help="use at most this many prompts per dataset")
    g.add_argument("--k", type=int, default=4, help="D2SD branches: top-K prefix lengths by r(i) (1 <= K < block size)")
    g.add_argument("--distinct-branches", action="store_true",
                   help="D2SD: a branch at prefix i may not repeat the first draft's token i+1 (default: plain argmax)")
    g.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per prompt (stops early at EOS)")
    g.add_argument("--methods", default="dflash,d2sd",
                   help="comma-separated speculative methods to run (plain greedy always runs: it is the reference)")
    g.add_argument("--no-kv-cache", dest="kv_cache", action="store_false",
                   help="recompute the target's whole prefix every forward instead of keeping its KV cache")
    g.add_argument("--no-stop-at-eos", dest="stop_at_eos", action="store_false",
                   help="always generate --max-new-tokens tokens")
    g = p.add_argument_group("output")
    g.add_argument("--report", default=str(Path("runs") / "eval" / "report.json"), help="JSON report path")
    g.add_argument("--plot", default=None, help="plot path (default: next to the report, .png)")
    g = p.add_argument_group("embedded drafters (used when --dflash / --vp are not given)")
    g.add_argument("--drafter-cache", default=str(DEFAULT_DRAFTER_CACHE), help="where trained drafters are kept and reused")
    g.add_argument("--train-steps", type=int, default=300, help="training steps of each drafter (same budget for both)")
    g.add_argument("--train-prompts", type=int, default=1024,
                   help="training data: the target's greedy answers to this many built-in prompts of a seed "
                   "no evaluation set uses; 0 = d2sd.train's own embedded corpus")
    g.add_argument("--block-size", type=int, default=7, help="block size of the trained drafters")
    g.add_argument("--dflash-labels", choices=("shifted", "same"), default="same",
                   help="labels of the trained DFlash drafter: same (slot k predicts a+k, as the VP drafter: "
                   "the two then differ only in D2) or shifted (DeepSpec, slot k predicts a+k+1)")
    g.add_argument("--retrain", action="store_true", help="train the drafters again even if cached")
    g.add_argument("--seed", type=int, default=0, help="training seed of the embedded drafters")
    return p


# ---------------------------------------------------------------------------------------- prompts


def encode_prompt(tokenizer, item: Any) -> list[int]:
    """A prompt (str, or a record with 'prompt' / 'messages' / 'conversations') -> token ids via the chat template."""
    if isinstance(item, str):
        messages = [{"role": "user", "content": item}]
    elif isinstance(item, dict) and isinstance(item.get("prompt"), str):
        messages = [{"role": "user", "content": item["prompt"]}]
    elif isinstance(item, dict) and ("messages" in item or "conversations" in item):
        # the training data's parser: same role aliases and content-part handling
        messages = chat_messages(item)
        if messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        if not messages:
            raise ValueError("a prompt record has no turn before the assistant's answer")
    else:
        raise ValueError(f"a prompt must be a string or have 'prompt', 'messages' or 'conversations', got {str(item)[:80]!r}")
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return [int(t) for t in ids]
    text = "\n".join(m["content"] for m in messages)
    return [int(t) for t in tokenizer(text)["input_ids"]]


def load_prompt_file(path: str) -> list[Any]:
    """Records of a prompts JSONL file; malformed lines raise ``UsageError`` naming file and line."""
    if not Path(path).is_file():
        raise UsageError(f"--data {path}: not a file (pass a prompts JSONL file)")
    items = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = decode_line(raw, path, n)
            except ValueError as e:
                raise UsageError(str(e)) from None
            if not line.strip():
                continue
            try:
                items.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UsageError(f"{path}:{n}: malformed JSON ({e.msg})") from None
    if not items:
        raise UsageError(f"{path}: no prompts")
    return items


HELDOUT_SEED = 7  # a draw of the built-in prompt generator that neither drafters nor target saw
TRAIN_SEED = 11  # the embedded drafters' training prompts: disjoint from both evaluation draws


def _builtin_prompts(seed: Optional[int] = None) -> list[Any]:
    return list(builtin_prompts() if seed is None else builtin_prompts(seed=seed))


def load_datasets(args, tokenizer) -> dict[str, list[list[int]]]:
    sources = {Path(p).stem: (lambda p=p: load_prompt_file(p)) for p in (args.data or [])}
    if not sources:
        sources = {"builtin": _builtin_prompts, "heldout": lambda: _builtin_prompts(HELDOUT_SEED)}
    datasets = {}
    for name, get in sources.items():
        items = get()[: args.num_prompts] if args.num_prompts else get()
        prompts = []
        for i, item in enumerate(items):
            try:
                prompts.append(encode_prompt(tokenizer, item))
            except ValueError as e:
                raise UsageError(f"dataset {name!r}, prompt {i + 1}: {e}") from None
        datasets[name] = prompts
    return datasets


# ---------------------------------------------------------------------------------------- models


def _dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def _load_target(path: str, device: torch.device, dtype: torch.dtype):
    model, tokenizer = load_target(path, device, dtype)
    return model.eval(), tokenizer


def _load_drafter(path: str, target, device: torch.device, dtype: torch.dtype):
    try:
        path = resolve_model(path)
    except FileNotFoundError as e:
        raise UsageError(f"drafter {e}") from None
    if not (Path(path) / "config.json").is_file():
        raise UsageError(f"drafter {path}: no config.json there (expected a dir written by save_pretrained)")
    return load_drafter(path, target=target).to(device=device, dtype=dtype).eval()


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(path.glob("*.json")) + sorted(path.glob("*.safetensors")):
        h.update(f.name.encode())
        h.update(str(f.stat().st_size).encode())
        h.update(str(int(f.stat().st_mtime)).encode())
    return h.hexdigest()[:12]


def _training_corpus(args, target_path: str, target, tokenizer) -> Optional[Path]:
    """Chat JSONL of the target's answers to ``--train-prompts`` built-in prompts (made once, cached)."""
    if args.train_prompts <= 0:
        return None
    digest = _file_digest(Path(target_path))
    path = Path(args.drafter_cache) / f"corpus-n{args.train_prompts}-seed{TRAIN_SEED}-{digest}.jsonl"
    if not path.is_file():
        log(f"the target answers {args.train_prompts} built-in prompts (seed {TRAIN_SEED}) for training: {path}")
        records = default_corpus(args.train_prompts, seed=TRAIN_SEED, target=target, tokenizer=tokenizer,
                                 max_new_tokens=args.max_new_tokens)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_chat_jsonl(str(path) + ".tmp", records)
        Path(str(path) + ".tmp").replace(path)
    return path


def drafter_cache_dir(args, target_path: str, name: str, corpus: Optional[Path]) -> Path:
    """Cache dir of the embedded ``name`` ('dflash' | 'vp') drafter; the key covers every training input."""
    tag = f"{name}-{args.dflash_labels}" if name == "dflash" else name
    key = hashlib.sha256(json.dumps([_file_digest(Path(target_path)), tag, args.train_steps, args.block_size,
                                     args.seed, str(corpus)]).encode()).hexdigest()[:10]
    return Path(args.drafter_cache) / f"tiny-{tag}-b{args.block_size}-s{args.train_steps}-{key}"


def embedded_drafters(args, target_path: str, target, tokenizer) -> tuple[str, str]:
    """Paths of a DFlash and a VP drafter for the tiny target: reused from the cache or trained now.

    Both train with ``d2sd.train`` (preset ``tiny``) on the same budget (``--train-steps``), block
    size and seed; they differ only in the D2 feature (and ``--dflash-labels`` for the DFlash one).
    The cache key covers the target files and every knob given here.
    """
    corpus = _training_corpus(args, target_path, target, tokenizer)
    paths = {}
    for name, d2 in (("dflash", False), ("vp", True)):
        root = drafter_cache_dir(args, target_path, name, corpus)
        done = root / "DONE"
        if done.is_file() and not args.retrain:
            paths[name] = done.read_text().strip()
            log(f"reusing the {name} drafter {paths[name]}")
            continue
        out = root / "run"
        if out.exists():  # a stale or interrupted run: start clean rather than resume it
            shutil.rmtree(out)
        options = dict(target=target_path, out=str(out), max_steps=args.train_steps, block_size=args.block_size,
                       seed=args.seed, save_every=args.train_steps, enable_d2_feature=d2)
        if not d2:
            options["dflash_labels"] = args.dflash_labels
        if corpus is not None:
            options["data"] = str(corpus)
        if args.device:
            options["device"] = str(args.device)
        log(f"training the {name} drafter ({args.train_steps} steps): d2sd.train.train(" +
            ", ".join(f"{k}={v!r}" for k, v in options.items()) + ")")
        try:
            result = train.train(**options)
        except (UsageError, train.TrainingStopped, FileNotFoundError) as e:
            raise UsageError(f"training the embedded {name} drafter failed: {e}") from None
        if result.checkpoint is None:
            raise UsageError(f"training the embedded {name} drafter wrote no checkpoint under {out}")
        paths[name] = str(result.checkpoint / "drafter")
        done.write_text(paths[name] + "\n")
    return paths["dflash"], paths["vp"]


# ---------------------------------------------------------------------------------------- metrics


def summarize(results: Sequence[DecodeResult], greedy: Optional[Sequence[DecodeResult]] = None) -> dict:
    """Aggregate decode results of one method (over prompts) into the report's metrics dict."""
    steps = [s for r in results for s in r.steps]
    n_steps = max(len(steps), 1)
    committed = sum(s.accepted + 1 for s in steps)
    width = max((s.drafted for s in steps), default=0)
    new_tokens = sum(len(r.tokens) for r in results)
    seconds = sum(r.total_s for r in results)
    out = {
        "prompts": len(results),
        "new_tokens": new_tokens,
        "target_forwards": len(steps),
        "acceptance_length": committed / n_steps,
        "per_position_acceptance": [sum(s.accepted >= j for s in steps) / n_steps for j in range(1, width + 1)],
        "accepted_histogram": [sum(s.accepted == a for s in steps) for a in range(width + 1)],
        "draft_ms_per_step": 1e3 * sum(s.draft_s for s in steps) / n_steps,
        "target_ms_per_step": 1e3 * sum(s.target_s for s in steps) / n_steps,
        "prefill_ms": 1e3 * sum(r.prefill_s for r in results) / max(len(results), 1),
        "rows_per_step": sum(s.rows for s in steps) / n_steps,
        "seconds": seconds,
        "tokens_per_s": new_tokens / seconds if seconds > 0 else 0.0,
        "kv_cache": all(r.kv_cache for r in results),
    }
    branch = [s for s in steps if s.winner >= 0]
    out["branch_win_rate"] = len(branch) / n_steps
    out["branch_win_by_prefix"] = {str(i): sum(s.winner == i for s in branch) for i in sorted({s.winner for s in branch})}
    if greedy is not None:
        bad = [i for i, (r, g) in enumerate(zip(results, greedy)) if r.tokens != g.tokens]
        out["lossless"] = not bad
        out["mismatched_prompts"] = bad
        g_new = sum(len(g.tokens) for g in greedy)
        g_s = sum(g.total_s for g in greedy)
        g_tps = g_new / g_s if g_s > 0 else 0.0
        out["speedup_vs_greedy"] = out["tokens_per_s"] / g_tps if g_tps > 0 else 0.0
    return out


def _table(report: dict) -> str:
    cols = ("dataset", "method", "accept_len", "tok/s", "speedup", "draft ms", "target ms", "rows", "lossless")
    lines = []
    for ds, entry in [*report["datasets"].items(), ("ALL", report)]:
        for m, r in entry["methods"].items():
            lines.append((ds, m, f"{r['acceptance_length']:.3f}", f"{r['tokens_per_s']:.1f}",
                          f"{r.get('speedup_vs_greedy', 1.0):.2f}x", f"{r['draft_ms_per_step']:.2f}",
                          f"{r['target_ms_per_step']:.2f}", f"{r['rows_per_step']:.2f}", str(r.get("lossless", True))))
    widths = [max(len(c), *(len(l[i]) for l in lines)) for i, c in enumerate(cols)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*cols), fmt.format(*("-" * w for w in widths)), *(fmt.format(*l) for l in lines), ""]
    out.append("per-position acceptance P(accepted >= j), all datasets:")
    for m, r in report["methods"].items():
        if m != "greedy":
            out.append(f"  {m:<7} " + " ".join(f"{x:.2f}" for x in r["per_position_acceptance"]))
    return "\n".join(out)


def _plot(report: dict, path: Path) -> Optional[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for m, r in report["methods"].items():
        if m == "greedy":
            continue
        acc = r["per_position_acceptance"]
        ax1.plot(range(1, len(acc) + 1), acc, marker="o", label=f"{m} (τ={r['acceptance_length']:.2f})")
    width = max((len(r["per_position_acceptance"]) for r in report["methods"].values()), default=0)
    ax1.set_xticks(range(1, width + 1))
    ax1.set_xlabel("draft position")
    ax1.set_ylabel("P(accepted ≥ position)")
    ax1.set_ylim(0, 1.05)
    ax1.set_title("per-position acceptance (all datasets)")
    ax1.legend()
    names = list(report["datasets"])
    methods = [m for m in report["methods"] if m != "greedy"]
    w = 0.8 / max(len(methods), 1)
    for j, m in enumerate(methods):
        vals = [report["datasets"][d]["methods"][m]["acceptance_length"] for d in names]
        ax2.bar([i + j * w for i in range(len(names))], vals, width=w, label=m)
    ax2.set_xticks([i + w * (len(methods) - 1) / 2 for i in range(len(names))], names)
    ax2.set_ylabel("acceptance length (tokens / target forward)")
    ax2.set_title(f"K={report['config']['k']}")
    ax2.legend(loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------- driver


def evaluate(
    target,
    datasets: dict[str, list[list[int]]],
    *,
    dflash=None,
    vp=None,
    methods: Sequence[str] = ("dflash", "d2sd"),
    k: int = 4,
    max_new_tokens: int = 64,
    eos_token_ids: Sequence[int] = (),
    kv_cache: bool = True,
    warmup: bool = True,
    distinct_branches: bool = False,
) -> dict:
    """Decode every dataset with plain greedy and each method; return the report dict (without 'config')."""
    check_drafters(target.config, dflash, vp, k if "d2sd" in methods else None)
    layers = sorted({int(l) for d in (dflash, vp) if d is not None for l in d.config.target_layer_ids})
    d_dflash = SlotDrafter(dflash, layers) if dflash is not None else None
    d_vp = SlotDrafter(vp, layers) if vp is not None else None
    methods = ["greedy", *[m for m in methods if m != "greedy"]]
    kw = dict(dflash=d_dflash, vp=d_vp, k=k, eos_token_ids=eos_token_ids, distinct_branches=distinct_branches)

    def run(method, prompt, n):
        # plain decoding does not need the hidden states: do not make it pay for them
        ver = TargetVerifier(target, [] if method == "greedy" else layers, use_cache=kv_cache)
        return decode(ver, prompt, method=method, max_new_tokens=n, **kw)

    if warmup:  # first calls pay for lazy initialization; keep them out of the timings
        first = next((p for ps in datasets.values() for p in ps), None)
        for m in methods if first is not None else ():
            run(m, first, min(8, max_new_tokens))
    per_ds, everything = {}, {m: [] for m in methods}
    for name, prompts in datasets.items():
        res = {m: [] for m in methods}
        for p in prompts:  # methods interleaved per prompt, so load drift hits them alike
            for m in methods:
                res[m].append(run(m, p, max_new_tokens))
        per_ds[name] = {"prompts": len(prompts),
                        "methods": {m: summarize(res[m], res["greedy"]) for m in methods}}
        for m in methods:
            everything[m].extend(res[m])
    overall = {m: summarize(everything[m], everything["greedy"]) for m in methods}
    report = {"schema_version": SCHEMA_VERSION, "methods": overall, "datasets": per_ds,
              "lossless": all(r["lossless"] for r in overall.values())}
    if "dflash" in overall and "d2sd" in overall and overall["dflash"]["acceptance_length"] > 0:
        report["d2sd_over_dflash"] = overall["d2sd"]["acceptance_length"] / overall["dflash"]["acceptance_length"]
    return report


def check_output_path(path: Path, what: str) -> None:
    """Refuse, before any work, an output path that is a directory or lies under a file / read-only dir."""
    problem = "is a directory, expected a file path" if path.is_dir() else output_path_problem(path.parent)
    if problem:
        raise UsageError(f"{what} {path}: {problem}")


def _eos_ids(target, tokenizer) -> list[int]:
    ids = set()
    for src in (getattr(target, "generation_config", None), getattr(target, "config", None), tokenizer):
        v = getattr(src, "eos_token_id", None)
        if v is None:
            continue
        ids.update([int(v)] if isinstance(v, int) else [int(x) for x in v])
    return sorted(ids)


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_output_path(Path(args.report), "--report")
        if args.plot:
            check_output_path(Path(args.plot), "--plot")
        for path in args.data or []:
            if not Path(path).is_file():
                raise UsageError(f"--data {path}: not a file (pass a prompts JSONL file)")
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            raise UsageError(f"--methods: unknown {unknown}; choose from {list(METHODS)}")
        if args.max_new_tokens < 1:
            raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if args.threads is None and args.target is None and device.type == "cpu":
            args.threads = 1  # the tiny target is far too small to gain from intra-op threads
        if args.threads is not None:
            torch.set_num_threads(max(1, args.threads))
        dtype = _dtype(args.dtype, device)
        target_path = args.target
        if target_path is None:
            target_path = str(tiny_target_path())
        need_dflash = any(m in ("dflash", "d2sd") for m in methods)
        need_vp = "d2sd" in methods
        missing = (need_dflash and args.dflash is None) or (need_vp and args.vp is None)
        if missing and args.target is not None:
            raise UsageError("with --target, pass --dflash (and --vp for d2sd): drafters are only trained for the tiny target")
        log(f"target {target_path} on {device} ({dtype})")
        target, tokenizer = _load_target(target_path, device, dtype)
        dflash_path, vp_path = args.dflash, args.vp
        if missing:
            trained = embedded_drafters(args, target_path, target, tokenizer)
            dflash_path, vp_path = dflash_path or trained[0], vp_path or trained[1]
        dflash = _load_drafter(dflash_path, target, device, dtype) if need_dflash else None
        vp = _load_drafter(vp_path, target, device, dtype) if need_vp else None
        datasets = load_datasets(args, tokenizer)
        eos = _eos_ids(target, tokenizer) if args.stop_at_eos else []
        t0 = time.perf_counter()
        report = evaluate(target, datasets, dflash=dflash, vp=vp, methods=methods, k=args.k,
                          max_new_tokens=args.max_new_tokens, eos_token_ids=eos, kv_cache=args.kv_cache,
                          distinct_branches=args.distinct_branches)
    except (UsageError, ValueError, FileNotFoundError) as e:
        print(f"python -m d2sd.eval: error: {e}", file=sys.stderr, flush=True)
        return 2
    ref = dflash if dflash is not None else vp
    report["config"] = {
        "target": target_path, "dflash": dflash_path if dflash is not None else None,
        "vp": vp_path if vp is not None else None, "k": args.k, "max_new_tokens": args.max_new_tokens,
        "device": str(device), "dtype": str(dtype).replace("torch.", ""), "kv_cache": args.kv_cache,
        "distinct_branches": args.distinct_branches,
        "block_size": int(ref.config.block_size) if ref is not None else None,
        "dflash_labels": getattr(dflash.config, "dflash_labels", None) if dflash is not None else None,
        "eos_token_ids": eos, "datasets": {n: len(p) for n, p in datasets.items()},
        "seconds": time.perf_counter() - t0,
    }
    print(_table(report))
    if "d2sd_over_dflash" in report:
        log(f"D2SD / DFlash acceptance length: {report['d2sd_over_dflash']:.3f}x (K={args.k})")
    log(f"lossless (every method == plain greedy, token for token): {report['lossless']}")
    out = Path(args.report)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        os.replace(tmp, out)
    except OSError as e:
        print(f"python -m d2sd.eval: error: cannot write --report {out}: {e}", file=sys.stderr, flush=True)
        return 2
    log(f"report: {out}")
    plot = _plot(report, Path(args.plot) if args.plot else out.with_suffix(".png"))
    log(f"plot:   {plot}" if plot else "plot:   not drawn (matplotlib is not installed: pip install matplotlib)")
    return 0 if report["lossless"] else 1


if __name__ == "__main__":
    sys.exit(main())
