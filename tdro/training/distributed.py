"""One run over several processes (``torchrun --nproc_per_node N -m tdro train ...``), exactly the
single-process run.

Every rank draws the same global batch (same seed, same batch stream) and runs the encoders on its
own share of every group's rows; the latents are all-gathered with gradients back into the global
batch's order, so the head, the algorithm (GroupDRO's q, CVaR's quantile, ...) and the anchors'
class moments see exactly the single-process tensors on every rank. The gather's backward sums the
ranks' identical gradients, and the parameter gradients are then averaged over ranks (what
DistributedDataParallel does, in one flat all-reduce), which gives every parameter exactly the
single-process gradient. Evaluation shards each split and all-reduces the metric counts. Rank 0
writes the records and checkpoints; every rank resumes from the same ``last.pt``.

Dropout draws per-rank masks (a rank's forward pass runs under its own RNG stream), so with
dropout > 0 a distributed run matches the single-process run in distribution, not bitwise.
"""
from __future__ import annotations

import datetime
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from tdro.keys import ConfigError

TIMEOUT = datetime.timedelta(minutes=10)  # a collective that waits longer than this fails instead of hanging


@dataclass(frozen=True)
class Distributed:
    """This process's place in a distributed run: rank, world size and the process group's device."""

    rank: int
    world: int
    device: torch.device

    @property
    def is_writer(self) -> bool:
        """Only rank 0 writes records and checkpoints."""
        return self.rank == 0

    @classmethod
    def from_environment(cls, device_name: str) -> "Distributed | None":
        """The torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK) as a process group, or None outside torchrun."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return None
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = torch.cuda.is_available() and device_name in ("auto", "cuda") or device_name.startswith("cuda")
        if use_cuda:
            torch.cuda.set_device(local_rank)
            device = torch.device("cuda", local_rank)
        else:
            device = torch.device("cpu")
        if not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo", timeout=TIMEOUT,
                                    device_id=device if use_cuda else None)
        return cls(dist.get_rank(), dist.get_world_size(), device)

    def check_batch_size(self, batch_size: int) -> None:
        """The global batch must split into equal per-rank shares."""
        if batch_size % self.world:
            raise ConfigError(f"key 'batch_size' is {batch_size} but the run has {self.world} processes: the global "
                              f"batch must split into {self.world} equal shares; use a multiple of {self.world}")

    def shard(self, rows: int) -> torch.Tensor:
        """This rank's rows of a group's ``rows`` batch rows (every world-th row, starting at the rank)."""
        return torch.arange(self.rank, rows, self.world)

    def gather_rows(self, local: torch.Tensor, group_rows: list[int]) -> torch.Tensor:
        """The global batch's rows from every rank's shard (with gradients), in single-process order.

        ``local`` holds this rank's rows of each group in turn; ``group_rows`` the groups' row counts in
        the global batch. Shares of unequal length are padded for the collective and dropped after it.
        """
        order, share = batch_layout(group_rows, self.world)
        longest = int(share.max())
        padded = torch.cat([local, local.new_zeros(longest - len(local), *local.shape[1:])])
        stacked = _AllGather.apply(padded, self.rank, self.world)  # (world, longest, ...)
        gathered = torch.cat([stacked[r, :n] for r, n in enumerate(share.tolist())])
        return gathered[order.to(local.device)]

    def average_gradients(self, parameters: list[torch.nn.Parameter]) -> None:
        """Every parameter's gradient averaged over ranks in one flat all-reduce. A parameter without a
        gradient on every rank keeps none (the optimiser skips it, as in one process); on some ranks only,
        its missing gradients count as zero."""
        if not parameters:
            return
        has_grad = torch.tensor([p.grad is not None for p in parameters], dtype=torch.float32, device=self.device)
        dist.all_reduce(has_grad)
        used = [p for p, count in zip(parameters, has_grad.tolist()) if count > 0]
        if not used:
            return
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in used])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for parameter in used:
            size = parameter.numel()
            if parameter.grad is None:
                parameter.grad = torch.empty_like(parameter)  # the parameter's strides (e.g. channels-last)
            parameter.grad.copy_(flat[offset:offset + size].view(parameter.shape))
            offset += size

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """All-reduce (sum) in place; returns the tensor."""
        dist.all_reduce(tensor)
        return tensor

    def broadcast_text(self, text: str | None) -> str:
        """Rank 0's string on every rank (e.g. the run directory it created)."""
        box = [text]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        dist.barrier()

    @contextmanager
    def own_rng(self, step: int) -> Iterator[None]:
        """This rank's own random stream (dropout masks) for one forward pass; the shared stream is left as it was."""
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(1_000_003 * (step + 1) + self.rank)
            yield


class _AllGather(torch.autograd.Function):
    """Every rank's equal-shaped tensor, stacked; the backward sums the ranks' gradients of this rank's part."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, rank: int, world: int) -> torch.Tensor:
        ctx.rank = rank
        parts = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank], None, None


def batch_layout(group_rows: list[int], world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, share): ``order`` puts rank-major gathered rows (rank 0's share of every group, then rank
    1's, ...) back into single-process order (group 0's rows, then group 1's, ...); ``share`` is each
    rank's number of rows. Row i of a group goes to rank i mod world."""
    counts = torch.tensor(group_rows, dtype=torch.long)
    group = torch.repeat_interleave(torch.arange(len(counts)), counts)
    within = torch.arange(len(group)) - (counts.cumsum(0) - counts)[group]
    rank = within % world
    key = (rank * len(counts) + group) * max(len(group), 1) + within
    return key.argsort().argsort(), torch.bincount(rank, minlength=world)


def shutdown() -> None:
    """Leave the process group (end of a distributed run)."""
    if dist.is_initialized():
        dist.destroy_process_group()
