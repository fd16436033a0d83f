"""The trainer's fast path: precision, compiled layers without recompiles, no host waits, background saves.

CPU cases check the mechanisms (the interpreter runs the Triton kernels at small shapes); ``gpu``
cases check what only the GPU shows: bf16 losses against the fp32 CPU path, and a few real steps
of ``python -m d2sd.train`` with compiled layers.
"""
import json
import os
import threading
import time
from pathlib import Path

import pytest
import torch

import d2kernels
from benchmarks.reference_step import tiny_target_config
from d2sd import checkpoint as ckpt
from d2sd import train
from d2sd.data import collate
from d2sd.models import build_drafter, load_drafter
from d2sd.models.checkpoint import TARGET_PARTS, drafter_json, read_weights

HAS_CUDA = torch.cuda.is_available()


def _target(dtype=torch.float32):
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(0)
    return Qwen3ForCausalLM(tiny_target_config()).to(dtype).eval()


def _drafter(backend="torch", **kw):
    torch.manual_seed(1)
    args = dict(num_draft_layers=2, block_size=4, num_anchors=6, mask_token_id=500, backend=backend)
    args.update(kw)
    return build_drafter(tiny_target_config(), **args)


def _batch(cfg, Bt, S, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size - 1, (Bt, S), generator=g)
    lm = torch.ones(Bt, S, dtype=torch.long)
    lm[:, :3] = 0
    th = torch.randn(Bt, S, cfg.num_target_features * cfg.hidden_size, generator=g)
    return ids, th, lm


def test_frozen_parts_keep_the_target_dtype():
    """A bf16 target lends bf16 embed_tokens / lm_head; trainable weights stay fp32 masters."""
    target = _target(torch.bfloat16)
    d = _drafter().init_from_target(target)
    assert d.embed_tokens.weight.dtype == torch.bfloat16 and d.lm_head.weight.dtype == torch.bfloat16
    assert not d.embed_tokens.weight.requires_grad and not d.lm_head.weight.requires_grad
    assert torch.equal(d.embed_tokens.weight, target.get_input_embeddings().weight)
    assert all(p.dtype == torch.float32 for p in d.parameters() if p.requires_grad)


