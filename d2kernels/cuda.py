"""``backend="cuda"``: the CMake-built CUDA reference library (csrc/), loaded with ctypes.

The library is found at ``$D2KERNELS_CUDA_LIB`` or else ``build/libd2kernels_cuda.so`` at the
repository root. This module exposes the same host launchers as the Triton modules
(``varprefix_attention_fwd/bwd``, ``noise_embedding_fwd/bwd``, ``decayed_ce_fwd/bwd``), so the
custom ops dispatch to it unchanged. The kernels are plain references (fp32 accumulation,
float32/float16/bfloat16 inputs): obviously right, not fast.
"""
from __future__ import annotations

import ctypes
import os
from pathlib import Path

import torch

__all__ = [
    "BUILD_HELP",
    "library_path",
    "load_library",
    "varprefix_attention_fwd",
    "varprefix_attention_bwd",
    "noise_embedding_fwd",
    "noise_embedding_bwd",
    "decayed_ce_fwd",
    "decayed_ce_bwd",
]

BUILD_HELP = (
    "the CUDA reference library of d2kernels is not built. Build it from the repository root with:\n"
    "    cmake -S . -B build -DCMAKE_BUILD_TYPE=Release\n"
    "    cmake --build build -j\n"
    "or point D2KERNELS_CUDA_LIB at an existing libd2kernels_cuda.so"
)

ABI_VERSION = 2
_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # csrc/d2k_common.cuh D2kDtype
_LIB = None

_i64, _int, _f32, _ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_void_p
_strides = ctypes.POINTER(ctypes.c_int64)
_SIGNATURES = {
    "d2k_noise_embedding_fwd": [_ptr, _int, _i64, _i64, _i64, _i64, _ptr, _ptr, _ptr, _ptr,
                                _i64, _i64, _i64, _i64, _i64, _ptr, _int, _ptr],
    "d2k_noise_embedding_bwd": [_ptr, _int, _i64, _ptr, _ptr, _ptr, _ptr,
                                _i64, _i64, _i64, _i64, _i64, _i64, _ptr, _int, _ptr],
    "d2k_decayed_ce_fwd": [_ptr, _int, _i64, _i64, _ptr, _int, _i64, _i64, _ptr, _ptr, _i64, _i64, _i64, _f32,
                           _ptr, _ptr, _ptr, _ptr, _ptr, _int, _ptr],
    "d2k_decayed_ce_bwd": [_ptr, _ptr, _int, _i64, _i64, _ptr, _int, _i64, _i64, _ptr, _ptr, _ptr,
                           _i64, _i64, _i64, _f32, _ptr, _ptr, _int, _ptr],
    "d2k_varprefix_attention_fwd": [_ptr, _strides] * 5 + [_int, _ptr, _ptr] + [_i64] * 7 + [_f32, _ptr, _ptr, _int, _ptr],
    "d2k_varprefix_attention_bwd": [_ptr, _strides] * 6 + [_ptr, _ptr, _int, _ptr, _ptr] + [_i64] * 7
    + [_f32] + [_ptr] * 5 + [_int, _ptr],
}


def library_path() -> Path:
    """Where the library is looked for: ``$D2KERNELS_CUDA_LIB``, else ``<repo>/build/libd2kernels_cuda.so``."""
    env = os.environ.get("D2KERNELS_CUDA_LIB")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "build" / "libd2kernels_cuda.so"


def load_library() -> ctypes.CDLL:
    """Load (once) and return the CUDA reference library; raise with the build commands if missing."""
    global _LIB
    if _LIB is not None:
        return _LIB
    path = library_path()
    if not path.is_file():
        raise RuntimeError(f"backend='cuda' needs {path}, which does not exist: " + BUILD_HELP)
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise RuntimeError(f"backend='cuda': could not load {path} ({e}). Rebuild it: " + BUILD_HELP) from e
    if lib.d2k_abi_version() != ABI_VERSION:
        raise RuntimeError(f"{path} was built from other sources (ABI {lib.d2k_abi_version()}, need {ABI_VERSION}): " + BUILD_HELP)
    lib.d2k_last_error.restype = ctypes.c_char_p
    for name, argtypes in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes = argtypes
        fn.restype = ctypes.c_int
    _LIB = lib
    return lib


