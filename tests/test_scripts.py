"""Developer scripts that must work on a CPU-only box."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _run(*args):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_kernel_regs_compiles_for_sm90_without_a_gpu():
    """scripts/kernel_regs.py replays the embedding launch through an sm_90 compile and reports it."""
    pytest.importorskip("triton.backends.nvidia")
    sass = REPO / "build" / "test_kernel_regs_sass"
    p = _run("scripts/kernel_regs.py", "--ops", "emb", "--sass", str(sass))
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [line for line in p.stdout.splitlines() if line.startswith("| noise_embedding_fwd_kernel")]
    assert rows, p.stdout
    regs, stack = (int(x) for x in rows[0].split("|")[4:6])
    assert 0 < regs <= 255 and stack >= 0
    dumps = list(sass.glob("noise_embedding_fwd_kernel_*.sass"))
    assert dumps and "EXIT" in dumps[0].read_text(), "the SASS dump should hold the kernel's instructions"


def test_kernel_regs_help():
    p = _run("scripts/kernel_regs.py", "--help")
    assert p.returncode == 0 and "--ops" in p.stdout


@pytest.mark.parametrize("script,flag", [("scripts/gemm_probe.py", "--cpu-check"), ("scripts/ce_timeline.py", "--frac"),
                                         ("scripts/gpu_cross_entropy.py", "--duel"), ("scripts/ce_kernels.py", "--warm-ms"),
                                         ("scripts/mm2_probe.py", "--shapes"), ("scripts/ce_memory.py", "--shapes"),
                                         ("scripts/gpu_cross_entropy.py", "--sweep-shape")])
def test_gpu_scripts_help(script, flag):
    """The device-side scripts answer --help on a CPU box (their GPU work starts after parsing)."""
    p = _run(script, "--help")
    assert p.returncode == 0 and flag in p.stdout, p.stderr[-2000:]


# the probes' interpreter checks are for CPU boxes: on a GPU machine run the probe itself (the H200's
# triton 3.6 interpreter fails on a scalar loop bound)
CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="an interpreter check for CPU boxes; on a GPU run the probe itself")


@CPU_ONLY
def test_gemm_probe_cpu_check():
    """The probe's Triton matmuls (pointer loads, TMA persistent, TMA + exp epilogue) match torch in the interpreter."""
    env = dict(os.environ, PYTHONPATH=str(REPO), TRITON_INTERPRET="1")
    p = subprocess.run([sys.executable, "scripts/gemm_probe.py", "--cpu-check"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "cpu check ok" in p.stdout, p.stderr[-3000:]


@CPU_ONLY
def test_mm2_probe_cpu_check():
    """The probe's stream-K matmul (pointer and tensor-descriptor loads, overwrite and accumulate) matches
    torch in the interpreter, bitwise the same on repeat, and leaves its scratch zeroed."""
    env = dict(os.environ, PYTHONPATH=str(REPO), TRITON_INTERPRET="1")
    p = subprocess.run([sys.executable, "scripts/mm2_probe.py", "--cpu-check"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "cpu check ok" in p.stdout, p.stderr[-3000:]
