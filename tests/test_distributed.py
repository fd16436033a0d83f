"""Data parallelism: 2 gloo processes give the loss and gradients of one process on the same global batch.

The loss is normalized by the global Σw (docs/semantics.md): each rank backpropagates loss_num * world_size,
DDP / FSDP average, and the trainer divides by the all-reduced den.
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from d2sd import distributed as ddist
from d2sd.train import Batcher, collate, forward_backward

REPO = Path(__file__).resolve().parents[1]
# (name, global batch, micro batch, wrapper): 2 ranks x accumulation 2, 2 ranks x 1 micro-batch of 2.
CASES = [("G4-mb1-ddp", 4, 1, "ddp"), ("G4-mb2-ddp", 4, 2, "ddp"), ("G4-mb1-fsdp", 4, 1, "fsdp")]

# Shared by the parent (world 1) and the torchrun workers: a tiny D2 drafter and 4 odd-length samples.
SETUP = '''
import torch
from transformers import Qwen3Config
from d2sd.models import build_drafter

def make_drafter():
    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    return build_drafter(cfg, num_draft_layers=2, target_layer_ids=[0, 2], block_size=5, mask_token_id=96,
                         num_anchors=6, enable_d2_feature=True, backend="torch")

def make_samples():
    g = torch.Generator().manual_seed(1)
    out = []
    for S, prompt in ((13, 3), (29, 7), (17, 2), (22, 9)):
        lm = torch.zeros(S, dtype=torch.long)
        lm[prompt:] = 1
        out.append({"input_ids": torch.randint(0, 96, (S,), generator=g), "loss_mask": lm,
                    "target_hidden": torch.randn(S, 128, generator=g)})
    return out
'''

WORKER = '''
import sys, torch
from d2sd import distributed as ddist
from d2sd.train import Batcher, collate, forward_backward
from setup_mod import make_drafter, make_samples

info = ddist.setup("cpu")
out_dir = sys.argv[1]
for name, gbs, mbs, wrapper in CASES:
    drafter = make_drafter()
    model = ddist.wrap_model(drafter, info, fsdp=(wrapper == "fsdp"))
    samples = make_samples()
    b = Batcher(len(samples), gbs, mbs, info.world_size, info.rank, seed=1)
    micros = [(i, collate([samples[k] for k in idx], 0, info.device)) for i, idx in b.next()]
    s = forward_backward(model, micros, lambda batch: batch["target_hidden"], info, seed=1, step=0,
                         generator=torch.Generator())
    grads = {}
    for n, p in drafter.named_parameters():
        if p.grad is not None:
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            grads[n] = g.detach().clone()
    if info.rank == 0:
        torch.save({"loss": s.loss, "den": s.den, "correct": s.correct, "count": s.count, "grads": grads},
                   f"{out_dir}/{name}.pt")
ddist.teardown()
'''


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _single_process(gbs, mbs):
    ns = {}
    exec(SETUP, ns)
    drafter = ns["make_drafter"]()
    samples = ns["make_samples"]()
    info = ddist.DistInfo()
    b = Batcher(len(samples), gbs, mbs, 1, 0, seed=1)
    micros = [(i, collate([samples[k] for k in idx], 0, info.device)) for i, idx in b.next()]
    s = forward_backward(drafter, micros, lambda batch: batch["target_hidden"], info, seed=1, step=0,
                         generator=torch.Generator())
    grads = {n: p.grad.detach().clone() for n, p in drafter.named_parameters() if p.grad is not None}
    return s, grads


def _env():
    # gloo on CPU everywhere: the GPU box has one GPU for two ranks, and the check is about the math.
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _torchrun(args, pythonpath=None, timeout=240):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    env = _env()
    if pythonpath:
        env["PYTHONPATH"] = pythonpath + os.pathsep + env["PYTHONPATH"]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    return p.stdout + p.stderr


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    d = tmp_path_factory.mktemp("ddp")
    (d / "setup_mod.py").write_text(SETUP)
    (d / "worker.py").write_text(f"CASES = {CASES!r}\n" + textwrap.dedent(WORKER))
    _torchrun([str(d / "worker.py"), str(d)], pythonpath=str(d))
    return d


@pytest.mark.parametrize("name,gbs,mbs,wrapper", CASES, ids=[c[0] for c in CASES])
def test_two_ranks_match_one_process(two_rank_results, name, gbs, mbs, wrapper):
    got = torch.load(two_rank_results / f"{name}.pt", weights_only=True)
    want, want_grads = _single_process(gbs, mbs)
    assert got["den"] == pytest.approx(want.den, rel=1e-6)
    assert want.den > 0
    assert got["loss"] == pytest.approx(want.loss, rel=1e-6)
    assert torch.equal(got["correct"], want.correct) and torch.equal(got["count"], want.count)
    assert set(got["grads"]) == set(want_grads) and "fc.weight" in want_grads
    assert "embed_tokens.weight" not in want_grads and "lm_head.weight" not in want_grads
    for n, g in want_grads.items():
        assert _rel(got["grads"][n], g) <= 1e-5, n


def test_global_den_normalization_differs_from_local_mean():
    """The comparison above can fail: averaging per-rank weighted means gives another gradient."""
    want, want_grads = _single_process(4, 2)
    ns = {}
    exec(SETUP, ns)
    samples = ns["make_samples"]()
    local = []
    for index, idx in Batcher(len(samples), 4, 2, 1, 0, seed=1).next():
        drafter = ns["make_drafter"]()
        micros = [(index, collate([samples[k] for k in idx], 0, torch.device("cpu")))]
        s = forward_backward(drafter, micros, lambda batch: batch["target_hidden"], ddist.DistInfo(), seed=1,
                             step=0, generator=torch.Generator())
        local.append((s.den, {n: p.grad for n, p in drafter.named_parameters() if p.grad is not None}))
    (d1, g1), (d2, g2) = local
    assert d1 + d2 == pytest.approx(want.den, rel=1e-6) and abs(d1 - d2) > 1
    for n, g in want_grads.items():
        assert _rel((d1 * g1[n] + d2 * g2[n]) / (d1 + d2), g) <= 1e-5, n
    assert max(_rel((g1[n] + g2[n]) / 2, g) for n, g in want_grads.items()) > 1e-2


def test_torchrun_trainer_matches_single_process(tmp_path):
    data = tmp_path / "chats.jsonl"
    from d2sd.data import builtin_records, write_chat_jsonl

    write_chat_jsonl(data, builtin_records(8, seed=5))
    common = ["--data", str(data), "--max-steps", "3", "--save-every", "0", "--log-every", "1",
              "--global-batch-size", "4", "--micro-batch-size", "1", "--num-anchors", "8", "--max-length", "96"]
    single = subprocess.run([sys.executable, "-m", "d2sd.train", *common, "--out", str(tmp_path / "one")],
                            cwd=REPO, env=_env(), capture_output=True, text=True, timeout=240)
    assert single.returncode == 0, single.stdout[-3000:] + single.stderr[-3000:]
    text = _torchrun(["-m", "d2sd.train", *common, "--out", str(tmp_path / "two")])
    assert "world 2" in text

    def rows(d):
        return [json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]

    one, two = rows("one"), rows("two")
    assert [r["step"] for r in two] == [1, 2, 3]
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        assert b["acc_per_slot"] == a["acc_per_slot"]
    from d2sd import checkpoint as ckpt

    (final,) = ckpt.list_checkpoints(tmp_path / "two" / "checkpoints")
    assert ckpt.load_trainer_state(final)["world_size"] == 2


def test_fsdp_trainer_resumes_exactly(tmp_path):
    data = tmp_path / "chats.jsonl"
    from d2sd import checkpoint as ckpt
    from d2sd.data import builtin_records, write_chat_jsonl

    write_chat_jsonl(data, builtin_records(8, seed=5))
    out = tmp_path / "run"
    _torchrun(["-m", "d2sd.train", "--fsdp", "--data", str(data), "--max-steps", "4", "--save-every", "2",
               "--log-every", "1", "--global-batch-size", "4", "--micro-batch-size", "1", "--num-anchors", "8",
               "--max-length", "96", "--out", str(out)])
    want = (out / "metrics.jsonl").read_text().splitlines()
    import shutil

    shutil.rmtree(out / "checkpoints" / ckpt.step_dir_name(4))
    text = _torchrun(["-m", "d2sd.train", "--resume", str(out)])
    assert text.count("resumed from") == 1 and ckpt.step_dir_name(2) in text
    got = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["loss"] for r in got] == [json.loads(r)["loss"] for r in want]
    state = ckpt.load_trainer_state(out / "checkpoints" / ckpt.step_dir_name(4))
    assert state["fsdp"] is True and state["world_size"] == 2


def test_more_ranks_than_gpus_is_a_clear_error(monkeypatch):
    """A rank whose local GPU does not exist fails with what to do, not 'invalid device ordinal'."""
    monkeypatch.setenv("LOCAL_RANK", str(max(torch.cuda.device_count(), 0) + 1))
    with pytest.raises(RuntimeError, match="at most one process per GPU"):
        ddist.setup("cuda")
