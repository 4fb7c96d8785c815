"""One huge-page buffer for a model's weights.

Decoding a token on a CPU streams every weight once. With ordinary 4 KiB pages that stream takes
a TLB miss every 4 KiB; in one anonymous mapping advised for transparent huge pages (2 MiB) it
takes one every 2 MiB. Measured on the 2-core EPYC dev machine, one 300 MB float32 matrix-vector
product: 24 GB/s on ordinary pages, 26.6 GB/s on huge pages (~10%; ``benchmarks/bench_decode.py``
has the whole-model figure).
"""

from __future__ import annotations

import mmap

import torch

ALIGN_BYTES = 64  # each tensor starts on a cache line


def huge_page_copies(tensors: list[torch.Tensor], dtype: torch.dtype | None = None
                     ) -> tuple[list[torch.Tensor], mmap.mmap]:
    """Copies of ``tensors`` (each in ``dtype``, default its own) laid out one after the other in
    one anonymous mapping advised for huge pages (Linux; elsewhere ordinary pages).

    All tensors must share one dtype after conversion. Returns the copies (contiguous, same
    shapes, views of the mapping) and the mapping; the views keep the mapping alive.
    """
    dtypes = {dtype or t.dtype for t in tensors}
    if len(dtypes) != 1:
        raise ValueError(f"huge_page_copies needs one dtype, got {sorted(map(str, dtypes))}")
    (dtype,) = dtypes
    itemsize = torch.empty((), dtype=dtype).element_size()
    align = ALIGN_BYTES // itemsize
    offsets, total = [], 0
    for t in tensors:
        offsets.append(total)
        total += -(-t.numel() // align) * align
    arena = mmap.mmap(-1, max(total, 1) * itemsize, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        arena.madvise(mmap.MADV_HUGEPAGE)
    flat = torch.frombuffer(arena, dtype=dtype, count=max(total, 1))  # [total]
    copies = []
    for t, offset in zip(tensors, offsets, strict=True):
        view = flat[offset : offset + t.numel()].view(t.shape)  # [*t.shape] window of the arena
        view.copy_(t.detach())
        copies.append(view)
    return copies, arena


def state_on_huge_pages(state: dict[str, torch.Tensor], order: list[str]) -> dict[str, torch.Tensor]:
    """``state`` with every CPU floating-point tensor copied into one huge-page buffer, in ``order``
    (the order a forward pass reads them, so decoding streams the buffer front to back); other
    tensors are returned as they are."""
    names = [k for k in order if k in state and state[k].device.type == "cpu" and state[k].is_floating_point()]
    by_dtype: dict[torch.dtype, list[str]] = {}
    for k in names:
        by_dtype.setdefault(state[k].dtype, []).append(k)
    out = dict(state)
    for dtype, keys in by_dtype.items():
        copies, _ = huge_page_copies([state[k] for k in keys], dtype)
        out.update(zip(keys, copies, strict=True))
    return out
