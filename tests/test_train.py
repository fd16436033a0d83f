"""python -m d2sd.train: exact resume after SIGKILL, SIGTERM checkpoints, CLI layering, bad input.

The end-to-end runs use the shipped tiny target, a small chat JSONL and a handful of steps, in
subprocesses (so a hard kill is a real SIGKILL) with one thread each.
"""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from d2sd import checkpoint as ckpt
from d2sd import train
from d2sd.config import TrainConfig, get_preset

REPO = Path(__file__).resolve().parents[1]
STEPS = 12
QUESTIONS = [
    ("Tom has 12 apples . Tom gets 7 more apples . How many apples does Tom have now ?",
     "Tom starts with 12 apples . Tom gets 7 more . 12 + 7 = 19 . The answer is 19 ."),
    ("Anna buys 3 boxes of pens . Each of the boxes has 4 pens . How many pens does Anna buy ?",
     "There are 3 boxes with 4 pens each . 3 * 4 = 12 . The answer is 12 ."),
    ("Ben has 40 coins . Ben gives 15 coins to Mia . How many coins does Ben have left ?",
     "Ben starts with 40 coins . Ben gives away 15 . 40 - 15 = 25 . The answer is 25 ."),
    ("Lily shares 18 eggs equally among 6 friends . How many eggs does each friend get ?",
     "18 eggs are shared by 6 friends . 18 / 6 = 3 . The answer is 3 ."),
    ("Sam has 9 cards . Sam gets 30 more cards . How many cards does Sam have now ?",
     "Sam starts with 9 cards . Sam gets 30 more . 9 + 30 = 39 . The answer is 39 ."),
]


def _chat(q, a):
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "chats.jsonl"
    with open(path, "w") as f:
        for q, a in QUESTIONS:
            f.write(json.dumps(_chat(q, a)) + "\n")
    return path


def _args(data_file, out, *extra):
    return [
        "--data", str(data_file), "--out", str(out), "--max-steps", str(STEPS), "--save-every", "2",
        "--log-every", "1", "--global-batch-size", "2", "--micro-batch-size", "1", "--num-anchors", "8",
        "--max-length", "96", "--keep-last", "3", "--warmup-ratio", "0.2", "--lr", "3e-3", *extra,
    ]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("WORLD_SIZE", None)
    return env


