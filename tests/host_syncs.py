"""``count_host_reads()``: every place a tensor's value is read back to Python, counted (a CPU stand-in for
``torch.cuda.set_sync_debug_mode``: on a GPU each of these waits for the device)."""

from __future__ import annotations

import traceback
from collections import Counter
from contextlib import contextmanager

import torch

READS = ("__int__", "__bool__", "__float__", "__index__", "item", "tolist", "nonzero")  # torch.Tensor methods
FUNCTIONS = ("equal", "nonzero")  # torch functions


@contextmanager
def count_host_reads():
    """Yield a ``Counter`` of ``"name at file:line"`` for every value read back to the host inside the block."""
    counts: Counter[str] = Counter()
    saved = [(torch.Tensor, name, getattr(torch.Tensor, name)) for name in READS]
    saved += [(torch, name, getattr(torch, name)) for name in FUNCTIONS]

    def counting(name, original):
        def read(*args, **kwargs):
            caller = traceback.extract_stack(limit=2)[0]
            counts[f"{name} at {caller.filename.rsplit('/', 2)[-1]}:{caller.lineno}"] += 1
            return original(*args, **kwargs)
        return read

    try:
        for owner, name, original in saved:
            setattr(owner, name, counting(name, original))
        yield counts
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)
