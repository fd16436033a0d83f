"""Issue #24: no silent divergence, no lost checkpoints or metrics, one-line errors for bad input.

In-process and fast: the tiny target, a few records, 1-3 steps. Each test names the issue item
it covers. The kill / disk-full / fuzzing cases live in test_faults.py.
"""
import errno
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

import d2kernels
from d2kernels import layout
from d2sd import checkpoint as ckpt
from d2sd import train
from d2sd.cache import TargetCache
from d2sd.models.checkpoint import read_weights

ANSWER = "Tom starts with 12 apples . Tom gets 7 more . 12 + 7 = 19 . The answer is 19 ."


def _chat(q, a):
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "chats.jsonl"
    path.write_text("".join(json.dumps(_chat(f"Tom has {i} apples . How many ?", ANSWER)) + "\n" for i in range(4)))
    return path


def _args(data, out, *extra):
    return ["--data", str(data), "--out", str(out), "--max-steps", "2", "--save-every", "1", "--log-every", "1",
            "--global-batch-size", "2", "--micro-batch-size", "2", "--num-anchors", "4", "--max-length", "64",
            "--keep-last", "1", "--schedule", "constant", "--warmup-ratio", "0", "--lr", "1e-3", *extra]


def _main(argv, capsys, rc):
    assert train.main(argv) == rc
    cap = capsys.readouterr()
    return cap.out, cap.err


def _one_line_error(err, *needles):
    assert "Traceback" not in err, err
    # Progress bars (loading the target) share stderr; the error is the one line the command printed.
    lines = [ln for ln in err.splitlines() if ln.startswith("python -m d2sd.")]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def base_run(data_file, tmp_path_factory):
    """A finished 2-step run (checkpoint at step 2, keep_last 1) to resume from."""
    out = tmp_path_factory.mktemp("base") / "run"
    assert train.main(_args(data_file, out)) == 0
    return out


