"""Backend lookup for the custom ops: each fast backend is a module of host launchers."""
from __future__ import annotations

import importlib
from types import ModuleType

import torch


def fast_impl(impl: str, op: str) -> ModuleType:
    """Module holding op ``op``'s launchers for backend ``impl`` ("triton" or "cuda")."""
    if impl == "triton":
        return importlib.import_module(f"d2kernels.{op}.triton")
    if impl == "cuda":
        from . import cuda

        cuda.load_library()  # raises with the build commands when the library is missing
        return cuda
    raise ValueError(f"unknown fast backend {impl!r}")


def with_backward_op(setup, bwd):
    """``setup_context`` that also records which backward callable ``backward`` should run."""

    def _setup(ctx, inputs, output):
        setup(ctx, inputs, output)
        ctx.bwd = bwd

    return _setup


def eager_function(fwd, setup, backward):
    """A plain ``autograd.Function`` over the same forward / setup / backward as a custom op.

    Eager calls take this path: it skips the custom-op dispatcher (a measurable host cost per
    call on small shapes); ``torch.compile`` takes the registered custom op, which it can trace.
    """

    class _Fn(torch.autograd.Function):
        # forward(ctx, ...) rather than a separate setup_context: with one, every ``apply`` binds
        # its arguments through ``inspect.signature`` (~30 us of host time per call).
        @staticmethod
        def forward(ctx, *args):
            output = fwd(*args)
            setup(ctx, args, output)
            return output

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, *grads)

    return _Fn.apply


def pick(custom_op, eager_apply):
    """The custom op while ``torch.compile`` traces, the eager Function otherwise."""
    return custom_op if torch.compiler.is_compiling() else eager_apply