def test_compiled_layers_one_graph_no_recompile_across_lengths(device):
    """The layers compile once, with S symbolic: a new length is no recompile, the attention op a graph node."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    cnt = CompileCounterWithBackend("eager")
    d = _drafter(backend="triton").to(device)
    d.compile_layers(backend=cnt)
    for S in (29, 37, 53, 71):
        ids, th, lm = (t.to(device) for t in _batch(d.config, 1, S, seed=S))
        out = d(ids, th, lm, generator=torch.Generator().manual_seed(S))
        out.loss_num.backward()
        # Two graphs, both from the first call: layer 0 (its input, the frozen embedding, needs no
        # grad) and the layers after it. A new S adds none.
        assert cnt.frame_count == 2, (S, cnt.frame_count)
    breaks = dict(torch._dynamo.utils.counters["graph_break"])
    assert not breaks, breaks
    ops = [str(n.target) for g in cnt.graphs for n in g.graph.nodes if n.op == "call_function"]
    assert any("varprefix_attention" in o for o in ops), "the attention op is not a node of the compiled graph"
    torch._dynamo.reset()


def test_forward_backward_one_host_transfer_and_clip():
    """The sums, the 1/(Σw) scaling and the clip happen on the device; the result matches the plain math."""
    d = _drafter()
    cfg = d.config
    samples = []
    for i in range(2):
        ids, th, lm = _batch(cfg, 1, 40 + 7 * i, seed=i)
        samples.append({"input_ids": ids[0], "loss_mask": lm[0], "target_hidden": th[0]})
    micros = [(i, collate([s], 0)) for i, s in enumerate(samples)]
    s = train.forward_backward(d, micros, lambda b: b["target_hidden"], train.ddist.DistInfo(), seed=3, step=0,
                               generator=torch.Generator(), grad_clip=1e-3)
    grads = [p.grad for p in d.parameters() if p.grad is not None]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    assert s.grad_norm is not None and s.grad_norm > 1e-3
    assert float(norm) == pytest.approx(1e-3, rel=1e-3)  # clipped in place
    # Reference: unclipped gradient of the global weighted mean, scaled to the clip.
    ref = _drafter()
    num = den = 0
    for index, b in micros:
        gen = torch.Generator().manual_seed(train.anchor_seed(3, 0, index))
        out = ref(b["input_ids"], b["target_hidden"], b["loss_mask"], generator=gen)
        out.loss_num.backward()
        num, den = num + out.loss_num.detach(), den + out.loss_den
    assert s.loss == pytest.approx(float(num / (den + 1e-6)), rel=1e-6)
    for (n, p), q in zip(d.named_parameters(), ref.parameters()):
        if p.grad is not None:
            want = q.grad / (den + 1e-6) * (1e-3 / s.grad_norm)
            assert torch.allclose(p.grad, want, rtol=1e-4, atol=1e-9), n


def test_token_ids_checked_on_the_host():
    batch = {"input_ids": torch.tensor([[1, 2, 700]])}
    with pytest.raises(train.UsageError, match=r"\[700\].*\[0, 610\)"):
        train.check_token_ids(batch, 610, "records [4]")
    train.check_token_ids({"input_ids": torch.tensor([[0, 609]])}, 610, "ok")


def test_batcher_length_buckets():
    """With lengths, each micro-batch holds records of neighbouring lengths; the set per step is unchanged."""
    lengths = [50, 10, 40, 20, 30, 60, 70, 5]
    plain = train.Batcher(8, 8, 2, 1, 0, seed=4)
    bucketed = train.Batcher(8, 8, 2, 1, 0, seed=4, lengths=lengths)
    a, b = plain.next(), bucketed.next()
    assert sorted(k for _, m in a for k in m) == sorted(k for _, m in b for k in m)
    widths = [max(lengths[k] for k in m) - min(lengths[k] for k in m) for _, m in b]
    assert widths == [5, 10, 10, 10]
    pad_plain = sum(len(m) * max(lengths[k] for k in m) - sum(lengths[k] for k in m) for _, m in a)
    pad_bucketed = sum(len(m) * max(lengths[k] for k in m) - sum(lengths[k] for k in m) for _, m in b)
    assert pad_bucketed < pad_plain


def test_prefetcher_hands_out_the_batcher_state_of_each_batch():
    """Read-ahead never leaks into checkpoints: each batch comes with the data position after it."""
    samples = [{"input_ids": torch.arange(5 + i), "loss_mask": torch.ones(5 + i, dtype=torch.long)} for i in range(6)]
    ref = train.Batcher(6, 2, 1, 1, 0, seed=2)
    want = []
    for _ in range(5):
        idx = ref.next()
        want.append(([i for i, _ in idx], [len(samples[m[0]]["input_ids"]) for _, m in idx], ref.state_dict()))
    pf = train.Prefetcher(train.Batcher(6, 2, 1, 1, 0, seed=2), samples, 0, torch.device("cpu"), 610, depth=2)
    try:
        time.sleep(0.2)  # let it run ahead
        for w_index, w_len, w_state in want:
            micros, state = pf.next()
            assert [i for i, _ in micros] == w_index
            assert [b["input_ids"].shape[1] for _, b in micros] == w_len
            assert state == w_state
    finally:
        pf.close()


def test_prefetcher_raises_bad_data_in_the_training_thread():
    samples = [{"input_ids": torch.tensor([1, 2, 999]), "loss_mask": torch.ones(3, dtype=torch.long)}]
    pf = train.Prefetcher(train.Batcher(1, 1, 1, 1, 0, seed=0), samples, 0, torch.device("cpu"), 610)
    try:
        with pytest.raises(train.UsageError, match="outside the drafter's vocabulary"):
            pf.next()
    finally:
        pf.close()


def _save_async(root, drafter, step, keep_last=2, saver=None):
    saver = saver or ckpt.AsyncCheckpointer(root, keep_last, frozen=TARGET_PARTS)
    state = {"step": step, "optimizer": {"w": torch.full((3,), float(step))}}
    saver.save(step, drafter_json(drafter.config, drafter.fc.weight.dtype), drafter.state_dict(), state)
    return saver


def test_async_checkpoint_frozen_shard_written_once_and_linked(tmp_path):
    target = _target(torch.bfloat16)
    d = _drafter().init_from_target(target)
    saver = _save_async(tmp_path, d, 1, keep_last=2)
    with torch.no_grad():
        d.fc.weight.add_(1.0)  # training goes on while the first save is written
    saver = _save_async(tmp_path, d, 2, saver=saver)
    path = saver.wait()
    assert path == tmp_path / "step_00000002"
    for step in (1, 2):
        ckpt.verify_checkpoint(tmp_path / ckpt.step_dir_name(step))
    f1 = tmp_path / "step_00000001" / "drafter" / "model-00002-of-00002.safetensors"
    f2 = tmp_path / "step_00000002" / "drafter" / "model-00002-of-00002.safetensors"
    assert os.stat(f1).st_ino == os.stat(f2).st_ino  # one copy of the frozen parts on disk
    sd1 = read_weights(str(tmp_path / "step_00000001" / "drafter"))
    assert set(sd1) == set(d.state_dict())
    assert sd1["embed_tokens.weight"].dtype == torch.bfloat16 and sd1["fc.weight"].dtype == torch.float32
    sd2 = read_weights(str(tmp_path / "step_00000002" / "drafter"))
    assert torch.equal(sd2["fc.weight"], sd1["fc.weight"] + 1.0)  # the snapshot was taken before the add
    loaded = load_drafter(str(tmp_path / "step_00000002" / "drafter"))
    assert torch.equal(loaded.fc.weight, d.fc.weight)
    state = ckpt.load_trainer_state(tmp_path / "step_00000002")
    assert torch.equal(state["optimizer"]["w"], torch.full((3,), 2.0))


def test_async_checkpoint_error_surfaces_at_the_next_call(tmp_path, monkeypatch):
    d = _drafter().init_from_target(_target())
    saver = ckpt.AsyncCheckpointer(tmp_path, 2, frozen=TARGET_PARTS)

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "save_checkpoint", boom)
    _save_async(tmp_path, d, 1, saver=saver)
    with pytest.raises(OSError, match="No space"):
        saver.wait()
    assert saver.wait() is None  # reported once


def test_save_stall_is_the_snapshot_only(tmp_path, monkeypatch):
    """The loop returns from save() while the write is still running."""
    d = _drafter().init_from_target(_target())
    release = threading.Event()
    real = ckpt.save_checkpoint

    def slow(*a, **k):
        release.wait(10)
        return real(*a, **k)

    monkeypatch.setattr(ckpt, "save_checkpoint", slow)
    t0 = time.time()
    saver = _save_async(tmp_path, d, 1)
    assert time.time() - t0 < 5
    assert not (tmp_path / "step_00000001").exists()
    release.set()
    assert saver.wait() == tmp_path / "step_00000001"


def test_prune_does_not_rehash(tmp_path, monkeypatch):
    """Pruning checks completeness (sizes), not sha256: saves do not re-read every kept checkpoint."""
    d = _drafter().init_from_target(_target())
    saver = _save_async(tmp_path, d, 1)
    saver.wait()
    calls = []
    real = ckpt._sha256
    monkeypatch.setattr(ckpt, "_sha256", lambda p: calls.append(Path(p)) or real(p))
    _save_async(tmp_path, d, 2, saver=saver).wait()
    assert all("step_00000001" not in str(p) for p in calls), calls


@pytest.mark.gpu
def test_gpu_bf16_loss_matches_fp32_cpu():
    """bf16 autocast with fp32 masters and bf16 frozen parts gives the fp32 CPU loss and gradients."""
    target = _target(torch.float32)
    cpu = _drafter(backend="torch").init_from_target(target)
    gpu = _drafter(backend="triton").init_from_target(target.to(torch.bfloat16).cuda()).cuda()
    gpu.load_state_dict({k: v for k, v in cpu.state_dict().items() if k not in TARGET_PARTS}, strict=False)
    cfg = cpu.config
    ids, th, lm = _batch(cfg, 2, 301, seed=5)
    anchors, keep = d2kernels.sample_anchors(lm, cfg.num_anchors, generator=torch.Generator().manual_seed(1))
    prefix = d2kernels.sample_prefix_lengths(keep, cfg.block_size, generator=torch.Generator().manual_seed(2))
    ref = cpu(ids, th, lm, anchors=anchors, keep=keep, prefix_lens=prefix)
    (ref.loss_num / ref.loss_den).backward()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = gpu(ids.cuda(), th.cuda().bfloat16(), lm.cuda(), anchors=anchors.cuda(), keep=keep.cuda(),
                  prefix_lens=prefix.cuda())
    (out.loss_num / out.loss_den).backward()
    loss, want = float(out.loss_num / out.loss_den), float(ref.loss_num / ref.loss_den)
    assert abs(loss - want) <= 2e-2 * abs(want)
    for (n, p), q in zip(gpu.named_parameters(), cpu.parameters()):
        if p.grad is not None:
            err = float((p.grad.float().cpu() - q.grad).norm() / q.grad.norm().clamp_min(1e-30))
            assert err <= 5e-2, (n, err)


@pytest.mark.gpu
def test_gpu_train_command_compiled_bf16(tmp_path):
    """A few real steps of the command on the GPU: compiled layers, bf16 compute, background saves."""
    out = tmp_path / "run"
    rc = train.main(["--device", "cuda", "--max-steps", "6", "--save-every", "3", "--log-every", "1",
                     "--max-new-tokens", "16", "--out", str(out)])
    assert rc == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(r["loss"] == r["loss"] for r in rows)
    assert all("peak_mem_gib" in r for r in rows)
    sd = read_weights(str(out / "checkpoints" / "step_00000006" / "drafter"))
    assert sd["lm_head.weight"].dtype == torch.bfloat16 and sd["fc.weight"].dtype == torch.float32
    for step in (3, 6):
        ckpt.verify_checkpoint(out / "checkpoints" / ckpt.step_dir_name(step))


def test_write_safetensors_round_trips_every_dtype(tmp_path):
    """The GIL-free writer's files load with safetensors' own reader, bit for bit."""
    from safetensors.torch import load_file

    g = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(3, 5, generator=g), "bf16": torch.randn(7, generator=g).bfloat16(),
        "f16": torch.randn(2, 2, generator=g).half(), "f64": torch.randn(4, generator=g).double(),
        "i64": torch.arange(-3, 6), "i32": torch.arange(5, dtype=torch.int32), "u8": torch.arange(9, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]), "scalar": torch.tensor(3.5), "empty": torch.zeros(0, 4),
        "f8": torch.randn(6, generator=g).to(torch.float8_e4m3fn), "strided": torch.randn(4, 6, generator=g)[:, ::2],
    }
    ckpt.write_safetensors(tmp_path / "t.safetensors", tensors, metadata={"format": "pt"})
    back = load_file(str(tmp_path / "t.safetensors"))
    assert set(back) == set(tensors)
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and back[k].shape == t.shape, k
        assert torch.equal(back[k].reshape(-1).view(torch.uint8), t.contiguous().reshape(-1).view(torch.uint8)), k


def test_trainer_state_tensors_live_in_safetensors(tmp_path):
    """A checkpoint's trainer state: the tensors in trainer_state.safetensors, the rest pickled; loads back whole."""
    state = {"step": 4, "optimizer": {"state": {0: {"exp_avg": torch.randn(3, 4), "step": torch.tensor(4.0)}},
                                      "param_groups": [{"lr": 1e-3, "params": [0]}]},
             "rng": {"torch": torch.get_rng_state(), "numpy": ["MT19937", torch.arange(3), 1, 0, 0.0]},
             "run_opts": {"lr": 1e-3}}
    path = ckpt.save_checkpoint(tmp_path, 4, lambda d: d.mkdir() or None, state, keep_last=2)
    assert (path / ckpt.TRAINER_TENSORS).is_file()
    assert (path / ckpt.TRAINER_STATE).stat().st_size < 4096  # only the small rest is pickled
    back = ckpt.load_trainer_state(path)
    assert torch.equal(back["optimizer"]["state"][0]["exp_avg"], state["optimizer"]["state"][0]["exp_avg"])
    assert torch.equal(back["rng"]["torch"], state["rng"]["torch"])
    assert back["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    assert back["rng"]["numpy"][0] == "MT19937" and torch.equal(back["rng"]["numpy"][1], torch.arange(3))


def test_train_function_api(tmp_path):
    """``d2sd.train.train(**options)``: the command as a function, a result instead of an exit status."""
    r = train.train(out=str(tmp_path / "run"), max_steps=3, save_every=3, log_every=1, max_new_tokens=8,
                    num_anchors=8, max_length=64, device="cpu")
    assert r.steps == 3 and not r.stopped and len(r.metrics) == 3
    assert r.checkpoint == tmp_path / "run" / "checkpoints" / "step_00000003"
    assert load_drafter(str(r.checkpoint / "drafter")).config.block_size == 4
    with pytest.raises(train.UsageError, match="unknown training option"):
        train.train(out=str(tmp_path / "x"), max_stepz=3)
    with pytest.raises(train.UsageError, match="already holds checkpoints"):
        train.train(out=str(tmp_path / "run"), max_steps=3)
