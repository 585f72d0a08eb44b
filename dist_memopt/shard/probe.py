"""The step's one probe collective per process group: the non-finite verdict and layout agreement.

Before any state changes, the ranks of every group that completes statistics all_reduce (MIN) a
tiny vector: the first suspect gradient's index and a fingerprint of the statistic layout (posted
as ``f`` and ``-f``: equal fingerprints on every rank give ``min(f) == -min(-f)``). A rank stepping
other parameters would post reductions of other sizes and hang; here it becomes an error instead.
"""

from __future__ import annotations

import zlib
from typing import Any, Hashable, Iterable, Optional

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["agree", "kept_upload", "group_device", "distinct_groups", "with_signatures"]


def agree(value: Tensor, fingerprint: int, group: dist.ProcessGroup, device: torch.device,
          kept: Optional[dict[Hashable, Any]] = None) -> tuple[float, bool]:
    """All-reduce ``value`` (MIN) and a layout fingerprint over ``group``: one collective, one sync.

    Returns the group's minimum of ``value`` and whether every rank posted the same fingerprint.
    ``kept``: where the fingerprint's part of the probe stays on the device between calls.
    """
    posted = kept_upload(kept, ("probe", id(group)), (float(fingerprint), float(-fingerprint)), device)
    probe = torch.cat([value.to(device, torch.float64).view(1), posted])
    dist.all_reduce(probe, op=dist.ReduceOp.MIN, group=group)
    smallest, low, neg_high = probe.tolist()
    return smallest, low == -neg_high


def kept_upload(kept: Optional[dict[Hashable, Any]], slot: Hashable, values: tuple[float, ...], device: torch.device) -> Tensor:
    """``values`` as a float64 tensor on ``device``, made once and kept in ``kept[slot]`` while
    they stay the same: on an accelerator a tensor made from host data is a blocking copy (a host
    sync) each time. The caller must not change the tensor."""
    entry = None if kept is None else kept.get(slot)
    if entry is not None and entry[0] == (device, values):
        return entry[1]
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if kept is not None:
        kept[slot] = ((device, values), tensor)
    return tensor


def group_device(group: dist.ProcessGroup) -> torch.device:
    """Where tensors for collectives on ``group`` must live (CPU for gloo, else CUDA)."""
    backend = dist.get_backend(group)
    if backend == dist.Backend.GLOO:
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def distinct_groups(specs: Iterable[Any]) -> list[dist.ProcessGroup]:
    """Every process group the shard specs' statistics are reduced over, once each, in order."""
    seen: dict[int, dist.ProcessGroup] = {}
    for spec in specs:
        for group in spec.groups:
            seen.setdefault(id(group), group)
    return list(seen.values())


def with_signatures(fingerprints: dict[int, int], specs: Iterable[Any]) -> dict[int, int]:
    """Fold each shard's layout signature (placements, mesh shape) into its groups' fingerprints:
    holders that disagree on how a parameter is divided would post sums of mismatched pieces."""
    result = dict(fingerprints)
    for spec in specs:
        if spec.signature:
            for group in spec.groups:
                key = id(group)
                result[key] = hash((result.get(key, 0), zlib.crc32(spec.signature.encode()))) % (1 << 52)
    return result
