"""End-to-end ``python -m d2sd.train`` on a GPU at a real shape: what a user of the command gets.

Builds a Qwen3-4B-shaped target with random bf16 weights (36 layers, hidden 2560, vocab 151936,
saved with ``save_pretrained`` beside the shipped tiny tokenizer) and chat records of 3-4k tokens
in a work dir, then runs the real entry point in a subprocess, online (the target runs every step)
and from a target cache written by ``python -m d2sd.cache``. Reports steady tokens/s (windows
without a save), ms per step, the first step's seconds (compile included), the longest save stall
of the training loop and peak GPU memory, read from the run's ``metrics.jsonl`` and log.

    python benchmarks/train_e2e.py --work /tmp/e2e                  # both modes, table last
    python benchmarks/train_e2e.py --work /tmp/e2e --modes online --steps 20 --json out.json
    python benchmarks/train_e2e.py --work /tmp/e2e --tiny             # CPU-sized smoke run of the harness

``benchmarks/test_train_e2e.py`` runs the same under pytest-benchmark.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
WORDS = ("the model reads a long answer and checks each step of the sum so that every number "
         "is right before it moves on to the next part of the task 12 + 7 = 19 then 19 * 3 = 57 "
         "apples pens coins cards eggs friends boxes and more words to fill the record").split()
QWEN3_4B = dict(hidden_size=2560, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                intermediate_size=9728, vocab_size=151936, max_position_embeddings=40960)
TINY = dict(hidden_size=64, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            intermediate_size=160, vocab_size=1024, max_position_embeddings=4096)


def tiny_tokenizer_dir() -> Path:
    return REPO / "d2sd" / "assets" / "tiny-target"


def build_target(out: Path, dims: dict, device: str, seed: int = 0) -> Path:
    """A Qwen3 target of shape ``dims`` with random bf16 weights, saved with the tiny tokenizer."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    if (out / "config.json").is_file():
        return out
    cfg = Qwen3Config(**dims, rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
                      tie_word_embeddings=False)
    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = Qwen3ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    for f in TOKENIZER_FILES:
        if (tiny_tokenizer_dir() / f).is_file():
            shutil.copy(tiny_tokenizer_dir() / f, tmp / f)
    os.replace(tmp, out)
    return out