def _start(args):
    return subprocess.Popen(
        [sys.executable, "-m", "d2sd.train", *args], cwd=REPO, env=_env(),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def _run(args, timeout=180):
    p = _start(args)
    out, _ = p.communicate(timeout=timeout)
    assert p.returncode == 0, out
    return out


def _losses(out_dir):
    rows = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def _logged_steps(out_dir):
    path = Path(out_dir) / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def _interrupt(args, sig, after_step, timeout=120):
    """Start a run, send ``sig`` once ``after_step`` steps are logged; returns (returncode, output)."""
    out_dir = Path(args[args.index("--out") + 1])
    p = _start(args)
    t0 = time.time()
    while _logged_steps(out_dir) < after_step:
        assert p.poll() is None, f"run ended before step {after_step}:\n{p.stdout.read()}"
        assert time.time() - t0 < timeout, "run too slow"
        time.sleep(0.01)
    p.send_signal(sig)
    out, _ = p.communicate(timeout=timeout)
    return p.returncode, out


@pytest.fixture(scope="module")
def reference_run(data_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    text = _run(_args(data_file, out))
    return out, text


def test_uninterrupted_run_learns_and_reports(reference_run):
    out, text = reference_run
    losses = _losses(out)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert all(math.isfinite(v) for v in losses.values())
    first, last = sum(losses[s] for s in (1, 2)) / 2, sum(losses[s] for s in (STEPS - 1, STEPS)) / 2
    assert last < first - 0.5, losses
    for what in ("run dir:", "metrics:", "curves:", "checkpoint:"):
        assert what in text
    assert (out / "curves.png").stat().st_size > 0
    final = out / "checkpoints" / ckpt.step_dir_name(STEPS)
    ckpt.verify_checkpoint(final)
    state = ckpt.load_trainer_state(final)
    assert state["step"] == STEPS and set(state["rng"]) >= {"torch", "python", "numpy", "anchor_generator"}
    # keep_last=3 of the checkpoints at 2, 4, ..., 12.
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints")] == [
        ckpt.step_dir_name(s) for s in (8, 10, 12)
    ]
    from d2sd.models import load_drafter

    drafter = load_drafter(str(final / "drafter"))
    assert drafter.config.enable_d2_feature and drafter.config.num_anchors == 8


def test_sigkill_then_resume_matches_uninterrupted(reference_run, data_file, tmp_path):
    want = _losses(reference_run[0])
    out = tmp_path / "run"
    rc, text = _interrupt(_args(data_file, out), signal.SIGKILL, after_step=5)
    assert rc == -signal.SIGKILL, text
    killed_at = _logged_steps(out)
    assert killed_at < STEPS
    resume_text = _run(["--resume", str(out)])
    assert "resumed from" in resume_text
    got = _losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    for s in range(1, STEPS + 1):
        assert abs(got[s] - want[s]) <= 1e-6 * max(1.0, abs(want[s])), (s, got[s], want[s])


def test_sigterm_saves_a_checkpoint_exits_cleanly_and_resumes_exactly(reference_run, data_file, tmp_path):
    want = _losses(reference_run[0])
    out = tmp_path / "run"
    rc, text = _interrupt(_args(data_file, out, "--save-every", "0"), signal.SIGTERM, after_step=3)
    assert rc == 0, text
    assert "stop signal: checkpoint saved at step" in text
    stopped_at = _logged_steps(out)
    assert 3 <= stopped_at < STEPS
    # Only the SIGTERM checkpoint exists (save_every 0), at the last finished step.
    (only,) = ckpt.list_checkpoints(out / "checkpoints")
    assert ckpt.verify_checkpoint(only)["step"] == stopped_at
    _run(["--resume", str(out)])
    got = _losses(out)
    for s in range(1, STEPS + 1):
        assert abs(got[s] - want[s]) <= 1e-6 * max(1.0, abs(want[s])), (s, got[s], want[s])


def test_resume_refuses_corrupt_newest_checkpoint(reference_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(reference_run[0], run)
    newest = run / "checkpoints" / ckpt.step_dir_name(STEPS)
    f = newest / "drafter" / "model-00001-of-00002.safetensors"  # the trainable shard
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    out = _run(["--resume", str(run), "--max-steps", str(STEPS)])
    assert "refusing corrupt checkpoint" in out and ckpt.step_dir_name(STEPS) in out
    assert f"resuming from the older valid checkpoint {run / 'checkpoints' / ckpt.step_dir_name(STEPS - 2)}" in out
    assert "resumed from" in out
    # The rerun rewrote step 12 from step 10, with the same losses as the first time.
    ckpt.verify_checkpoint(newest)
    assert _losses(run) == pytest.approx(_losses(reference_run[0]), rel=1e-6)


# ------------------------------------------------------------------ in-process pieces


def _main_error(argv, capsys):
    assert train.main(argv) == 2
    return capsys.readouterr().err


def test_fresh_run_into_a_used_run_dir_is_refused(reference_run, data_file, capsys):
    before = sorted(p.name for p in ckpt.list_checkpoints(reference_run[0] / "checkpoints"))
    err = _main_error(["--data", str(data_file), "--out", str(reference_run[0])], capsys)
    assert "already holds checkpoints" in err and "--resume" in err
    assert sorted(p.name for p in ckpt.list_checkpoints(reference_run[0] / "checkpoints")) == before


def test_missing_target_path(capsys, data_file, tmp_path):
    err = _main_error(["--target", str(tmp_path / "no-such-model"), "--data", str(data_file)], capsys)
    assert "target path" in err and "does not exist" in err and "no-such-model" in err


def test_target_layers_must_fit_the_preset(capsys, data_file, tmp_path):
    err = _main_error(["--preset", "qwen3-4b", "--data", str(data_file), "--out", str(tmp_path / "r")], capsys)
    assert "preset 'qwen3-4b' uses target layers [1, 9, 17, 25, 33]" in err and "layers" in err


def test_malformed_jsonl_names_file_and_line(capsys, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(_chat(*QUESTIONS[0])) + "\n" + '{"messages": [oops\n')
    err = _main_error(["--data", str(bad), "--out", str(tmp_path / "r")], capsys)
    assert "bad.jsonl" in err and "2" in err


def test_missing_data_file(capsys, tmp_path):
    err = _main_error(["--data", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "r")], capsys)
    assert "none.jsonl" in err and "no such file" in err


def test_resume_of_nothing(capsys, tmp_path):
    err = _main_error(["--resume", str(tmp_path)], capsys)
    assert "no checkpoint" in err


def test_bad_batch_split(capsys, data_file, tmp_path):
    err = _main_error(["--data", str(data_file), "--global-batch-size", "3", "--micro-batch-size", "2",
                       "--out", str(tmp_path / "r")], capsys)
    assert "global_batch_size=3 must be a multiple" in err


def test_every_knob_is_an_option_with_help():
    import dataclasses

    text = train.build_parser().format_help()
    for f in dataclasses.fields(TrainConfig):
        assert f.metadata.get("help"), f"TrainConfig.{f.name} has no help line"
        assert "--" + f.name.replace("_", "-") in text
    for name in (*train.DRAFTER_KNOBS, "d2", "no-d2", "dflash-labels", "backend", "resume", "cache", "fsdp"):
        assert "--" + name.replace("_", "-") in text


def test_options_layer_over_the_preset(tmp_path):
    run = train.resolve_run(["--no-d2", "--dflash-labels", "same", "--lr", "3e-4", "--target-layer-ids", "0", "2",
                             "--loss-decay-gamma", "none", "--out", str(tmp_path)])
    preset = get_preset("tiny")
    assert run.preset == "tiny" and run.out == tmp_path
    assert run.train.lr == 3e-4
    assert run.train.max_steps == preset["train"].get("max_steps", TrainConfig().max_steps)
    assert run.drafter_args["enable_d2_feature"] is False and run.drafter_args["dflash_labels"] == "same"
    assert run.drafter_args["target_layer_ids"] == [0, 2] and run.drafter_args["loss_decay_gamma"] is None
    assert run.drafter_args["num_draft_layers"] == preset["drafter"]["num_draft_layers"]
    default = train.resolve_run([])
    assert default.embedded and default.target is None and default.out.parts[0] == "runs"
    assert default.drafter_args["enable_d2_feature"] is True


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_schedule_warmup_then_decay(schedule):
    t = TrainConfig(lr=1.0, max_steps=20, warmup_ratio=0.2, schedule=schedule, min_lr_ratio=0.1)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=t.lr)
    sched = train.make_scheduler(opt, t)
    lrs = []
    for _ in range(t.max_steps):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    if schedule == "constant":
        assert lrs[4:] == pytest.approx([1.0] * 16)
    else:
        assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))
        assert 0.1 <= lrs[-1] < 0.2
        mid = 0.1 + 0.9 * (0.5 * (1 + math.cos(math.pi * 8 / 16)) if schedule == "cosine" else 1 - 8 / 16)
        assert lrs[12] == pytest.approx(mid)


