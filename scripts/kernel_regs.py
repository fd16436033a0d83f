"""Registers and spill stack of every d2kernels Triton kernel, compiled for sm_90 on any machine.

The op's launcher runs on CPU tensors of the real shapes with every kernel launch intercepted
(nothing executes); Triton's own binder specializes each launch for an sm_90 target (argument
types, integer and alignment specializations, constexprs) and ``triton.compile`` builds it, and ``cuobjdump`` (shipped with
Triton) reads the cubin's resource usage. No GPU needed. The numbers track an H200 run of the
same kernel (a different Triton version can differ a little): check a register-pressure change
here before spending device time. Spills inside a hot loop cost the most; a spill stack of 0 is
the goal for the bf16 paths. ``--sass DIR`` also writes the machine code: a refactor whose SASS
diff is empty needs no new GPU run.

Usage (repository root):  python scripts/kernel_regs.py [--ops ce attn emb] [--arch 90] [--sass DIR]
"""
import argparse
import hashlib
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.compiler.compiler import make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

sys.path.insert(0, os.getcwd())
import d2kernels  # noqa: E402
import d2kernels.cross_entropy.triton as ce_triton  # noqa: E402


def capture(run_op):
    """Run ``run_op()`` with every Triton launch recorded instead of executed -> [(fn, args, kwargs)]."""
    seen = []
    orig = JITFunction.run

    def fake_run(self, *args, grid, warmup, **kwargs):
        seen.append((self, args, kwargs))
        if self.fn.__name__ == "_ce_compact_kernel":  # the host reads its count: emulate it in torch
            tw, lab, rows, rows32, labc, twc, lse, _, err, den, count = args[:11]
            sup = torch.nonzero(tw > 0).flatten()
            n = sup.numel()
            rows[:n], rows32[:n], labc[:n], twc[:n] = sup, sup.int(), lab[sup].int(), tw[sup]
            den.fill_(tw.sum()), lse.zero_(), err.zero_(), count.copy_(torch.tensor([n, 0]))

    JITFunction.run = fake_run
    try:
        with d2kernels.validation("off"), torch.no_grad():
            run_op()
    finally:
        JITFunction.run = orig
    return seen


def _cuobjdump(cubin: bytes, *flags: str) -> str:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, *flags, f.name], capture_output=True, text=True).stdout


def normalized_sass(cubin: bytes) -> str:
    """The machine code without addresses and encodings: equal text = the same instructions."""
    lines = (re.sub(r"/\*[0-9a-f]{4,}\*/", "", line).strip() for line in _cuobjdump(cubin, "-sass").splitlines())
    return "\n".join(l for l in lines if l and not l.startswith(("code for", "Function", ".", "//", "Fatbin", "=")))


def resource_usage(fn, args, kwargs, arch, sass_dir=None):
    """Compile one recorded launch the way ``JITFunction.run`` would on an sm_``arch`` device
    (Triton's own binder: the same argument types, integer and alignment specializations).
    ``sass_dir``: also write the kernel's normalized SASS there, one file per specialization."""
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    kwargs = dict(kwargs, debug=False)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    k = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    line = next(l for l in _cuobjdump(k.asm["cubin"], "--dump-resource-usage").splitlines() if "REG:" in l)
    fields = dict(x.split(":") for x in line.split() if ":" in x)
    named = {fn.params[path[0]].name: v for path, v in constexprs.items() if len(path) == 1}
    key = ", ".join(f"{n}={v}" for n, v in named.items() if n.isupper() and not isinstance(v, float))
    opts = {"num_warps": options.num_warps, "num_stages": options.num_stages}
    if sass_dir:
        tag = hashlib.md5(f"{key} {opts}".encode()).hexdigest()[:8]
        with open(os.path.join(sass_dir, f"{fn.__name__}_{tag}.sass"), "w") as f:
            f.write(normalized_sass(k.asm["cubin"]))
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
            for det in (True, False):
                attn_triton.varprefix_attention_bwd(torch.zeros_like(o), q, kc, vc, kd, vd, o, lse, anchors, keep,
                                                    B, D**-0.5, deterministic=det)
        out["attn"] = attn
    if "ce" in names:
        def ce():
            from d2kernels.cross_entropy import CEOptions
            orig = ce_triton._config
            # the GPU tiles (on a CPU the launcher would pick interpreter tiles), both schedules; the
            # split one runs its cuBLAS calls for real here, so it gets a small T and V. split + streamk:
            # its mm2 by the stream-K kernel, with tensor-descriptor loads and with pointer loads
            for schedule, T, Vs, extra in (("fused", 3584, V, {}), ("split", 256, 4096, {}),
                                           ("split", 256, 4096, dict(mm2="streamk")),
                                           ("split", 256, 4096, dict(mm2="streamk", mm2_tma=False))):
                cfg = ce_triton.CEConfig(schedule=schedule, **extra)
                ce_triton._config = lambda dev, dot_dtype, cfg=cfg: cfg
                try:
                    h = torch.zeros(T, H, dtype=bf)
                    W = torch.zeros(Vs, H, dtype=bf)
                    labels = torch.zeros(T, dtype=torch.long)
                    w = torch.ones(T)
                    ce_triton.decayed_ce_fwd_with_grad(h, W, labels, w, CEOptions())
                    ce_triton.decayed_ce_fwd_with_grad(h, W, labels, w, CEOptions(softcap=30.0))
                    ce_triton.decayed_ce_fwd(h, W, labels, w, CEOptions())
                    # the trainable lm_head's dW pass (its dlogits kernel), at a small T and V
                    # (its dW matmuls run for real here)
                    h, W, labels, w = h[:256], W[:4096], labels[:256], w[:256]
                    for sc in (0.0, 30.0):
                        ce_triton._dweight(torch.ones(()), h, W, labels, w, torch.zeros(256), sc)
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
            grad = torch.zeros(Bt, N * B, H, dtype=bf)
            emb_triton.noise_embedding_bwd(grad, ids, anchors, keep, prefix, B, V - 1, V)
        out["emb"] = emb
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ops", nargs="+", default=["ce", "attn", "emb"], choices=["ce", "attn", "emb"])
    ap.add_argument("--arch", type=int, default=90, help="compute capability to compile for (90 = H100/H200)")
    ap.add_argument("--sass", metavar="DIR", help="also write each kernel's normalized SASS to DIR: run before and "
                    "after a refactor and `diff -r` the two folders (no difference = the same machine code)")
    args = ap.parse_args()
    if args.sass:
        os.makedirs(args.sass, exist_ok=True)
    print("| kernel | constexprs | warps/stages | registers | spill stack (B/thread) | shared (B) |")
    print("|---|---|---|---|---|---|")
    done = set()
    for run_op in ops(args.ops).values():
        for fn, a, kw in capture(run_op):
            regs, stack, smem, opts, key = resource_usage(fn, a, kw, args.arch, args.sass)
            row = (fn.__name__, key, opts.get("num_warps", 4), opts.get("num_stages", 3))
            if row in done:
                continue
            done.add(row)
            print(f"| {row[0]} | {key} | {row[2]}/{row[3]} | {regs} | {stack} | {smem} |", flush=True)


if __name__ == "__main__":
    main()
