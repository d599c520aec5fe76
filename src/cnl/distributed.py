"""Data-parallel, sharded training: ``torchrun --nproc-per-node N -m cnl train ...`` with FSDP2.

A single process (N = 1) never touches ``torch.distributed``: :data:`SINGLE` makes every helper
here a no-op, so the one-process path is exactly the one without this module. With N processes:

- the model is sharded with FSDP2 (``fully_shard`` per decoder layer, then the root); every rank keeps
  only its shard of the weights, of the optimizer state and of the reference signs;
- gradients are reduce-scattered as sums (``set_force_sum_reduction_for_comms``), and every rank
  scales its loss by the *global* count, so a reduced gradient is the exact global mean (not a mean
  of means), also for a short last batch;
- the parameters' post-accumulate-grad hooks see the reduced, sharded gradient (a DTensor), so the
  mask and the update run on the local shard inside the backward pass;
- FSDP needs every rank in every forward and backward pass: :meth:`Dist.lockstep` gives every rank
  the same number of passes, and a rank with nothing left runs a placeholder pass of weight 0;
- checkpoints are one file per rank of its own shards (:mod:`cnl.rundir`), never
  ``torch.distributed.checkpoint``'s pickled metadata.

The backend is NCCL on CUDA and gloo on the CPU (where the tests run).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

__all__ = ["Dist", "SINGLE", "from_env", "shard", "local", "is_sharded", "full_state_dict"]

T = TypeVar("T")


@dataclass(frozen=True)
class Dist:
    """This process's place in the job: ``rank`` of ``world`` processes (``world == 1``: no distribution)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only one that writes the run directory and prints."""
        return self.rank == 0

    # ------------------------------------------------------------------ collectives (no-ops when single)
    def sum(self, value: float) -> float:
        """``value`` summed over the ranks."""
        if not self.enabled:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64, device=_comm_device())
        torch.distributed.all_reduce(t)
        return float(t.item())

    def max(self, value: int) -> int:
        """The largest ``value`` over the ranks."""
        if not self.enabled:
            return value
        t = torch.tensor([int(value)], dtype=torch.int64, device=_comm_device())
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return int(t.item())

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any rank."""
        return self.sum(1.0 if flag else 0.0) > 0 if self.enabled else flag

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (on every rank)."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def share(self, n: int) -> range:
        """This rank's contiguous part of ``n`` items (ranks differ by at most one item)."""
        per, extra = divmod(n, self.world)
        start = self.rank * per + min(self.rank, extra)
        return range(start, start + per + (1 if self.rank < extra else 0))

    def lockstep(self, items: Sequence[T]) -> Iterator[tuple[int, T | None]]:
        """``(i, item)`` for this rank's ``items``, then ``(i, None)`` until every rank has had as many
        steps as the rank with the most. FSDP needs every rank in every forward and backward pass, so the
        caller runs a placeholder pass of weight 0 for ``None`` (this is the one place that decides it)."""
        steps = self.max(len(items))
        for i in range(steps):
            yield i, (items[i] if i < len(items) else None)


#: The one-process job.
SINGLE = Dist()


def _comm_device() -> torch.device:
    backend = torch.distributed.get_backend()
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def from_env(device: str = "auto") -> Dist:
    """The job torchrun started this process in (``WORLD_SIZE``/``RANK``/``LOCAL_RANK``), joined on first
    call; :data:`SINGLE` outside torchrun or with one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dist = torch.distributed
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and device != "cpu"
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(rank=rank, world=world, local_rank=local_rank)


def shard(model: torch.nn.Module, dist: Dist, *, cpu_offload: bool = False) -> torch.nn.Module:
    """FSDP2: ``fully_shard`` each decoder layer, then the root; gradients reduce as plain sums (gloo has no
    pre-scaled sum, so the collectives are told to use sum only, with a divide factor of 1)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, OffloadPolicy, fully_shard

    from .params import decoder_layers

    device_type = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
    mesh = init_device_mesh(device_type, (dist.world,))
    policy = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, offload_policy=policy)
    fully_shard(model, mesh=mesh, offload_policy=policy)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)
    return model


def _dtensor_type() -> type | None:
    global _DTENSOR
    if _DTENSOR is False:
        try:
            from torch.distributed.tensor import DTensor
        except ImportError:  # a torch build without distributed support
            DTensor = None
        _DTENSOR = DTensor
    return _DTENSOR


_DTENSOR: Any = False


def is_sharded(t: torch.Tensor) -> bool:
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a sharded tensor (a DTensor); any other tensor unchanged."""
    return t.to_local() if is_sharded(t) else t


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights gathered on rank 0's CPU (an empty dict on the other ranks)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # tied weights (an embedding shared with the head) come back as separate copies: keep one name, as
    # save_pretrained writes an unsharded tied model
    first: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if first.setdefault(id(p), name) != name:
            state.pop(name, None)
    return state
