"""Registers and spill stack of the CE block kernel compiled for sm_90, on any machine (no GPU).

Triton compiles to a cubin for a named target without a driver; ``cuobjdump`` (shipped with
Triton) reads its resource usage. The numbers track what the H200 run reports (same kernel, a
different Triton can differ a little): use it to check a register-pressure change before
spending device time.

Usage (repository root):  python scripts/kernel_regs.py [--variants default softcap stats fp32]
"""
import argparse
import inspect
import os
import subprocess
import sys
import tempfile

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, os.getcwd())
import d2kernels.cross_entropy.triton as ce  # noqa: E402

# argument types of _ce_block_kernel at the bf16 key shape; ints the GPU run specializes as
# multiples of 16 (H, V, Vc, row strides) are marked so the compiled code matches
TYPES = {"h_ptr": "*bf16", "w_ptr": "*bf16", "rows_ptr": "*i32", "lab_ptr": "*i32", "p_ptr": "*bf16",
         "sm_ptr": "*fp32", "ss_ptr": "*fp32", "zl_ptr": "*fp32", "acc_ptr": "*fp32", "mrun_ptr": "*fp32",
         "srun_ptr": "*fp32", "sync_ptr": "*i32", "err_ptr": "*i32", "Tb": "i32", "H": "i32", "V": "i32",
         "Vc": "i32", "softcap": "fp32", "n_chunks": "i32", "stride_ht": "i32", "stride_wv": "i32"}
DIV16 = ("H", "V", "Vc", "stride_ht", "stride_wv")
VARIANTS = {"default": {}, "softcap": {"SOFTCAP": True}, "stats": {"WRITE_P": False},
            "fp32": {"DOT_DTYPE": tl.float32, "IEEE_A": True, "IEEE_B": True, "num_stages": 2}}


def resource_usage(fn, types, consts, num_warps, num_stages):
    names = list(inspect.signature(fn.fn).parameters)
    sig = {n: ("constexpr" if n in consts else types[n]) for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if sig[n].startswith("*") or n in DIV16}
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=num_stages))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    line = next(l for l in out.splitlines() if "REG:" in l)
    fields = dict(x.split(":") for x in line.split() if ":" in x)
    return int(fields["REG"]), int(fields["STACK"]), k.metadata.shared


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = ap.parse_args()
    cfg = ce.CEConfig()
    print("| variant | registers | spill stack (bytes/thread) | shared memory (bytes) |")
    print("|---|---|---|---|")
    for name in args.variants:
        over = dict(VARIANTS[name])
        stages = over.pop("num_stages", cfg.num_stages)
        consts = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_H=cfg.block_h, GROUP_M=8,
                      EVEN_K=True, SOFTCAP=False, DOT_DTYPE=tl.bfloat16, IEEE_A=False, IEEE_B=False, WRITE_P=True,
                      TAU=60.0, SPIN=1 << 24, stride_hh=1, stride_wh=1)
        consts.update(over)
        regs, stack, smem = resource_usage(ce._ce_block_kernel, TYPES, consts, cfg.num_warps, stages)
        print(f"| {name} | {regs} | {stack} | {smem} |", flush=True)


if __name__ == "__main__":
    main()