@pytest.mark.parametrize("n,gbs,mbs,world", [(7, 4, 1, 2), (5, 6, 3, 1), (11, 4, 2, 2)])
def test_batcher_is_a_resumable_rank_split_of_one_order(n, gbs, mbs, world):
    def stream(steps, rank, world, resume_at=None):
        b = train.Batcher(n, gbs, mbs, world, rank, seed=3)
        out = []
        for s in range(steps):
            if s == resume_at:
                state = b.state_dict()
                b = train.Batcher(n, gbs, mbs, world, rank, seed=3)
                b.load_state_dict(state)
            out.append(b.next())
        return out

    single = stream(6, 0, 1)
    per_rank = [stream(6, r, world) for r in range(world)]
    for s in range(6):
        merged = sorted((i, m) for r in range(world) for i, m in per_rank[r][s])
        assert [m for _, m in merged] == [m for _, m in single[s]]
    assert stream(6, 0, world, resume_at=3) == per_rank[0]
    # Every record is seen once per epoch.
    flat = [k for s in single for _, m in s for k in m]
    assert sorted(flat[:n]) == list(range(n))


def test_trains_from_an_offline_cache(target_cache, tmp_path):
    out = tmp_path / "run"
    args = ["--cache", str(target_cache), "--out", str(out), "--max-steps", "3", "--global-batch-size", "2",
            "--micro-batch-size", "2", "--num-anchors", "8", "--log-every", "1"]
    assert train.main(args) == 0
    losses = _losses(out)
    assert sorted(losses) == [1, 2, 3] and all(math.isfinite(v) and v > 0 for v in losses.values())
    state = ckpt.load_trainer_state(ckpt.list_checkpoints(out / "checkpoints")[-1])
    assert state["drafter_config"]["target_layer_ids"] == [0, 2]