def make_chats(path: Path, n: int, min_tokens: int, max_tokens: int, seed: int = 0) -> Path:
    """``n`` chat records whose rendered length is ``min_tokens..max_tokens`` tokens (tiny tokenizer)."""
    from transformers import AutoTokenizer

    if path.is_file():
        return path
    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir()))
    rng = random.Random(seed)
    probe = " ".join(rng.choice(WORDS) for _ in range(400))
    chars_per_token = len(probe) / len(tok(probe)["input_ids"])
    with open(path.with_suffix(".tmp"), "w") as f:
        for _ in range(n):
            want = rng.randint(min_tokens, max_tokens)
            words, chars = [], 0
            while chars < want * chars_per_token * 0.97:
                w = rng.choice(WORDS)
                words.append(w)
                chars += len(w) + 1
            cut = max(1, len(words) // 10)
            rec = {"messages": [{"role": "user", "content": " ".join(words[:cut])},
                                {"role": "assistant", "content": " ".join(words[cut:])}]}
            f.write(json.dumps(rec) + "\n")
    os.replace(path.with_suffix(".tmp"), path)
    return path


@dataclass
class RunResult:
    mode: str
    steps: int
    tokens_per_s: float  # steady: logging windows without a save
    tokens_per_s_with_saves: float  # every window after the warm-up, saves included
    ms_per_step: float  # median over the warm windows
    first_step_s: Optional[float]
    save_stall_s: float  # the longest save stall of the loop
    peak_mem_gib: Optional[float]
    seconds: float  # the whole command, process start to exit
    final_loss: Optional[float]
    extra: dict = field(default_factory=dict)


def _env() -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_train(mode: str, argv: list[str], out: Path, warmup_rows: int = 3, timeout: int = 900,
              log_file: Optional[Path] = None) -> RunResult:
    """Run ``python -m d2sd.train ARGV --out OUT --log-every 1`` and summarize its metrics."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "d2sd.train", *argv, "--out", str(out), "--log-every", "1"]
    t0 = time.time()
    proc = subprocess.run(cmd, env=_env(), cwd=str(REPO), capture_output=True, text=True, timeout=timeout)
    seconds = time.time() - t0
    text = proc.stdout + proc.stderr
    if log_file is not None:
        log_file.write_text(text)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode}: `{' '.join(cmd)}` exited {proc.returncode}:\n{text[-4000:]}")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # gigabytes each at the real shape
    if log_file is not None and (out / "profile.txt").is_file():
        shutil.copy(out / "profile.txt", log_file.with_suffix(".profile.txt"))
    warm = [r for r in rows[warmup_rows:] if not r.get("profiled")] or rows
    dur = [r["tokens"] / r["window_tokens_per_s"] for r in warm]
    quiet = [(r, d) for r, d in zip(warm, dur) if r["save_stall_s"] == 0]
    m = re.search(r"first step: ([0-9.]+)s", text)
    return RunResult(
        mode=mode,
        steps=len(rows),
        tokens_per_s=sum(r["tokens"] for r, _ in quiet) / max(sum(d for _, d in quiet), 1e-9),
        tokens_per_s_with_saves=sum(r["tokens"] for r in warm) / max(sum(dur), 1e-9),
        ms_per_step=statistics.median(r["step_s"] for r in warm) * 1e3,
        first_step_s=float(m.group(1)) if m else None,
        save_stall_s=max((r["save_stall_s"] for r in rows), default=0.0),
        peak_mem_gib=max((r.get("peak_mem_gib") or 0 for r in rows), default=None),
        seconds=seconds,
        final_loss=rows[-1]["loss"] if rows else None,
        extra={
            # the loop's own cost of a save (host copy), apart from waiting for the previous write
            "save_snapshot_s": max((r["save_stall_s"] - r.get("save_wait_s", 0) for r in rows), default=0.0),
            "save_wait_s": max((r.get("save_wait_s", 0) for r in rows), default=0.0),
            "save_write_s": max((r.get("save_write_s") or 0 for r in rows), default=0.0),
            "data_wait_share": sum(r.get("data_wait_s", 0) for r in warm) / max(sum(dur), 1e-9),
        },
    )


def build_cache(target: Path, data: Path, out: Path, layer_ids: list[int], max_length: int) -> Path:
    if (out / "manifest.json").is_file():
        return out
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "d2sd.cache", "--target", str(target), "--data", str(data), "--out", str(out),
           "--layer-ids", *map(str, layer_ids), "--max-length", str(max_length), "--batch-size", "4"]
    proc = subprocess.run(cmd, env=_env(), cwd=str(REPO), capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"cache: exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-4000:]}")
    return out


@dataclass
class Setup:
    work: Path
    tiny: bool = False
    records: int = 48
    steps: int = 24
    save_every: int = 8
    extra: list[str] = field(default_factory=list)

    @property
    def device(self) -> str:
        return "cpu" if self.tiny else "cuda"

    def common(self) -> list[str]:
        if self.tiny:
            return ["--preset", "tiny", "--max-steps", str(self.steps), "--save-every", str(self.save_every),
                    "--global-batch-size", "2", "--micro-batch-size", "1", "--max-length", "256",
                    "--target-layer-ids", "1", "3", "5", "--device", "cpu", *self.extra]
        return ["--preset", "qwen3-4b", "--max-steps", str(self.steps), "--save-every", str(self.save_every),
                "--global-batch-size", "2", "--micro-batch-size", "1", *self.extra]

    def prepare(self) -> tuple[Path, Path]:
        self.work.mkdir(parents=True, exist_ok=True)
        target = build_target(self.work / ("target-tiny" if self.tiny else "target-qwen3-4b"),
                              TINY if self.tiny else QWEN3_4B, self.device)
        lo, hi = (120, 250) if self.tiny else (3000, 4000)
        data = make_chats(self.work / f"chats-{lo}-{hi}-{self.records}.jsonl", self.records, lo, hi)
        return target, data

    def layer_ids(self) -> list[int]:
        return [1, 3, 5] if self.tiny else [1, 9, 17, 25, 33]


def run_mode(setup: Setup, mode: str, log_dir: Optional[Path] = None) -> RunResult:
    target, data = setup.prepare()
    argv = ["--target", str(target), *setup.common()]
    if mode == "online":
        argv += ["--data", str(data)]
    elif mode == "cache":
        max_len = 256 if setup.tiny else 4096
        cache = build_cache(target, data, setup.work / f"cache-{data.stem}", setup.layer_ids(), max_len)
        argv += ["--cache", str(cache)]
    else:
        raise ValueError(f"mode must be online or cache, got {mode!r}")
    log_file = (log_dir / f"train-{mode}.log") if log_dir else None
    return run_train(mode, argv, setup.work / f"run-{mode}", log_file=log_file)


def table(results: list[RunResult]) -> str:
    head = ("| mode | tokens/s (steady) | tokens/s (with saves) | ms/step | first step s | save stall s "
            "(snapshot / wait / write) | data wait | peak GiB |")
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for r in results:
        x = r.extra
        lines.append(f"| {r.mode} | {r.tokens_per_s:,.0f} | {r.tokens_per_s_with_saves:,.0f} | {r.ms_per_step:.1f} | "
                     f"{r.first_step_s if r.first_step_s is not None else float('nan'):.1f} | {r.save_stall_s:.2f} "
                     f"({x.get('save_snapshot_s', 0):.2f} / {x.get('save_wait_s', 0):.2f} / {x.get('save_write_s', 0):.1f}) | "
                     f"{100 * x.get('data_wait_share', 0):.1f}% | {(r.peak_mem_gib or 0):.1f} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="/tmp/d2sd-e2e", help="work dir (target, data, cache, runs are reused)")
    p.add_argument("--modes", default="online,cache", help="comma list of online, cache")
    p.add_argument("--steps", type=int, default=24, help="optimizer steps per run")
    p.add_argument("--save-every", type=int, default=8, help="checkpoint interval (the save stall is measured)")
    p.add_argument("--records", type=int, default=48, help="chat records of 3-4k tokens")
    p.add_argument("--tiny", action="store_true", help="CPU-sized target and records (a smoke run of the harness)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--logs", help="dir for each run's full log")
    p.add_argument("--train-args", default="", help="extra arguments for every python -m d2sd.train run")
    args = p.parse_args(argv)
    setup = Setup(Path(args.work), tiny=args.tiny, records=args.records, steps=args.steps,
                  save_every=args.save_every, extra=args.train_args.split())
    log_dir = Path(args.logs) if args.logs else None
    if log_dir:
        log_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for mode in [m for m in args.modes.split(",") if m]:
        t0 = time.time()
        r = run_mode(setup, mode, log_dir)
        print(f"[e2e] {mode}: {json.dumps(asdict(r))} ({time.time() - t0:.0f}s)", flush=True)
        results.append(r)
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=1))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