def _copy(run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


def _rows(out):
    return [json.loads(ln) for ln in (Path(out) / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------ item 1: non-finite values


def _cache_copy(target_cache, tmp_path):
    dst = tmp_path / "cache"
    shutil.copytree(target_cache, dst)
    return dst


def _poke(cache, i, field, data: bytes, at=0):
    """Overwrite bytes of sample ``i``'s ``field`` array in its shard."""
    c = TargetCache(cache)
    rec = c.record(i)
    shard = cache / f"shard-{rec['shard_id']:05d}.bin"
    with open(shard, "r+b") as f:
        f.seek(rec[f"{field}_offset"] + at)
        f.write(data)


def _cache_args(cache, out, *extra):
    return ["--cache", str(cache), "--out", str(out), "--save-every", "1", "--log-every", "1",
            "--global-batch-size", "6", "--micro-batch-size", "6", "--num-anchors", "4", "--keep-last", "1",
            "--max-length", "64", *extra]


def test_nan_in_a_cached_sample_stops_naming_the_step_and_keeps_the_last_good_checkpoint(target_cache, tmp_path, capsys):
    """Item 1: one bf16 NaN in one cached sample: exit 3, one line naming the step, no NaN checkpoint,
    the previous checkpoint neither overwritten nor pruned (keep_last 1)."""
    cache = _cache_copy(target_cache, tmp_path)
    out = tmp_path / "r"
    _main(_cache_args(cache, out, "--max-steps", "1"), capsys, 0)
    good = ckpt.list_checkpoints(out / "checkpoints")
    assert [p.name for p in good] == [ckpt.step_dir_name(1)]
    _poke(cache, 2, "target_hidden_states", b"\xc0\x7f")  # bf16 NaN, little-endian
    _, err = _main(["--resume", str(out), "--max-steps", "3"], capsys, train.EXIT_STOPPED)
    _one_line_error(err, "non-finite loss nan and gradient norm nan at step 2", "no checkpoint written", ckpt.step_dir_name(1))
    assert ckpt.list_checkpoints(out / "checkpoints") == good
    ckpt.verify_checkpoint(good[0])
    assert max(r["step"] for r in _rows(out)) == 1


def test_skip_nonfinite_skips_up_to_n_steps_then_stops(target_cache, tmp_path, capsys):
    """Item 1: --skip-nonfinite N zeroes the bad step's gradient, steps no optimizer, then stops after N."""
    cache = _cache_copy(target_cache, tmp_path)
    _poke(cache, 0, "target_hidden_states", b"\xc0\x7f")  # every step holds sample 0 (batch = all 6)
    out = tmp_path / "r"
    stdout, err = _main(_cache_args(cache, out, "--max-steps", "5", "--skip-nonfinite", "2"), capsys,
                        train.EXIT_STOPPED)
    assert stdout.count("step skipped, no optimizer step") == 2
    _one_line_error(err, "at step 3")
    # The skipped steps saved checkpoints of the untouched (finite) weights; nothing non-finite on disk.
    last = ckpt.list_checkpoints(out / "checkpoints")[-1]
    assert last.name == ckpt.step_dir_name(2)

    assert all(torch.isfinite(t).all() for t in read_weights(str(last / "drafter")).values())


def test_check_finite_reads_loss_and_gradient_norm():
    assert train.check_finite(1.5, 2.0) is None
    assert train.check_finite(1.5, math.inf) == "non-finite gradient norm inf"
    assert train.check_finite(float("nan"), 1.0) == "non-finite loss nan"
    assert train.check_finite(float("nan"), math.nan) == "non-finite loss nan and gradient norm nan"


def test_non_finite_weights_are_never_saved(tmp_path):
    """Item 1: a step that makes the weights inf (finite loss and gradient) cannot reach a checkpoint."""
    from d2sd import distributed as ddist

    info = ddist.setup("cpu")
    m = torch.nn.Linear(2, 2)
    train.check_weights_finite(m, info, 1)
    with torch.no_grad():
        m.weight[0, 0] = float("inf")
    with pytest.raises(train.NonFinite, match="non-finite weights after step 7"):
        train.check_weights_finite(m, info, 7)


@pytest.mark.parametrize("opt,value,msg", [
    ("--lr", "inf", "lr must be in (0, 1]"), ("--lr", "nan", "lr must be in (0, 1]"),
    ("--lr", "1e30", "lr must be in (0, 1]"), ("--weight-decay", "nan", "weight_decay must be a finite"),
    ("--grad-clip", "nan", "grad_clip must be a number"), ("--min-lr-ratio", "5", "min_lr_ratio must be in [0, 1]"),
    ("--adam-beta1", "2", "adam_beta1 must be in [0, 1)"), ("--adam-eps", "-1", "adam_eps must be a finite number > 0"),
    ("--skip-nonfinite", "-1", "skip_nonfinite must be >= 0"),
])
def test_bad_optimizer_options_are_one_line_errors(opt, value, msg, data_file, tmp_path, capsys):
    """Items 1, 9, 11."""
    _, err = _main(["--data", str(data_file), "--out", str(tmp_path / "r"), opt, value], capsys, 2)
    _one_line_error(err, msg)


# ------------------------------------------------------------------ item 2: export never touches its input


@pytest.fixture
def drafter_ckpt(base_run, tmp_path):
    return ckpt.list_checkpoints(base_run / "checkpoints")[-1]


def _export(args, capsys, rc):
    from d2sd.export import main as export_main

    assert export_main([str(a) for a in args]) == rc
    return capsys.readouterr()


def test_export_into_its_own_source_is_refused(base_run, tmp_path, capsys):
    """Item 2: CKPT CKPT --format dflash overwrote the source, which then failed its checksum."""
    run = _copy(base_run, tmp_path)
    ck = ckpt.list_checkpoints(run / "checkpoints")[-1]
    for out in (ck / "drafter", ck, ck / "drafter" / "sub"):
        cap = _export([ck / "drafter", out, "--format", "dflash"], capsys, 2)
        _one_line_error(cap.err, "overlap")
    ckpt.verify_checkpoint(ck)


def test_export_refuses_an_occupied_output_unless_overwrite(drafter_ckpt, tmp_path, capsys):
    other = tmp_path / "other"
    _export([drafter_ckpt / "drafter", other, "--format", "deepspec"], capsys, 0)
    before = (other / "model.safetensors").read_bytes()
    cap = _export([drafter_ckpt / "drafter", other, "--format", "dflash"], capsys, 2)
    _one_line_error(cap.err, "is not empty", "--overwrite")
    assert (other / "model.safetensors").read_bytes() == before
    _export([drafter_ckpt / "drafter", other, "--format", "dflash", "--overwrite"], capsys, 0)
    assert json.loads((other / "config.json").read_text())["architectures"] == ["DFlashDraftModel"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    (tmp_path / "file").write_text("x")
    _one_line_error(_export([drafter_ckpt / "drafter", tmp_path / "file", "--format", "dflash"], capsys, 2).err,
                    "is a file")
    _one_line_error(_export([drafter_ckpt / "drafter", tmp_path / "o", "--format", "dflash", "--target",
                             tmp_path / "no-target"], capsys, 2).err, "does not exist")


def test_vp_drafter_exported_to_dflash_is_marked(drafter_ckpt, tmp_path, capsys):
    """Item 8: a D2 (VP) drafter exported to dflash said nothing about its never-trained slot 1."""
    cap = _export([drafter_ckpt / "drafter", tmp_path / "zl", "--format", "dflash"], capsys, 0)
    cfg = json.loads((tmp_path / "zl" / "config.json").read_text())
    assert cfg["d2sd_trained_as"] == "vp" and cfg["d2sd_untrained_slots"] == [1]
    assert "D2 (VP) drafter" in cap.err and "never trained" in cap.err


# ------------------------------------------------------------------ item 3: malformed manifests


def _tiny_save(root, step, keep_last=3):
    def write(d):
        d.mkdir(parents=True)
        (d / "w.bin").write_bytes(bytes([step]) * 64)

    return ckpt.save_checkpoint(root, step, write, {"step": step}, keep_last)


def test_manifest_missing_a_key_falls_back_to_the_older_checkpoint(tmp_path):
    """Item 3: renaming "size" gave KeyError from verify_checkpoint."""
    root = tmp_path / "checkpoints"
    _tiny_save(root, 1)
    new = _tiny_save(root, 2)
    m = new / ckpt.MANIFEST
    m.write_text(m.read_text().replace('"size"', '"siz"', 1))
    with pytest.raises(ckpt.CorruptCheckpoint):
        ckpt.verify_checkpoint(new)
    assert ckpt.resolve_resume(tmp_path, log=lambda s: None).name == ckpt.step_dir_name(1)


@pytest.mark.parametrize("content", ["[]", "null", '{"step": 1}', '{"step": "1", "files": {}}',
                                     '{"step": 1, "files": []}', '{"step": 1, "files": {"trainer_state.pt": 3}}',
                                     '{"step": 1, "files": {"trainer_state.pt": {"size": "64", "sha256": "x"}}}',
                                     '{"step": 1, "files": {"../../x": {"size": 1, "sha256": "x"}}}',
                                     '{"step": 9, "files": {"trainer_state.pt": {"size": 1, "sha256": "x"}}}',
                                     '\xff\xfe'])
def test_any_malformed_manifest_is_corrupt(tmp_path, content):
    d = _tiny_save(tmp_path, 1)
    (d / ckpt.MANIFEST).write_bytes(content.encode("latin-1"))
    with pytest.raises(ckpt.CorruptCheckpoint):
        ckpt.verify_checkpoint(d)


def test_a_damaged_older_checkpoint_never_breaks_later_saves(tmp_path):
    """Item 3: with the damaged one older, every later save crashed in prune."""
    root = tmp_path / "checkpoints"
    old = _tiny_save(root, 1, keep_last=1)
    (old / ckpt.MANIFEST).write_text('{"step": 1, "files": {"trainer_state.pt": {"sha256": "0"}}}')
    for step in (2, 3):
        _tiny_save(root, step, keep_last=1)
    assert [p.name for p in ckpt.list_checkpoints(root)] == [ckpt.step_dir_name(s) for s in (1, 3)]


# ------------------------------------------------------------------ item 4: metrics.jsonl


def test_resume_tolerates_a_torn_last_metrics_line(base_run, tmp_path, capsys):
    """Item 4: a torn last line made every later --resume fail with JSONDecodeError."""
    run = _copy(base_run, tmp_path)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 1.2')
    out, _ = _main(["--resume", str(run), "--max-steps", "3"], capsys, 0)
    assert "torn last line dropped" in out and "metrics.jsonl:3" in out
    assert [r["step"] for r in _rows(run)] == [1, 2, 3]


def test_metrics_history_survives_a_kill_during_the_resume_rewrite(tmp_path, monkeypatch):
    """Item 4: the truncated history goes to a temp file and replaces the old one; a kill before the
    replace leaves the old history whole (it lost 98.5% when rewritten in place)."""
    path = tmp_path / "metrics.jsonl"
    text = "".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 2001))
    text += "not json\n" + json.dumps({"step": 2001, "loss": 1.0}) + "\n"
    path.write_text(text)

    def killed(*a):
        raise KeyboardInterrupt

    monkeypatch.setattr(train.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        train.Metrics(tmp_path, True, resume_step=1500)
    assert path.read_text() == text
    monkeypatch.undo()
    m = train.Metrics(tmp_path, True, resume_step=1500)
    assert [r["step"] for r in m.rows] == list(range(1, 1501)) and len(_rows(tmp_path)) == 1500
    assert not list(tmp_path.glob(".metrics.jsonl.tmp-*"))
    m.close()


# ------------------------------------------------------------------ item 5: options on resume


def test_resume_applies_a_new_lr_and_schedule(base_run, tmp_path, capsys):
    """Item 5: --lr / --schedule were ignored while the checkpoint recorded the new value."""
    run = _copy(base_run, tmp_path)
    out, _ = _main(["--resume", str(run), "--max-steps", "4", "--lr", "5e-4", "--schedule", "linear"], capsys, 0)
    assert "resume applies the changed options" in out and "lr 0.001 -> 0.0005" in out
    rows = {r["step"]: r for r in _rows(run)}
    assert rows[2]["lr"] == pytest.approx(1e-3)
    # linear from the peak 5e-4 over 4 steps, no warmup: step 3 runs at factor 1 - 2/4.
    assert rows[3]["lr"] == pytest.approx(5e-4 * 0.5) and rows[4]["lr"] == pytest.approx(5e-4 * 0.25)
    state = ckpt.load_trainer_state(ckpt.list_checkpoints(run / "checkpoints")[-1])
    assert state["train_config"]["lr"] == 5e-4 and state["train_config"]["schedule"] == "linear"
    assert all(g["initial_lr"] == 5e-4 for g in state["optimizer"]["param_groups"])


@pytest.mark.parametrize("extra,needle", [
    (["--block-size", "5"], "--block-size (the checkpoint has 4, now 5)"),
    (["--num-draft-layers", "1"], "--num-draft-layers (the checkpoint has 2, now 1)"),
    (["--no-d2"], "--enable-d2-feature (the checkpoint has True, now False)"),
    (["--seed", "3"], "--seed (the checkpoint has 0, now 3)"),
    (["--max-steps", "2"], "--max-steps 2 is not above the checkpoint's step 2"),
    (["--max-steps", "1"], "--max-steps 1 is not above the checkpoint's step 2"),
])
def test_resume_refuses_options_it_cannot_follow(base_run, extra, needle, capsys):
    """Item 5: --block-size changed silently (crash in the plot), --num-draft-layers gave a traceback,
    --max-steps below the checkpoint did nothing."""
    args = ["--resume", str(base_run), *extra]
    if "--max-steps" not in extra:
        args += ["--max-steps", "3"]
    _, err = _main(args, capsys, 2)
    _one_line_error(err, needle)


def test_resume_refuses_other_data(base_run, tmp_path, capsys):
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps(_chat("Anna has 3 pens .", ANSWER)) + "\n")
    _, err = _main(["--resume", str(base_run), "--data", str(other), "--max-steps", "3"], capsys, 2)
    _one_line_error(err, "--data (the checkpoint has", "other.jsonl")


# ------------------------------------------------------------------ item 6: disk full


def test_disk_full_during_a_save_is_one_line_and_keeps_older_checkpoints(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    first = _tiny_save(root, 1)

    def full(d):
        d.mkdir(parents=True)
        (d / "part").write_bytes(b"x" * 10)
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(ckpt.CheckpointWriteError, match="no space left") as e:
        ckpt.save_checkpoint(root, 2, full, {"step": 2}, keep_last=1)
    assert "\n" not in str(e.value) and "older checkpoints are intact" in str(e.value)
    assert sorted(p.name for p in root.iterdir()) == [first.name]
    ckpt.verify_checkpoint(first)


def test_torch_save_failure_reads_as_disk_full(tmp_path, monkeypatch):
    """Item 6: torch's zip writer said 'unexpected pos' with a traceback."""
    def broken(obj, f):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")

    monkeypatch.setattr(ckpt.torch, "save", broken)
    with pytest.raises(ckpt.CheckpointWriteError, match="no space left"):
        _tiny_save(tmp_path, 1)
    assert list(tmp_path.iterdir()) == []


def test_training_stops_with_one_line_when_a_save_fails(data_file, tmp_path, capsys, monkeypatch):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "_write_tmp", full)
    _, err = _main(_args(data_file, tmp_path / "r"), capsys, train.EXIT_STOPPED)
    _one_line_error(err, "cannot write checkpoint", "no space left")
    assert not list((tmp_path / "r" / "checkpoints").iterdir())


def test_leftover_temp_dirs_are_cleaned_by_the_next_save(tmp_path):
    """Item 6: .tmp-* folders of a failed save kept the disk full for every later resume."""
    (tmp_path / ".tmp-step_00000005-99999").mkdir(parents=True)
    (tmp_path / ".stale-step_00000004-99999").mkdir()
    _tiny_save(tmp_path, 6)
    assert [p.name for p in tmp_path.iterdir()] == [ckpt.step_dir_name(6)]


# ------------------------------------------------------------------ item 7: cache validated up front


@pytest.mark.parametrize("damage", ["truncated-shard", "bad-index", "oov-id", "bad-shard-id"])
def test_cache_problems_are_found_before_the_first_step(target_cache, tmp_path, capsys, damage):
    cache = _cache_copy(target_cache, tmp_path)
    shard = cache / "shard-00000.bin"
    if damage == "truncated-shard":
        shard.write_bytes(shard.read_bytes()[:-100])
        needle = "sample 5: target_last_hidden_states ends at byte"
    elif damage == "bad-index":
        idx = bytearray((cache / "samples.idx").read_bytes())
        idx[56 * 2] = 7  # sample 2 says it is sample 7
        (cache / "samples.idx").write_bytes(bytes(idx))
        needle = "record 2 has sample_id 7"
    elif damage == "bad-shard-id":
        idx = bytearray((cache / "samples.idx").read_bytes())
        idx[56 + 8] = 3
        (cache / "samples.idx").write_bytes(bytes(idx))
        needle = "sample 1: index names shard 3"
    else:
        _poke(cache, 1, "input_ids", (10 ** 6).to_bytes(4, "little"), at=4)
        needle = "sample 1: token id(s) [1000000] outside the target's vocabulary"
    _, err = _main(_cache_args(cache, tmp_path / "r", "--max-steps", "1"), capsys, 2)
    _one_line_error(err, needle)


# ------------------------------------------------------------------ item 8: runs that cannot learn


def test_block_size_1_is_refused_up_front(data_file, tmp_path, capsys):
    _, err = _main(["--data", str(data_file), "--out", str(tmp_path / "r"), "--block-size", "1"], capsys, 2)
    _one_line_error(err, "--block-size must be >= 2")


def test_data_with_only_empty_assistant_turns_is_refused(tmp_path, capsys):
    data = tmp_path / "empty.jsonl"
    data.write_text("".join(json.dumps(_chat(f"question {i} ?", "")) + "\n" for i in range(3)))
    _, err = _main(["--data", str(data), "--out", str(tmp_path / "r"), "--max-steps", "1"], capsys, 2)
    _one_line_error(err, "consecutive assistant tokens", "nothing to learn")


# ------------------------------------------------------------------ item 9: one-line errors


def test_corrupt_target_weights_are_one_line_errors(data_file, tmp_path, capsys):
    from d2sd.assets import tiny_target_path

    bad = tmp_path / "target"
    shutil.copytree(tiny_target_path(), bad)
    w = bad / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    _, err = _main(["--target", str(bad), "--data", str(data_file), "--out", str(tmp_path / "r")], capsys, 2)
    _one_line_error(err, "cannot read the target weights", str(bad))
    from d2sd.export import main as export_main

    assert export_main([str(tmp_path), str(tmp_path / "o"), "--format", "dflash", "--target", str(bad)]) == 2
    _one_line_error(capsys.readouterr().err, "cannot read the target weights")
    from d2sd import eval as ev

    assert ev.main(["--target", str(bad), "--dflash", str(tmp_path), "--vp", str(tmp_path)]) == 2
    _one_line_error(capsys.readouterr().err, "cannot read the target weights")


@pytest.mark.parametrize("device,needle", [("meta", "only cpu and cuda"), ("tpu", "not a device name"),
                                           ("cuda", "no CUDA GPU is visible")])
def test_bad_device_is_a_one_line_error(device, needle, data_file, tmp_path, capsys):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    _, err = _main(["--data", str(data_file), "--out", str(tmp_path / "r"), "--device", device], capsys, 2)
    _one_line_error(err, needle)


def test_triton_backend_on_cpu_is_refused(data_file, tmp_path, capsys, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    _, err = _main(["--data", str(data_file), "--out", str(tmp_path / "r"), "--backend", "triton"], capsys, 2)
    _one_line_error(err, "--backend triton needs a CUDA device")


def test_huge_num_anchors_is_refused_before_allocating(data_file, tmp_path, capsys):
    _, err = _main(["--data", str(data_file), "--out", str(tmp_path / "r"), "--num-anchors", "100000"], capsys, 2)
    _one_line_error(err, "--num-anchors must be in [1, --max-length")


def test_out_under_a_file_is_refused(data_file, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    _, err = _main(["--data", str(data_file), "--out", str(tmp_path / "f" / "run")], capsys, 2)
    _one_line_error(err, "is a file, not a directory")


def test_truncated_drafter_weights_are_a_value_error(base_run, tmp_path):
    d = tmp_path / "drafter"
    shutil.copytree(ckpt.list_checkpoints(base_run / "checkpoints")[-1] / "drafter", d)
    w = d / "model-00001-of-00002.safetensors"  # the trainable shard of a training checkpoint
    w.write_bytes(w.read_bytes()[:1000])
    from d2sd.models import load_drafter

    with pytest.raises(ValueError, match="damaged or truncated"):
        load_drafter(str(d))


@pytest.mark.parametrize("case", ["data-dir", "report-under-file", "report-is-dir", "non-utf8"])
def test_eval_bad_paths_are_refused_before_the_eval(case, tmp_path, capsys):
    from d2sd import eval as ev

    args = ["--dflash", str(tmp_path / "none"), "--vp", str(tmp_path / "none")]
    if case == "data-dir":
        args += ["--data", str(tmp_path)]
        needle = "not a file"
    elif case == "report-under-file":
        (tmp_path / "f").write_text("x")
        args += ["--report", str(tmp_path / "f" / "r.json")]
        needle = "is a file, not a directory"
    elif case == "report-is-dir":
        args += ["--report", str(tmp_path)]
        needle = "is a directory"
    else:
        bad = tmp_path / "p.jsonl"
        bad.write_bytes(b'{"prompt": "ok"}\n{"prompt": "\xff\xfe"}\n')
        args = ["--data", str(bad), "--methods", "dflash", "--dflash", str(tmp_path)]
        with pytest.raises(ev.UsageError, match="p.jsonl:2: not UTF-8"):
            ev.load_prompt_file(str(bad))
        return
    assert ev.main(args) == 2
    _one_line_error(capsys.readouterr().err, needle)


# ------------------------------------------------------------------ item 10: library validation


def _blocks(S=9):
    ids = torch.arange(S).view(1, S)
    lm = torch.ones(1, S, dtype=torch.long)
    return ids, lm


@pytest.mark.parametrize("anchor", [-1, 9, 50])
def test_draft_targets_and_ids_refuse_anchors_out_of_range(anchor):
    ids, lm = _blocks()
    anchors, keep, p = torch.tensor([[anchor, 2]]), torch.tensor([[True, True]]), torch.tensor([[2, 2]])
    with pytest.raises(ValueError, match=r"anchors out of range \[0, 9\)"):
        layout.draft_targets(ids, lm, anchors, keep, p, 4, same_position=True)
    with pytest.raises(ValueError, match="anchors out of range"):
        layout.draft_token_ids(ids, anchors, keep, p, 4, mask_token_id=0)
    # A dummy block (keep False) may hold anything; validation off skips the check (no host sync).
    layout.draft_targets(ids, lm, anchors, torch.tensor([[False, True]]), p, 4, same_position=True)
    with d2kernels.validation("off"):
        layout.draft_token_ids(ids, anchors, keep, p, 4, mask_token_id=0)


def test_decay_weights_refuse_non_bool_masks_negative_offsets_and_nan_gamma():
    em = torch.ones(2, 3, dtype=torch.bool)
    off = torch.arange(3).expand(2, 3)
    with pytest.raises(TypeError, match="eval_mask must be a bool tensor"):
        layout.decay_weights(em.float() * 5, off, 4.0)
    with pytest.raises(ValueError, match="decay_offsets out of range"):
        layout.decay_weights(em, off - 100, 4.0)
    with pytest.raises(ValueError, match="gamma must be a number"):
        layout.decay_weights(em, off, float("nan"))
    assert layout.decay_weights(em, off, 4.0).max() == 1.0


def test_empty_sequences_and_head_dims_are_value_errors():
    ids = torch.zeros(1, 0, dtype=torch.long)
    anchors, keep, p = torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2, dtype=torch.bool), torch.ones(1, 2).long()
    with pytest.raises(ValueError, match="at least one position"):
        layout.draft_targets(ids, ids, anchors, keep, p, 4, same_position=True)
    with pytest.raises(ValueError, match="at least one position"):
        d2kernels.noise_embedding(torch.zeros(5, 4), ids, anchors, keep, p, block_size=4, mask_token_id=0)
    q = torch.zeros(1, 8, 2, 0)
    k = torch.zeros(1, 5, 2, 0)
    with pytest.raises(ValueError, match="head dim D >= 1"):
        d2kernels.varprefix_attention(q, k, k, q, q, anchors, keep, block_size=4)


# ------------------------------------------------------------------ item 11: smaller


def test_non_utf8_data_names_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(json.dumps(_chat("q ?", ANSWER)).encode() + b"\n" + b'{"messages": "\xff"}\n')
    _, err = _main(["--data", str(bad), "--out", str(tmp_path / "r")], capsys, 2)
    _one_line_error(err, "bad.jsonl:2: not UTF-8")


def test_records_cut_by_max_length_are_not_counted_as_no_assistant(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    recs = [_chat("q ?", ANSWER), _chat(" ".join(["apples"] * 80), "The answer is 3 .")]
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    out, _ = _main(["--data", str(data), "--out", str(tmp_path / "r"), "--max-steps", "1", "--max-length", "48",
                    "--global-batch-size", "1", "--micro-batch-size", "1", "--num-anchors", "4"], capsys, 0)
    assert "skipped 1 record(s) whose assistant tokens all lie past --max-length 48" in out
    assert "with no assistant tokens" not in out


def test_refusing_a_corrupt_checkpoint_logs_one_prefix(base_run, tmp_path, capsys):
    run = _copy(base_run, tmp_path)
    for p in ckpt.list_checkpoints(run / "checkpoints"):
        (p / ckpt.MANIFEST).write_text("{")
    out, err = _main(["--resume", str(run), "--max-steps", "3"], capsys, 2)
    assert "[d2sd] refusing corrupt checkpoint" in out and "[d2sd] [d2sd]" not in out + err
    _one_line_error(err, "every checkpoint is corrupt")


def test_checkpoint_weights_are_readable_like_other_files(base_run):
    umask = os.umask(0)
    os.umask(umask)
    last = ckpt.list_checkpoints(base_run / "checkpoints")[-1]
    shards = [str(p.relative_to(last)) for p in (last / "drafter").glob("model-*.safetensors")]
    assert len(shards) == 2
    for f in (*shards, "drafter/config.json", "trainer_state.pt"):
        assert (last / f).stat().st_mode & 0o777 == 0o666 & ~umask, f