def test_cache_layers_must_match(target_cache, tmp_path, capsys):
    err = _main_error(["--cache", str(target_cache), "--target-layer-ids", "1", "3", "--out", str(tmp_path)], capsys)
    assert "holds target layers [0, 2], the drafter wants [1, 3]" in err


def test_resume_with_a_different_target_is_refused(reference_run, tmp_path, capsys):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from d2sd.assets import tiny_target_path

    cfg = AutoConfig.from_pretrained(tiny_target_path())
    cfg.hidden_size, cfg.head_dim = 64, 16
    other = tmp_path / "other-target"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(other)
    AutoTokenizer.from_pretrained(tiny_target_path()).save_pretrained(other)
    err = _main_error(["--resume", str(reference_run[0]), "--target", str(other), "--max-steps", str(STEPS + 1)],
                      capsys)
    assert "trained on a target with hidden 128" in err and "has hidden 64" in err


def test_skipped_and_truncated_records_are_counted_and_reported(tmp_path, capsys):
    data = tmp_path / "mixed.jsonl"
    long_answer = " ".join(["Tom gets 7 more apples ."] * 40)
    records = [_chat(*QUESTIONS[0]), {"messages": [{"role": "user", "content": "no answer here"}]},
               _chat(QUESTIONS[1][0], long_answer), _chat(*QUESTIONS[2])]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    args = ["--data", str(data), "--out", str(tmp_path / "r"), "--max-steps", "1", "--max-length", "64",
            "--global-batch-size", "1", "--micro-batch-size", "1", "--num-anchors", "4"]
    assert train.main(args) == 0
    out = capsys.readouterr().out
    assert "skipped 1 record(s) with no assistant tokens" in out
    assert "truncated 1 record(s) to --max-length 64" in out
    assert "records 4, samples 3" in out


def test_embedded_default_regenerates_responses_with_the_target(tmp_path, capsys):
    args = ["--out", str(tmp_path / "r"), "--max-steps", "2", "--max-new-tokens", "8", "--save-every", "0",
            "--log-every", "1"]
    assert train.main(args) == 0
    out = capsys.readouterr().out
    assert f"the target regenerates {train.EMBEDDED_PROMPTS} built-in responses" in out
    assert f"samples {train.EMBEDDED_PROMPTS}" in out
    assert sorted(_losses(tmp_path / "r")) == [1, 2]
    state = ckpt.load_trainer_state(ckpt.list_checkpoints(tmp_path / "r" / "checkpoints")[-1])
    assert state["drafter_config"]["enable_d2_feature"] is True and state["drafter_config"]["backend"] == "auto"