def _call(name: str, *args) -> None:
    lib = load_library()
    if getattr(lib, name)(*args) != 0:
        raise RuntimeError(f"d2kernels cuda {name}: {lib.d2k_last_error().decode()}")


def _device_args(*tensors: torch.Tensor):
    """``(device index, stream)`` of CUDA tensors; a clear error for anything else."""
    dev = tensors[0].device
    if dev.type != "cuda" or any(t.device != dev for t in tensors):
        raise ValueError(f"backend='cuda' needs all tensors on one CUDA device, got {[str(t.device) for t in tensors]}")
    return dev.index, ctypes.c_void_p(torch.cuda.current_stream(dev).cuda_stream)


def _code(t: torch.Tensor) -> int:
    if t.dtype not in _DTYPE_CODE:
        raise TypeError(f"backend='cuda' supports float32/float16/bfloat16, got {t.dtype}")
    return _DTYPE_CODE[t.dtype]


def _p(t: torch.Tensor):
    return ctypes.c_void_p(t.data_ptr())


def _s4(t: torch.Tensor):
    return (ctypes.c_int64 * 4)(*t.stride())


def _idx(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.int64).contiguous()


def _keep(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.uint8).contiguous()


# ---- noise_embedding -----------------------------------------------------------------------


def noise_embedding_fwd(weight, input_ids, anchors, keep, prefix_lens, block_size, mask_token_id):
    """``weight [V, H]`` -> ``out [Bt, N*B, H]`` (weight's dtype)."""
    device, stream = _device_args(weight, input_ids, anchors, keep, prefix_lens)
    Bt, N = anchors.shape
    V, H = weight.shape
    out = torch.empty((Bt, N * block_size, H), dtype=weight.dtype, device=weight.device)
    if out.numel() == 0:
        return out
    ids, anc, kp, pl = _idx(input_ids), _idx(anchors), _keep(keep), _idx(prefix_lens)
    _call("d2k_noise_embedding_fwd", _p(weight), _code(weight), V, H, weight.stride(0), weight.stride(1),
          _p(ids), _p(anc), _p(kp), _p(pl), Bt, ids.shape[1], N, block_size, mask_token_id, _p(out), device, stream)
    return out


def noise_embedding_bwd(grad_out, input_ids, anchors, keep, prefix_lens, block_size, mask_token_id, num_embeddings):
    """``grad_out [Bt, N*B, H]`` -> ``dweight [V, H]`` (grad_out's dtype), deterministic."""
    device, stream = _device_args(grad_out, input_ids, anchors, keep, prefix_lens)
    Bt, N = anchors.shape
    H = grad_out.shape[-1]
    g = grad_out.contiguous()
    dw = torch.empty((num_embeddings, H), dtype=g.dtype, device=g.device)
    if dw.numel() == 0:
        return dw
    if g.numel() == 0:
        return dw.zero_()
    ids, anc, kp, pl = _idx(input_ids), _idx(anchors), _keep(keep), _idx(prefix_lens)
    _call("d2k_noise_embedding_bwd", _p(g), _code(g), H, _p(ids), _p(anc), _p(kp), _p(pl),
          Bt, ids.shape[1], N, block_size, mask_token_id, num_embeddings, _p(dw), device, stream)
    return dw


# ---- varprefix_attention -------------------------------------------------------------------


def _attn_sizes(q, k_ctx, anchors, block_size):
    Bt, NB, Hq, D = q.shape
    return Bt, anchors.shape[1], block_size, k_ctx.shape[1], Hq, k_ctx.shape[2], D


