"""Data parallelism for the trainer: process group setup, DDP / FSDP2 wrapping, global loss sums.

Under ``torchrun`` (``WORLD_SIZE`` > 1) every rank trains on its share of each global batch. The
loss is normalized by the *global* Σw (docs/semantics.md, "Loss and its normalization"): each rank backpropagates ``loss_num * world_size``,
the gradients are averaged by DDP / FSDP, and the trainer divides them by ``global_den + 1e-6``
once all micro-batches are in, which makes the averaged gradient the gradient of the global
weighted mean ``Σ_all w·CE / (Σ_all w + 1e-6)``.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "setup", "teardown", "wrap_model", "unwrap", "all_reduce_sum", "any_rank", "no_sync", "barrier"]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device: Optional[str] = None) -> DistInfo:
    """Join the process group when launched by torchrun; pick the device (cuda:local_rank or cpu)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank if dev.index is None else dev.index)
        if dev.index >= torch.cuda.device_count():
            raise RuntimeError(
                f"rank {rank} wants {dev} but this node has {torch.cuda.device_count()} visible GPU(s): "
                "launch at most one process per GPU (torchrun --nproc_per_node), or train on CPU with "
                "CUDA_VISIBLE_DEVICES=''")
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def teardown() -> None:
    """Leave the process group together: a rank that destroys its group while another still talks to it
    (rank 0 writing the last checkpoint or report) can abort that rank ("terminate called without an
    active exception", seen with gloo in CI)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def wrap_model(model: torch.nn.Module, info: DistInfo, fsdp: bool = False) -> torch.nn.Module:
    """DDP (default) or FSDP2 ``fully_shard`` (each decoder layer, then the root) when ``fsdp``."""
    if not info.enabled:
        return model
    if fsdp:
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError as e:
            raise RuntimeError(f"--fsdp needs torch.distributed.fsdp.fully_shard (torch >= 2.6): {e}") from None
        kw = {}
        if info.device.type == "cuda":
            from torch.distributed.fsdp import MixedPrecisionPolicy

            # bf16 all-gathers and compute (also one dtype for the frozen bf16 and trainable fp32
            # parameters of a unit), fp32 gradient reduction; the fp32 shards stay the masters.
            kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for layer in getattr(model, "layers", []):
            fully_shard(layer, **kw)
        fully_shard(model, **kw)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [info.device.index] if info.device.type == "cuda" else None
    return DDP(model, device_ids=ids)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The user module inside a DDP wrapper (FSDP2 keeps the module itself)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def no_sync(model: torch.nn.Module, skip_sync: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
    if skip_sync and isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model.no_sync()
    if skip_sync and hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(False)
        return _restore_fsdp_sync(model)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _restore_fsdp_sync(model):
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def all_reduce_sum(values: Iterable[torch.Tensor] | torch.Tensor, info: DistInfo, to_host: bool = True) -> torch.Tensor:
    """Sum float64 copies of ``values`` over ranks (one collective). Returns a flat float64 tensor,
    on the CPU, or (``to_host=False``) on the collective's device: no device sync."""
    if isinstance(values, torch.Tensor):
        flat = values.detach().reshape(-1).to(torch.float64)
    else:
        flat = torch.cat([v.detach().reshape(-1).to(torch.float64) for v in values])
    if info.enabled:
        # gloo and nccl both reduce float64; the collective runs on the process group's device.
        flat = flat.to(info.device)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    return flat.cpu() if to_host else flat


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank when ``flag`` is true on any rank (e.g. a SIGTERM that reached one rank)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
