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
- FSDP needs every rank in every forward and backward pass: a rank with no question left in a step
  runs a dummy one with weight 0.

The backend is NCCL on CUDA and gloo on the CPU (where the tests run).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Dist", "SINGLE", "from_env", "shard", "local", "is_sharded"]


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

    def steps_for(self, n: int, batch: int) -> int:
        """Batches of ``batch`` needed by the rank with the largest share of ``n`` items (every rank runs that many)."""
        largest = -(-n // self.world)
        return -(-largest // batch)


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


def decoder_layers(model: torch.nn.Module) -> Sequence[torch.nn.Module]:
    """The transformer blocks of a Hugging Face causal LM (``model.model.layers`` and the usual aliases)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
        obj: Any = base
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, torch.nn.ModuleList) and len(obj):
            return list(obj)
    raise ValueError(f"cannot find the decoder layers of {type(base).__name__} to shard")


def shard(model: torch.nn.Module, dist: Dist, *, cpu_offload: bool = False) -> torch.nn.Module:
    """FSDP2: ``fully_shard`` each decoder layer, then the root; gradients reduce as plain sums (gloo has no
    pre-scaled sum, so the collectives are told to use sum only, with a divide factor of 1)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, OffloadPolicy, fully_shard

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


# ---------------------------------------------------------------------------------- sharded checkpoints
def save_sharded(folder: Any, model: torch.nn.Module, rule_state: dict[str, dict[str, Any]], dist: Dist) -> None:
    """Every rank writes its shard of the weights and of the optimizer state into ``folder`` with
    ``torch.distributed.checkpoint`` (a collective: call it on every rank).

    Optimizer-state tensors are local shards shaped like their parameter's shard; they are wrapped as
    DTensors with the parameter's placement, so the checkpoint describes them like the weights.
    Non-tensor entries (Adam's step count) are the same on every rank and travel in the caller's JSON.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = {"model": get_model_state_dict(model), "rule": _rule_dtensors(model, rule_state)}
    dcp.save(state, checkpoint_id=str(folder))


def load_sharded(folder: Any, model: torch.nn.Module, rule_state: dict[str, dict[str, Any]]) -> None:
    """Load :func:`save_sharded`'s files into the sharded model and into ``rule_state`` (whose tensors
    must already exist with the right shapes: the caller fills them from the saved JSON layout)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    state = {"model": get_model_state_dict(model), "rule": _rule_dtensors(model, rule_state)}
    dcp.load(state, checkpoint_id=str(folder))
    set_model_state_dict(model, state["model"])
    for name, entries in state["rule"].items():
        for key, value in entries.items():
            rule_state[name][key].copy_(local(value))


def _rule_dtensors(model: torch.nn.Module, rule_state: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    from torch.distributed.tensor import DTensor

    params = dict(model.named_parameters())
    out: dict[str, dict[str, Any]] = {}
    for name, entries in rule_state.items():
        p = params[name]
        out[name] = {
            key: DTensor.from_local(value, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
            for key, value in entries.items()
            if isinstance(value, torch.Tensor)
        }
    return out


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
