"""GPU check + timing of ``decayed_cross_entropy`` (one call: correctness in bf16, then the table).

Usage (repository root, CUDA device):
    PYTHONPATH=. python3 scripts/gpu_cross_entropy.py [--configs all|default] [--no-compile] [--shapes key|all]
Correctness: bf16 (and fp32 at a small V) against float64, every gradient, vs plain torch bf16 error.
Timing: fwd+bwd (frozen lm_head, as the drafter trains) with do_bench medians; peak extra memory.
Providers: ours / torch eager / torch.compile / Liger FLCE / Cut Cross-Entropy (skipped if missing).
Writes ``$OUT/gpu_cross_entropy.json`` and prints a table last.
"""
import argparse
import json
import os
import sys
import traceback

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

sys.path.insert(0, os.getcwd())
import d2kernels.cross_entropy.triton as ce_triton  # noqa: E402
from d2kernels.cross_entropy import CEOptions, decayed_cross_entropy  # noqa: E402
from d2kernels.layout import decay_weights  # noqa: E402

DEV = "cuda"
OUT = os.environ.get("OUT", "/tmp")
RESULTS = {"env": {}, "correctness": [], "timing": []}


def rel_err(out, ref):
    out, ref = out.detach().double(), ref.detach().double()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def bench(fn):
    return do_bench(fn, warmup=40, rep=250, return_mode="median")


