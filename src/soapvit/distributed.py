"""Scale-out on :mod:`torch.distributed`: who this process is, and the few collectives soapvit needs.

Under ``torchrun`` the CLI calls :func:`setup` once (gloo on CPU, NCCL on CUDA, one GPU per local
rank). Outside it every helper degrades to the single-process case (rank 0 of 1), so library code
calls them unconditionally. Work is split by :func:`share` (round-robin, deterministic); results
are merged with sums (:func:`all_reduce_sum`, exact for integers, float64 otherwise) or gathered in
rank order (:func:`all_gather_objects`, :func:`gather_by_index`).
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor


T = TypeVar("T")


def active() -> bool:
    """Whether a process group with more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0: the process that writes files and prints results."""
    return rank() == 0


def launched() -> bool:
    """Whether torchrun (or another launcher of the ``env://`` kind) started this process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "MASTER_ADDR" in os.environ


def setup(device: torch.device) -> torch.device:
    """Join the launcher's process group (once) and return this rank's device: ``cuda`` becomes
    ``cuda:LOCAL_RANK`` with NCCL, anything else uses gloo. Without a launcher: ``device``."""
    if not launched():
        return device
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        cuda = device.type == "cuda"
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
        atexit.register(dist.destroy_process_group)
    return device


def share(items: Sequence[T], part: int | None = None, parts: int | None = None) -> list[T]:
    """This rank's round-robin share of ``items`` (``items[rank::world]``)."""
    part = rank() if part is None else part
    parts = world_size() if parts is None else parts
    return list(items[part::parts])


def _backend_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """The element-wise sum over ranks of ``tensor`` (returned on its own device, same dtype)."""
    if not active():
        return tensor
    moved = tensor.to(_backend_device())
    dist.all_reduce(moved)
    return moved.to(tensor.device)


def all_gather_tensor(tensor: Tensor) -> list[Tensor]:
    """``tensor`` of every rank (same shape on each), in rank order, on the caller's device."""
    if not active():
        return [tensor]
    moved = tensor.to(_backend_device())
    parts = [torch.empty_like(moved) for _ in range(world_size())]
    dist.all_gather(parts, moved)
    return [p.to(tensor.device) for p in parts]


def barrier() -> None:
    """Wait until every rank gets here."""
    if active():
        dist.barrier()


def all_gather_objects(obj: Any) -> list[Any]:
    """A picklable object of every rank, in rank order (tensors inside should be on the CPU)."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, source: int) -> Any:
    """``obj`` of rank ``source``, on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=source)
    return box[0]


def gather_by_index(entries: Iterable[tuple[int, T]]) -> list[T]:
    """Every rank's ``(index, value)`` entries, merged and ordered by index (values on the CPU)."""
    merged = [entry for part in all_gather_objects(list(entries)) for entry in part]
    indices = [index for index, _ in merged]
    if len(set(indices)) != len(indices):
        raise RuntimeError("two processes returned the same item: the ranks disagree on the data")
    return [value for _, value in sorted(merged, key=lambda entry: entry[0])]
