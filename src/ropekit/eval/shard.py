"""Shards: each of N processes takes a deterministic, cost-balanced share of a grid's cells.

A shard is ``K/N`` (1-based K, as Slurm's ``$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT`` with ids from 1) from
``--shard``, or ``RANK``/``WORLD_SIZE`` (0-based rank, set by ``torchrun`` and ``accelerate launch``; ``LOCAL_RANK``
and ``LOCAL_WORLD_SIZE`` where only those are set). Every process plans the same cells in the same order
and ``assign_shards`` gives each to one shard, largest first to the least loaded (the LPT rule), so the
shards cover the grid exactly once and their estimated costs differ by at most one cell's.
"""

from __future__ import annotations

import heapq
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

MAX_SHARDS = 1_000_000


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` (0-based) of ``count``; ``device_index``: the launcher's ``LOCAL_RANK`` (this process's GPU
    on a node with one per rank), None from ``--shard``."""

    index: int
    count: int
    device_index: int | None = None

    def __str__(self) -> str:
        return f"{self.index + 1}/{self.count}"


def parse_shard(text: str) -> Shard:
    """``"K/N"`` with 1 <= K <= N -> ``Shard(K - 1, N)``; ValueError naming ``--shard`` otherwise."""
    parts = str(text).strip().split("/")
    try:
        k, n = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"--shard must be K/N with whole numbers 1 <= K <= N (e.g. 2/4), got {text!r}") from None
    if not 1 <= n <= MAX_SHARDS or not 1 <= k <= n:
        raise ValueError(f"--shard K/N needs 1 <= K <= N <= {MAX_SHARDS}, got {text!r}")
    return Shard(k - 1, n)


def _env_int(environ: Mapping[str, str], name: str) -> int | None:
    text = environ.get(name)
    if text is None or not text.strip():
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"environment variable {name} must be a whole number, got {text!r}") from None


def shard_from_env(environ: Mapping[str, str] = os.environ) -> Shard | None:
    """The launcher's shard: ``RANK``/``WORLD_SIZE``, else ``LOCAL_RANK``/``LOCAL_WORLD_SIZE``; None when neither pair
    is set or the world has one process. ValueError when a rank lies outside its world."""
    local = _env_int(environ, "LOCAL_RANK")
    for rank_name, size_name in (("RANK", "WORLD_SIZE"), ("LOCAL_RANK", "LOCAL_WORLD_SIZE")):
        rank, size = _env_int(environ, rank_name), _env_int(environ, size_name)
        if rank is None or size is None:
            continue
        if not 1 <= size <= MAX_SHARDS or not 0 <= rank < size:
            raise ValueError(f"environment {rank_name}={rank} {size_name}={size}: need 0 <= {rank_name} < "
                             f"{size_name} <= {MAX_SHARDS}")
        return Shard(rank, size, local) if size > 1 else None
    return None


def resolve_shard(flag: str | None, environ: Mapping[str, str] = os.environ) -> Shard | None:
    """``--shard`` when given (it wins over the launcher's variables), else the launcher's; None: run every cell."""
    if flag is not None:
        shard = parse_shard(flag)
        return shard if shard.count > 1 else None
    return shard_from_env(environ)


def shard_device(device: str, shard: Shard | None) -> str:
    """``cuda`` -> ``cuda:LOCAL_RANK`` under a launcher (one GPU per rank); any other device (``cpu``, an explicit
    ``cuda:1``) as given."""
    if shard is None or shard.device_index is None or device.strip().lower() != "cuda":
        return device
    return f"cuda:{shard.device_index}"


def cell_cost(cell: Mapping[str, Any]) -> float:
    """A cell's estimated cost: passes x length^2 (attention grows with the square of the length: a 32K pass
    costs ~4x a 16K one). Passes: perplexity windows, passkey trials (x depths for a tune passkey set)."""
    length = float(cell["length"])
    passes = cell.get("windows") or 1
    if cell.get("task") == "passkey" or cell.get("measure") == "passkey":
        passes = int(cell.get("trials") or 1) * len(cell.get("depths") or [None])
    return float(passes) * length * length


def assign_shards(costs: Sequence[float], count: int) -> list[int]:
    """The shard (0..count-1) of each cell, costs ``[C]`` -> owners ``[C]``: cells in decreasing cost (ties: the
    earlier cell first) each go to the shard with the least cost so far (ties: the lower shard). Deterministic:
    every process computes the same owners from the same costs."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    owners = [0] * len(costs)
    loads = [(0.0, shard) for shard in range(count)]  # a heap of (assigned cost, shard)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, shard = heapq.heappop(loads)
        owners[i] = shard
        heapq.heappush(loads, (load + costs[i], shard))
    return owners


def mine(cells: Sequence[Mapping[str, Any]], shard: Shard | None) -> list[bool]:
    """Whether each of ``cells`` (one grid, planned in the same order by every shard) belongs to ``shard``
    (all of them when ``shard`` is None)."""
    if shard is None:
        return [True] * len(cells)
    owners = assign_shards([cell_cost(c) for c in cells], shard.count)
    return [owner == shard.index for owner in owners]