def peak_mib(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def make(T, H, V, frac_sup, dtype=torch.bfloat16, seed=0, wscale=0.02):
    g = torch.Generator(device=DEV).manual_seed(seed)
    h = torch.randn(T, H, device=DEV, generator=g).to(dtype)
    W = (torch.randn(V, H, device=DEV, generator=g) * wscale).to(dtype)
    labels = torch.randint(0, V, (T,), device=DEV, generator=g)
    off = torch.arange(T, device=DEV) % 7
    mask = torch.rand(T, device=DEV, generator=g) < frac_sup
    return h, W, labels, mask, off


# ------------------------------------------------------------------------------------------------
def check(T, H, V, dtype, softcap, frac=0.5):
    h, W, labels, mask, off = make(T, H, V, frac, dtype, seed=V + T)

    def ours():
        hh, WW = h.clone().requires_grad_(), W.clone().requires_grad_()
        num, den, cor = decayed_cross_entropy(hh, WW, labels, mask, off, gamma=4.0, softcap=softcap,
                                              return_correct=True, backend="triton")
        num.backward()
        return num, cor, hh.grad, WW.grad

    def plain(cast):
        hh, WW = h.detach().to(cast).requires_grad_(), W.detach().to(cast).requires_grad_()
        w = decay_weights(mask, off, 4.0)
        sel = w > 0
        z = (hh[sel] @ WW.t()).to(torch.float64 if cast == torch.float64 else torch.float32)
        if softcap:
            z = softcap * torch.tanh(z / softcap)
        num = (w[sel].to(z.dtype) * F.cross_entropy(z, labels[sel], reduction="none")).sum()
        num.backward()
        cor = torch.zeros_like(sel)
        cor[sel] = z.argmax(-1) == labels[sel]
        return num, cor, hh.grad, WW.grad

    o, t, r = ours(), plain(dtype), plain(torch.float64)
    row = {"T": T, "H": H, "V": V, "dtype": str(dtype), "softcap": softcap}
    ok = True
    for i, name in ((0, "num"), (2, "dhidden"), (3, "dweight")):
        e, te = rel_err(o[i], r[i]), rel_err(t[i], r[i])
        lim = 1e-4 if dtype == torch.float32 else min(2e-2, 2 * max(te, 1e-4))
        row[name] = (e, te)
        ok &= e <= lim
    row["correct_agree"] = (o[1] == r[1]).float().mean().item()
    row["ok"] = bool(ok)
    RESULTS["correctness"].append(row)
    print("check", json.dumps(row), flush=True)


# ------------------------------------------------------------------------------------------------
def providers(h, W, labels, mask, off, gamma=4.0):
    w = decay_weights(mask, off, gamma)
    tgt = labels

    def ours():
        num, den = decayed_cross_entropy(h, W, labels, mask, off, gamma=gamma, backend="triton")
        (num / (den + 1e-6)).backward()

    def ours_fwd_only():
        with torch.no_grad():
            decayed_cross_entropy(h, W, labels, mask, off, gamma=gamma, backend="triton")

    def eager():
        logits = h @ W.t()
        loss = (F.cross_entropy(logits.float(), tgt, reduction="none") * w).sum() / w.sum()
        loss.backward()

    def lossfn(h, W, tgt, w):
        logits = h @ W.t()
        return (F.cross_entropy(logits.float(), tgt, reduction="none") * w).sum() / w.sum()

    out = {"ours": ours, "ours_fwd_nograd": ours_fwd_only, "torch_eager": eager}
    if not ARGS.no_compile:
        cl = torch.compile(lossfn)
        out["torch_compile"] = lambda: cl(h, W, tgt, w).backward()
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        tg = torch.where(w > 0, tgt, torch.full_like(tgt, -100))
        out["liger_flce(no decay)"] = lambda: liger_fused_linear_cross_entropy(
            h, W, tg, ignore_index=-100, reduction="mean").backward()
    except Exception as e:  # not installed: skip the provider
        print("liger unavailable:", repr(e)[:200])
    try:
        from cut_cross_entropy import linear_cross_entropy

        def cce():
            loss = (linear_cross_entropy(h, W, tgt, reduction="none").float() * w).sum() / w.sum()
            loss.backward()

        out["cce"] = cce
    except Exception as e:
        print("cce unavailable:", repr(e)[:200])
    return out


def time_shape(T, H, V, frac, which):
    h, W, labels, mask, off = make(T, H, V, frac, seed=1)
    h.requires_grad_(True)
    flops_mm = 2.0 * T * H * V * frac
    res = {}
    for name, fn in providers(h, W, labels, mask, off).items():
        if name not in which:
            continue
        try:
            fn()
            ms = bench(fn)
            mem = peak_mib(fn)
            h.grad = None
            res[name] = (ms, mem)
            row = {"T": T, "H": H, "V": V, "sup": frac, "provider": name, "ms": ms, "peak_mib": mem,
                   "cfg": CFG_NAME, "tflops_2mm": 2 * flops_mm / ms / 1e9}
            RESULTS["timing"].append(row)
            print("time", json.dumps(row), flush=True)
        except Exception as e:
            print("FAILED", name, T, H, V, frac, repr(e)[:400], flush=True)
            traceback.print_exc()
        torch.cuda.empty_cache()
    return res


def fixed_budget(mib):
    """A config whose chunk budget is exactly ``mib`` MiB (no 64 MiB cap, no growth with the stash)."""
    return ce_triton.CEConfig(budget=mib << 20, peak_cap=0, budget_per_stash=0.0)


CONFIGS = {
    "default": ce_triton.CEConfig(),  # the split schedule
    "fused": ce_triton.CEConfig(schedule="fused"),
    "fused_b40": ce_triton.CEConfig(schedule="fused", budget=40 << 20),
    **{f"split_r{m}x{c}w{w}": ce_triton.CEConfig(rows_m=m, rows_block=c, rows_warps=w)
       for m, c, w in [(2, 1024, 4), (2, 2048, 8), (1, 4096, 8), (1, 2048, 2), (1, 2048, 1), (2, 1024, 2), (1, 1024, 1)]},
    "split_b40": fixed_budget(40),
    "split_rev": ce_triton.CEConfig(rows_reverse=True),
    "split_sk": ce_triton.CEConfig(mm2="streamk"),  # mm2 = the stream-K Triton kernel, K-aligned ranges
    "split_sk_s4": ce_triton.CEConfig(mm2="streamk", mm2_stages=4),
    "split_sk_tile": ce_triton.CEConfig(mm2="streamk", mm2_order="tile"),
    # T-blocks of N rows, the last one shorter (and its chunks wider); _notail: every block's chunks Vc wide
    **{f"rows{n}": ce_triton.CEConfig(split_rows=n) for n in (640, 768, 896, 1024, 1152, 1280, 1408, 1536, 1664, 1792, 1920)},
    "default_notail": ce_triton.CEConfig(),
    # chunks queued before the count's host sync (_split_speculate): none, or two
    "nospec": ce_triton.CEConfig(spec_chunks=0),
    "spec2": ce_triton.CEConfig(spec_chunks=2),
    "even": ce_triton.CEConfig(rows_tail=False),  # blocks of equal height: 3 x 1280 at the key shape (the rule before)
    "nocap": ce_triton.CEConfig(peak_cap=0),  # chunk budget max(45 MiB, 1.5 x stash) at every shape, no big-stash plan
    "cap_min16": ce_triton.CEConfig(budget_min=16 << 20),  # the 64 MiB cap also at T=8192 H=2560 (23 MiB of chunks)
    **{f"wchunk{n}": ce_triton.CEConfig(w_chunk_bytes=n << 20) for n in (32, 64)},
}


def use(cname):
    """Make ``decayed_cross_entropy`` run config ``cname``: a CONFIGS key, or ``plan{Tb}x{Vc}`` (the
    default config with that split plan forced at every shape: T-blocks of Tb rows, chunks Vc wide)."""
    global CFG_NAME
    CFG_NAME = cname
    forced = tuple(map(int, cname[4:].split("x"))) if cname.startswith("plan") else None
    ce_triton._config = lambda dev, dot_dtype, c=CONFIGS.get(cname, CONFIGS["default"]): c
    ce_triton._block_cols = (lambda tb, Tb, Vc, V: Vc) if cname.endswith("_notail") else BLOCK_COLS
    ce_triton._split_plan = SPLIT_PLAN if forced is None else forced_plan(*forced)
    ce_triton._host_wait = host_wait_cached if cname == "nosync" else HOST_WAIT


def host_wait_cached(pending, _cache={}):
    """An upper bound, not a provider: the count's host sync skipped after the first call (the last count
    read is reused, so valid only while the inputs stay the same): what the GPU idles at the sync costs."""
    key = pending[0].numel()
    if key not in _cache:
        _cache[key] = HOST_WAIT(pending)
    return _cache[key]


def forced_plan(Tb, Vc):
    """A ``_split_plan`` that always answers T-blocks of ``Tb`` rows and chunks ``Vc`` wide."""
    return lambda T, Tc, H, V, itemsize, cfg, need_dh: (min(Tc, Tb), min(V, Vc))


BLOCK_COLS, SPLIT_PLAN, HOST_WAIT = ce_triton._block_cols, ce_triton._split_plan, ce_triton._host_wait


def profile(T, H, V, frac):
    """GPU time per kernel name over one fwd+bwd of ours (torch.profiler), largest first."""
    from ce_kernels import per_kernel, show
    h, W, labels, mask, off = make(T, H, V, frac, seed=1)
    h.requires_grad_(True)
    show(f"profile {CFG_NAME} T={T} sup={frac:.0%}", per_kernel(providers(h, W, labels, mask, off)["ours"], 1, 0.0), top=8)


def split_floor(T, H, V, frac, cfg):
    """The split schedule's cuBLAS calls alone: its forward with the row pass and the finalize made
    no-ops (same plan, same gathers; P is whatever the buffer holds), i.e. what its chunked matmuls cost."""
    h, W, labels, mask, off = make(T, H, V, frac, seed=1)
    w = decay_weights(mask, off, 4.0)
    Tc = int((w > 0).sum())
    Tb, Vc = ce_triton._split_plan(T, Tc, H, V, 2, cfg, True)
    rows_pass, finalize = ce_triton._rows_pass, ce_triton._finalize
    ce_triton._rows_pass = ce_triton._finalize = lambda *a, **k: None
    try:
        ms = bench(lambda: ce_triton.decayed_ce_fwd_with_grad(h, W, labels, w, CEOptions()))
    finally:
        ce_triton._rows_pass, ce_triton._finalize = rows_pass, finalize
    row = {"T": T, "H": H, "V": V, "sup": frac, "provider": "split_cublas_only", "ms": ms, "peak_mib": 0.0,
           "cfg": f"{CFG_NAME} Tb={Tb} Vc={Vc}", "tflops_2mm": 2 * 2.0 * Tc * H * V / ms / 1e9}
    RESULTS["timing"].append(row)
    print("time", json.dumps(row), flush=True)


def chunk_gemms(Tb, Vc, H):
    """One chunk's cuBLAS calls of the split schedule on random bf16 data -> ({name: callable}, acc, acc_t):
    ``mm1`` (``S = h @ W_c^T``), ``mm2`` (``acc += P @ W_c``, f32 out, as the schedule calls it) and
    ``mm2_t`` (``accT += W_c^T @ P^T``: the same products, another cuBLAS kernel choice)."""
    f32, bf = torch.float32, torch.bfloat16
    h = torch.randn(Tb, H, device=DEV, dtype=bf)
    w = torch.randn(Vc, H, device=DEV, dtype=bf) * 0.02
    s = torch.empty(Tb, Vc, device=DEV, dtype=bf)
    p = torch.rand(Tb, Vc, device=DEV).to(bf)
    acc = torch.zeros(Tb, H, device=DEV, dtype=f32)
    acc_t = torch.zeros(H, Tb, device=DEV, dtype=f32)
    fns = {
        "mm1": lambda: torch.mm(h, w.t(), out=s),
        "mm2": lambda: torch.addmm(acc, p, w, out_dtype=f32, out=acc),
        "mm2_t": lambda: torch.addmm(acc_t, w.t(), p.t(), out_dtype=f32, out=acc_t),
    }
    return fns, acc, acc_t


def gemm_sweep(T, H, V, budget_mib=45, heights=range(128, 2049, 128), plans=None):
    """The split schedule's two cuBLAS calls alone, one whole vocabulary sweep per T-block height ``Tb``
    (chunks as wide as the budget allows, the real ``W [V, H]``, back to back as in the loop): ms of all
    ``S = h @ W_c^T`` and of all ``acc += P @ W_c`` (f32 out). ``acc``'s output tiles are only ``Tb x H``,
    so its wave fill depends on Tb; a partition of T into blocks costs the sum of its blocks' rows here.
    ``plans``: explicit ``(Tb, Vc, parts)`` instead, ``parts`` = how many column slices of ``acc`` the
    second matmul is issued as (one cuBLAS call each)."""
    f32, bf = torch.float32, torch.bfloat16
    W = torch.randn(V, H, device=DEV, dtype=bf) * 0.02
    print(f"gemm sweep T={T} H={H} V={V} budget {budget_mib} MiB (whole-V sweeps, do_bench medians)", flush=True)
    if plans is None:
        plans = [(Tb, min(V, ((budget_mib << 20) - Tb * H * 4) // (Tb * 2) // 64 * 64), 1) for Tb in heights]
    for Tb, Vc, parts in plans:
        if Vc < 1024:
            continue
        h = torch.randn(Tb, H, device=DEV, dtype=bf)
        s = torch.rand(Tb * Vc, device=DEV).to(bf)
        acc = torch.zeros(Tb, H, device=DEV, dtype=f32)
        chunks = [(W[v0:v0 + min(Vc, V - v0)], s[:Tb * min(Vc, V - v0)].view(Tb, -1)) for v0 in range(0, V, Vc)]
        cols = [(c0, min(H, c0 + H // parts)) for c0 in range(0, H, H // parts)]

        def mm1(chunks=chunks, h=h):
            for w, sc in chunks:
                torch.mm(h, w.t(), out=sc)

        def mm2(chunks=chunks, acc=acc, cols=cols):
            for i, (w, sc) in enumerate(chunks):
                for c0, c1 in cols:
                    a = acc[:, c0:c1]
                    torch.addmm(a, sc, w[:, c0:c1], out_dtype=f32, out=a) if i else torch.mm(sc, w[:, c0:c1], out_dtype=f32, out=a)

        t1, t2 = bench(mm1), bench(mm2)
        fl = 2.0 * Tb * V * H
        row = {"Tb": Tb, "Vc": Vc, "parts": parts, "chunks": len(chunks), "mm1_ms": t1, "mm2_ms": t2}
        RESULTS.setdefault("gemm_sweep", []).append(dict(row, T=T, H=H, V=V))
        print(f"gemm Tb={Tb:5d} Vc={Vc:6d} x{len(chunks):3d} parts {parts}: mm1 {t1:6.3f} ms {fl / t1 / 1e9:4.0f} TF/s | "
              f"mm2 {t2:6.3f} ms {fl / t2 / 1e9:4.0f} TF/s | both per 128 rows {(t1 + t2) * 128 / Tb:.3f} ms", flush=True)
        del h, s, acc, chunks
    del W
    torch.cuda.empty_cache()


def duel(T, H, V, frac, rounds, cnames=("default",)):
    """ours (each config in ``cnames``) vs torch.compile, alternating ``rounds`` times in one process
    (clock and heat drift hit all)."""
    h, W, labels, mask, off = make(T, H, V, frac, seed=1)
    h.requires_grad_(True)
    prov = providers(h, W, labels, mask, off)

    def ours_with(cname):
        def fn():
            use(cname)
            prov["ours"]()
        return fn
    fns = {"ours" if len(cnames) == 1 else f"ours[{c}]": ours_with(c) for c in cnames}
    if "torch_compile" in prov:
        fns["torch_compile"] = prov["torch_compile"]
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            times[k].append(bench(fn))
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    comp = med.get("torch_compile", float("nan"))
    ratios = {k: comp / m for k, m in med.items() if k != "torch_compile"}
    print(f"duel T={T} H={H} V={V} sup={frac:.0%}: " + " | ".join(f"{k} {' '.join(f'{t:.3f}' for t in v)}" for k, v in times.items())
          + " | medians " + ", ".join(f"{k} {m:.3f}" for k, m in med.items())
          + " -> " + ", ".join(f"{k} {r:.3f}x" for k, r in ratios.items()), flush=True)
    RESULTS.setdefault("duel", []).append({"T": T, "H": H, "V": V, "sup": frac, "times": times, "ratios": ratios})
    use("default")
    h.grad = None
    torch.cuda.empty_cache()


CFG_NAME = "default"

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="default", help="'default', 'all' or a comma list of CONFIGS keys")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider (slow to compile)")
    ap.add_argument("--shapes", default="key", help="'key': T=3584 H=2560 V=151936; 'all': the benchmark grid; "
                    "'none': only the config sweep; or 'TxHxV,...'")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--sweep-shape", default="3584x2560x151936", help="TxHxV of the config sweep, --split-plans, "
                    "--gemm-sweep and the duel's first shape")
    ap.add_argument("--profile", action="store_true", help="per-kernel GPU times of ours for each swept config")
    ap.add_argument("--split-plans", default="", help="forced split plans 'TbxVc,...' timed at the key shape (100%%), "
                    "e.g. '1792x8000,1280x13312,1920x7424' (peak MiB shows whether one fits the 64 MiB)")
    ap.add_argument("--budget-mib", type=int, default=0, help="override CEConfig.budget (the chunk buffers of "
                    "either schedule; no 64 MiB cap, no growth with the stash)")
    ap.add_argument("--extra", default="", help="more shapes for ours + torch.compile only, e.g. '8192x4096x262144'")
    ap.add_argument("--budgets", default="", help="comma list of CEConfig.budget values in MiB: ours at each "
                    "(100%% and ~50%%) and torch.compile once, at the --extra shapes, then exit")
    ap.add_argument("--gemm-sweep", action="store_true", help="the split schedule's cuBLAS calls per T-block height, then exit")
    ap.add_argument("--gemm-plans", default="", help="'TbxVcxPARTS,...': --gemm-sweep's cuBLAS calls at these block "
                    "plans, the second matmul issued as PARTS column slices of acc")
    ap.add_argument("--duel", type=int, default=0, help="N rounds of ours vs torch.compile alternating (key shape, "
                    "plus --extra shapes), then exit; --configs may name forced split plans 'plan{Tb}x{Vc}'")
    ap.add_argument("--fracs", default="1.0,0.5", help="supervised fractions of the duel")
    ARGS = ap.parse_args()
    if ARGS.budget_mib:
        for c in CONFIGS.values():  # exactly this budget for every swept config too
            c.budget, c.peak_cap, c.budget_per_stash = ARGS.budget_mib << 20, 0, 0.0
        ce_triton._config = lambda dev, dot_dtype, c=fixed_budget(ARGS.budget_mib): c
    RESULTS["env"] = {"torch": torch.__version__, "triton": triton.__version__, "gpu": torch.cuda.get_device_name()}
    print(RESULTS["env"], flush=True)
    torch.manual_seed(0)
    KEY = tuple(map(int, ARGS.sweep_shape.split("x")))
    if ARGS.gemm_plans:
        gemm_sweep(*KEY, plans=[tuple(map(int, e.split("x"))) for e in ARGS.gemm_plans.split(",")])
    if ARGS.gemm_sweep:
        gemm_sweep(*KEY)
        if ARGS.extra:
            gemm_sweep(8192, 4096, 262144)
    if ARGS.gemm_sweep or ARGS.gemm_plans:
        if not ARGS.duel and ARGS.configs == "default":
            sys.exit(0)
    if ARGS.budgets:
        for spec in filter(None, ARGS.extra.split(",")):
            T, H, V = map(int, spec.split("x"))
            for mib in map(int, ARGS.budgets.split(",")):
                CFG_NAME = f"budget {mib} MiB"
                ce_triton._config = lambda dev, dot_dtype, c=fixed_budget(mib): c
                for frac in (1.0, 0.5):
                    time_shape(T, H, V, frac, ("ours",))
            CFG_NAME = "default"
            ce_triton._config = lambda dev, dot_dtype: ce_triton.CEConfig()
            time_shape(T, H, V, 1.0, ("torch_compile",))
        sys.exit(0)
    if ARGS.duel:
        cnames = ARGS.configs.split(",")  # ours with each, side by side
        for (T, H, V) in [KEY] + [tuple(map(int, e.split("x"))) for e in filter(None, ARGS.extra.split(","))]:
            for frac in map(float, ARGS.fracs.split(",")):
                duel(T, H, V, frac, ARGS.duel, cnames)
        json.dump(RESULTS, open(os.path.join(OUT, "gpu_cross_entropy_duel.json"), "w"), indent=1)
        sys.exit(0)

    def checks():
        if ARGS.no_check:
            return
        for args in [(512, 2560, 151936, torch.bfloat16, None), (300, 2560, 262144, torch.bfloat16, 30.0)]:
            try:
                check(*args)
            except Exception as e:
                print("CHECK FAILED", args, repr(e)[:400], flush=True)
                traceback.print_exc()
    shapes = [] if ARGS.shapes == "none" else [(3584, 2560, 151936)]
    if ARGS.shapes == "all":
        shapes = [(T, H, V) for T in (3584, 8192) for H in (2560, 4096) for V in (151936, 262144)]
    elif "x" in ARGS.shapes:
        shapes = [tuple(map(int, e.split("x"))) for e in ARGS.shapes.split(",")]
    names = list(CONFIGS) if ARGS.configs == "all" else ([] if ARGS.configs == "default" else ARGS.configs.split(","))
    # sweep our configs first at the key shape, then everyone with the best one
    best = None
    for cname in names:
        use(cname)
        checks()  # every config swept is checked too
        r = time_shape(*KEY, 1.0, ("ours",))  # the harder case decides
        time_shape(*KEY, 0.5, ("ours",))
        if CONFIGS[cname].schedule == "split":
            for frac in (1.0, 0.5):
                split_floor(*KEY, frac, CONFIGS[cname])
        if ARGS.profile:
            profile(*KEY, 1.0)
        if "ours" in r and (best is None or r["ours"][0] < best[1]):
            best = (cname, r["ours"][0])
    for spec in filter(None, ARGS.split_plans.split(",")):
        # forced (Tb, Vc) plans of the split schedule at the key shape, 100% supervised
        Tb, Vc = map(int, spec.split("x"))
        CFG_NAME = f"plan {spec}"
        cfg = CONFIGS[best[0]] if best is not None else ce_triton.CEConfig()
        ce_triton._config = lambda dev, dot_dtype, c=cfg: c
        ce_triton._split_plan = forced_plan(Tb, Vc)
        try:
            time_shape(*KEY, 1.0, ("ours",))
            split_floor(*KEY, 1.0, cfg)
        finally:
            ce_triton._split_plan = SPLIT_PLAN
    if best is not None:
        use(best[0])
        print("best config", best, flush=True)
    if best is None:
        checks()  # no sweep: check the default config
    everyone = ("ours", "ours_fwd_nograd", "torch_eager", "torch_compile", "liger_flce(no decay)", "cce")
    for (T, H, V) in shapes:
        for frac in (1.0, 0.5):
            time_shape(T, H, V, frac, everyone)
    for spec in filter(None, ARGS.extra.split(",")):
        T, H, V = map(int, spec.split("x"))
        for frac in (1.0, 0.5):
            time_shape(T, H, V, frac, ("ours", "torch_compile"))
    a = torch.randn(3584, 2560, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(151936, 2560, device=DEV, dtype=torch.bfloat16)
    mm = bench(lambda: a @ b.t())
    print(f"cuBLAS one logits matmul 3584x2560x151936: {mm:.3f} ms = {2 * 3584 * 2560 * 151936 / mm / 1e9:.0f} TFLOP/s")
    RESULTS["one_matmul_ms"] = mm
    json.dump(RESULTS, open(os.path.join(OUT, "gpu_cross_entropy.json"), "w"), indent=1)
    print("\n| T | H | V | sup | provider | cfg | ms | peak MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in RESULTS["timing"]:
        print(f"| {r['T']} | {r['H']} | {r['V']} | {r['sup']:.0%} | {r['provider']} | {r['cfg']} | {r['ms']:.3f} | {r['peak_mib']:.0f} |")
    for r in RESULTS["correctness"]:
        print("check", r["dtype"], r["V"], r["softcap"], "ok" if r["ok"] else "FAIL",
              {k: f"{r[k][0]:.2e}/{r[k][1]:.2e}" for k in ("num", "dhidden", "dweight")}, f"agree={r['correct_agree']:.4f}")
