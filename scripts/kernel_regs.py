"""Registers and spill stack of every d2kernels Triton kernel, compiled for sm_90 on any machine.

The op's launcher runs on CPU tensors of the real shapes with every kernel launch intercepted
(nothing executes); each launch's argument types, integer specializations and constexprs are
replayed through ``triton.compile`` for an sm_90 target, and ``cuobjdump`` (shipped with
Triton) reads the cubin's resource usage. No GPU needed. The numbers track an H200 run of the
same kernel (a different Triton version can differ a little): check a register-pressure change
here before spending device time. Spills inside a hot loop cost the most; a spill stack of 0 is
the goal for the bf16 paths.

Usage (repository root):  python scripts/kernel_regs.py [--ops ce attn emb] [--arch 90]
"""
import argparse
import os
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

sys.path.insert(0, os.getcwd())
import d2kernels  # noqa: E402
import d2kernels.cross_entropy.triton as ce_triton  # noqa: E402

_TY = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64",
       torch.int32: "i32", torch.int64: "i64", torch.int8: "i8", torch.bool: "i1", torch.uint8: "u8"}


def capture(run_op):
    """Run ``run_op()`` with every Triton launch recorded instead of executed -> [(fn, args, kwargs)]."""
    seen = []
    orig = JITFunction.run

    def fake_run(self, *args, grid, warmup, **kwargs):
        seen.append((self, args, kwargs))

    JITFunction.run = fake_run
    try:
        with d2kernels.validation("off"), torch.no_grad():
            run_op()
    finally:
        JITFunction.run = orig
    return seen


def signature(fn, args, kwargs):
    """Triton's view of one launch: argument types, constexprs, and which ints are multiples of 16."""
    names = [p.name for p in fn.params]
    values = dict(zip(names, args))
    values.update({k: v for k, v in kwargs.items() if k in names})
    options = {k: v for k, v in kwargs.items() if k not in names}
    sig, consts, div16 = {}, {}, []
    for i, p in enumerate(fn.params):
        v = values[p.name]
        if p.is_constexpr:
            sig[p.name], consts[p.name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[p.name] = "*" + _TY[v.dtype]
            div16.append(i)  # torch allocations are 16-byte aligned
        elif isinstance(v, bool):
            sig[p.name] = "i1"
        elif isinstance(v, int):
            if v == 1 and not p.do_not_specialize:  # Triton turns ints equal to 1 into constants
                sig[p.name], consts[p.name] = "constexpr", 1
            else:
                sig[p.name] = "i64" if abs(v) >= 2**31 else "i32"
                if v % 16 == 0 and not p.do_not_specialize:
                    div16.append(i)
        elif isinstance(v, float):
            sig[p.name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: argument {p.name} of type {type(v).__name__}")
    return sig, consts, {(i,): [["tt.divisibility", 16]] for i in div16}, options


def resource_usage(fn, args, kwargs, arch):
    sig, consts, attrs, options = signature(fn, args, kwargs)
    opts = {k: options[k] for k in ("num_warps", "num_stages") if k in options}
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                       target=GPUTarget("cuda", arch, 32), options=opts)
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    line = next(l for l in out.splitlines() if "REG:" in l)
    fields = dict(x.split(":") for x in line.split() if ":" in x)
    key = ", ".join(f"{n}={v}" for n, v in consts.items() if n.isupper() and not isinstance(v, float))
    return int(fields["REG"]), int(fields["STACK"]), k.metadata.shared, opts, key


def ops(names):
    """CPU inputs at the key shapes (qwen3-4b, b7, D2): one callable per op, its launches captured."""
    g = torch.Generator().manual_seed(0)
    bf = torch.bfloat16
    Bt, S, N, B, Hq, Hkv, D, H, V = 1, 4096, 512, 7, 32, 8, 128, 2560, 151936
    anchors = torch.sort(torch.randperm(S - B, generator=g)[:N])[0].unsqueeze(0)
    keep = torch.ones(Bt, N, dtype=torch.bool)
    out = {}
    if "attn" in names:
        def attn():
            q = torch.zeros(Bt, N * B, Hq, D, dtype=bf, requires_grad=True)
            kc, vc = (torch.zeros(Bt, S, Hkv, D, dtype=bf, requires_grad=True) for _ in range(2))
            kd, vd = (torch.zeros(Bt, N * B, Hkv, D, dtype=bf, requires_grad=True) for _ in range(2))
            from d2kernels.attention import triton as attn_triton
            o, lse = attn_triton.varprefix_attention_fwd(q, kc, vc, kd, vd, anchors, keep, B, D**-0.5)
            attn_triton.varprefix_attention_bwd(torch.zeros_like(o), q, kc, vc, kd, vd, o, lse, anchors, keep, B, D**-0.5)
        out["attn"] = attn
    if "ce" in names:
        def ce():
            cfg = ce_triton.CEConfig()  # the GPU tiles (on a CPU the launcher would pick interpreter tiles)
            orig = ce_triton._config
            ce_triton._config = lambda dev, dot_dtype: cfg
            try:
                T = 3584
                h = torch.zeros(T, H, dtype=bf)
                W = torch.zeros(V, H, dtype=bf)
                labels = torch.zeros(T, dtype=torch.long)
                w = torch.ones(T)
                from d2kernels.cross_entropy import CEOptions
                ce_triton.decayed_ce_fwd_with_grad(h, W, labels, w, CEOptions())
                ce_triton.decayed_ce_fwd_with_grad(h, W, labels, w, CEOptions(softcap=30.0))
                ce_triton.decayed_ce_fwd(h, W, labels, w, CEOptions())
            finally:
                ce_triton._config = orig
        out["ce"] = ce
    if "emb" in names:
        def emb():
            from d2kernels.embedding import triton as emb_triton
            weight = torch.zeros(V, H, dtype=bf)
            ids = torch.zeros(Bt, S, dtype=torch.long)
            prefix = torch.zeros(Bt, N, dtype=torch.long)
            emb_triton.noise_embedding_fwd(weight, ids, anchors, keep, prefix, B, V - 1)
        out["emb"] = emb
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ops", nargs="+", default=["ce", "attn", "emb"], choices=["ce", "attn", "emb"])
    ap.add_argument("--arch", type=int, default=90, help="compute capability to compile for (90 = H100/H200)")
    args = ap.parse_args()
    print("| kernel | constexprs | warps/stages | registers | spill stack (B/thread) | shared (B) |")
    print("|---|---|---|---|---|---|")
    done = set()
    for op, run_op in ops(args.ops).items():
        for fn, a, kw in capture(run_op):
            regs, stack, smem, opts, key = resource_usage(fn, a, kw, args.arch)
            row = (fn.__name__, key, opts.get("num_warps", 4), opts.get("num_stages", 3))
            if row in done:
                continue
            done.add(row)
            print(f"| {row[0]} | {key} | {row[2]}/{row[3]} | {regs} | {stack} | {smem} |", flush=True)


if __name__ == "__main__":
    main()
