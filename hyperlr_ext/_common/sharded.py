"""Param groups of DTensor shards (FSDP2's ``fully_shard``): the HD optimizers step the local
shards with the pure-PyTorch path and reduce the per-rank partial sums of the hypergradient
(<g, d> and, for the multiplicative rule, the two squared norms) over the device mesh in one
all-reduce per group and step, so every rank computes the same LR. Every rank reaches the
collective (a rank whose shard is empty contributes zeros)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

SumReducer = Callable[[list[Tensor]], list[Tensor]]

__all__ = ["distribute_like", "local_shards", "mesh_group", "shard_like", "sum_reducer"]


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without distributed support
        return None
    return DTensor


def mesh_group(params: list[Tensor]) -> Any | None:
    """The process group of the params' 1-D device mesh when they are DTensors, else None."""
    dtensor = _dtensor_type()
    if dtensor is None or not any(isinstance(p, dtensor) for p in params):
        return None
    if not all(isinstance(p, dtensor) for p in params):
        raise ValueError(
            "a param group mixes DTensor and regular parameters; put them in separate groups"
        )
    meshes = {p.device_mesh for p in params}
    if len(meshes) != 1 or next(iter(meshes)).ndim != 1:
        raise ValueError(
            "the DTensor parameters of a group must share one 1-D device mesh (FSDP2's "
            f"fully_shard), got {len(meshes)} mesh(es)"
        )
    return next(iter(meshes)).get_group()


def local_shards(tensors: list[Any]) -> list[Any]:
    """Each DTensor's local shard (a view: in-place updates land in the DTensor); other entries
    (plain tensors, None) as they are."""
    dtensor = _dtensor_type()
    if dtensor is None:
        return tensors
    return [t.to_local() if isinstance(t, dtensor) else t for t in tensors]


def _unchanged(tensors: list[Any]) -> list[Any]:
    return tensors


def local_view(sharded: bool):
    """:func:`local_shards` for a group of DTensor parameters, else the identity (which spares
    an isinstance per tensor and step)."""
    return local_shards if sharded else _unchanged


def shard_like(local: Tensor, param: Tensor) -> Tensor:
    """``local``, this rank's shard of a tensor laid out as ``param``, as a DTensor with
    ``param``'s mesh and placements when ``param`` is one (sharing ``local``'s storage: in-place
    updates of either are seen by both); else ``local`` itself. Per-parameter state is kept
    this way so that torch.distributed.checkpoint reshards it with the parameter."""
    dtensor = _dtensor_type()
    if dtensor is None or not isinstance(param, dtensor) or isinstance(local, dtensor):
        return local
    return dtensor.from_local(
        local, param.device_mesh, param.placements, run_check=False,
        shape=param.size(), stride=param.stride(),
    )  # fmt: skip


def distribute_like(tensor: Tensor, param: Tensor) -> Tensor:
    """A copy of ``tensor`` (a whole tensor, or a DTensor of any layout) laid out as ``param``:
    a DTensor with its mesh and placements when ``param`` is one (each rank keeps its own
    shard, no communication for a whole tensor), else a whole tensor; on ``param``'s device
    and in its dtype. Loads a checkpoint written under another sharding, or unsharded."""
    dtensor = _dtensor_type()
    if dtensor is not None and isinstance(param, dtensor):
        from torch.distributed.tensor import distribute_tensor

        if isinstance(tensor, dtensor):
            tensor = tensor.redistribute(param.device_mesh, param.placements)
            return tensor.to(device=param.device, dtype=param.dtype, copy=True)
        whole = tensor.to(device=param.device, dtype=param.dtype, copy=True)
        return distribute_tensor(whole, param.device_mesh, param.placements, src_data_rank=None)
    if dtensor is not None and isinstance(tensor, dtensor):
        tensor = tensor.full_tensor()
    return tensor.to(device=param.device, dtype=param.dtype, copy=True)


def sum_reducer(params: list[Tensor], fused: bool | None) -> SumReducer | None:
    """For a param group of DTensor shards, the function that sums the per-rank partial HD sums
    over their mesh in one all-reduce (a list of tensors in, their sums in the same shapes
    out); None for ordinary tensors, whose sums are complete. The functional HD steps take it
    as their ``sum_reducer`` argument."""
    group = mesh_group(params)
    if group is None:
        return None
    if fused:
        raise ValueError(
            "fused=True does not support DTensor (FSDP2) parameters; the optimizer steps their "
            "local shards with the pure-PyTorch path (fused=None or False)"
        )
    import torch
    import torch.distributed as dist

    def reduce(values: list[Tensor]) -> list[Tensor]:
        flat = torch.cat([v.reshape(-1) for v in values])
        dist.all_reduce(flat, group=group)
        return [part.view_as(v) for part, v in zip(flat.split([v.numel() for v in values]), values)]

    return reduce