def varprefix_attention_fwd(q, k_ctx, v_ctx, k_draft, v_draft, anchors, keep, block_size, scale):
    """-> ``o [Bt, NB, Hq, D]`` (q's dtype) and ``lse [Bt, Hq, NB]`` float32 (0 on dummy rows)."""
    device, stream = _device_args(q, k_ctx, v_ctx, k_draft, v_draft, anchors, keep)
    Bt, NB, Hq, D = q.shape
    o = torch.empty((Bt, NB, Hq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((Bt, Hq, NB), dtype=torch.float32, device=q.device)
    if o.numel() == 0:
        return o, lse
    anc, kp = _idx(anchors), _keep(keep)
    _call("d2k_varprefix_attention_fwd",
          _p(q), _s4(q), _p(k_ctx), _s4(k_ctx), _p(v_ctx), _s4(v_ctx), _p(k_draft), _s4(k_draft), _p(v_draft), _s4(v_draft),
          _code(q), _p(anc), _p(kp), *_attn_sizes(q, k_ctx, anchors, block_size), scale, _p(o), _p(lse), device, stream)
    return o, lse


def varprefix_attention_bwd(do, q, k_ctx, v_ctx, k_draft, v_draft, o, lse, anchors, keep, block_size, scale):
    """-> ``(dq, dk_ctx, dv_ctx, dk_draft, dv_draft)``, each shaped and typed like its input."""
    device, stream = _device_args(do, q, k_ctx, v_ctx, k_draft, v_draft, lse, anchors, keep)
    grads = tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k_ctx, v_ctx, k_draft, v_draft))
    if q.numel() == 0 and k_ctx.numel() == 0:
        return grads
    if q.numel() == 0:
        return tuple(g.zero_() for g in grads)
    anc, kp, lse_c = _idx(anchors), _keep(keep), lse.float().contiguous()
    delta = torch.empty_like(lse_c)  # scratch: sum_u P dP per query row (o itself is not needed)
    _call("d2k_varprefix_attention_bwd",
          _p(do), _s4(do), _p(q), _s4(q), _p(k_ctx), _s4(k_ctx), _p(v_ctx), _s4(v_ctx), _p(k_draft), _s4(k_draft),
          _p(v_draft), _s4(v_draft), _p(lse_c), _p(delta), _code(q), _p(anc), _p(kp),
          *_attn_sizes(q, k_ctx, anchors, block_size), scale, *(_p(g) for g in grads), device, stream)
    return grads


# ---- decayed_cross_entropy ------------------------------------------------------------------


def decayed_ce_fwd(hidden, weight, labels, token_weights, opts):
    """-> ``num``, ``den`` (0-dim f32), ``lse [T]`` f32, ``correct [T]`` bool (empty unless asked)."""
    device, stream = _device_args(hidden, weight, labels, token_weights)
    T, H = hidden.shape
    V = weight.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    num, den = torch.empty((), **f32), torch.empty((), **f32)
    lse, token_loss = torch.empty(T, **f32), torch.empty(T, **f32)
    correct = torch.empty(T if opts.return_correct else 0, dtype=torch.bool, device=hidden.device)
    if T == 0:
        return num.zero_(), den.zero_(), lse, correct
    lab, w = _idx(labels), token_weights.float().contiguous()
    _call("d2k_decayed_ce_fwd", _p(hidden), _code(hidden), hidden.stride(0), hidden.stride(1),
          _p(weight), _code(weight), weight.stride(0), weight.stride(1), _p(lab), _p(w), T, V, H, float(opts.softcap),
          _p(num), _p(den), _p(lse), _p(correct) if opts.return_correct else None, _p(token_loss), device, stream)
    return num, den, lse, correct


def decayed_ce_bwd(grad_num, hidden, weight, labels, token_weights, lse, opts, need_dhidden, need_dweight):
    """-> ``dhidden [T, H]`` (hidden's dtype) and ``dweight [V, H]`` (weight's dtype); empty(0) when not needed."""
    device, stream = _device_args(grad_num, hidden, weight, labels, token_weights, lse)
    T, H = hidden.shape
    V = weight.shape[0]
    dh = torch.empty_like(hidden, memory_format=torch.contiguous_format) if need_dhidden else hidden.new_empty((0,))
    dw = torch.empty_like(weight, memory_format=torch.contiguous_format) if need_dweight else weight.new_empty((0,))
    if T == 0:
        return dh, dw.zero_()
    g = grad_num.float().reshape(()).contiguous()
    lab, w, lse_c = _idx(labels), token_weights.float().contiguous(), lse.float().contiguous()
    _call("d2k_decayed_ce_bwd", _p(g), _p(hidden), _code(hidden), hidden.stride(0), hidden.stride(1),
          _p(weight), _code(weight), weight.stride(0), weight.stride(1), _p(lab), _p(w), _p(lse_c), T, V, H,
          float(opts.softcap), _p(dh) if need_dhidden and dh.numel() else None,
          _p(dw) if need_dweight and dw.numel() else None, device, stream)
    return dh, dw
