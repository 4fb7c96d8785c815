"""``RotaryEmbedding``: a thin nn.Module over ``RopeConfig.frequencies`` and ``rope_cos_sin``, with its table."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ropekit.rope.config import RopeConfig
from ropekit.rope.cos_sin import MAX_POSITION, check_positions, rope_cos_sin

MIN_TABLE_ROWS = 256  # the first table's rows; each growth at least doubles them


def table_rows(needed: int, current: int) -> int:
    """Rows of a table grown to hold ``needed`` positions: at least double ``current`` (geometric growth, so a
    decode that walks one position at a time rebuilds the table O(log n) times), never past 2^31."""
    return min(max(needed, 2 * current, MIN_TABLE_ROWS), MAX_POSITION)


def gather_table(cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``positions`` of whole tables: cos/sin ``(N, R/2)``, positions integer ``(T,)`` or ``(B, T)`` in
    ``[0, N)`` -> cos, sin ``positions.shape + (R/2,)`` each (an index on the tables' device: no host sync)."""
    return cos[positions], sin[positions]


class RotaryEmbedding(nn.Module):
    """Holds a model's rope configuration, its inverse frequencies (a non-persistent buffer) and its cos/sin table.

    ``forward(positions, seq_len=None, position_end=None)`` returns ``(cos, sin)`` of shape
    ``positions.shape + (R/2,)``. For length-dependent types (dynamic, dynamic_yarn, longrope) the
    frequencies are recomputed from ``seq_len`` (default: the largest position + 1), statelessly: the
    same call always gives the same tables.

    The table: for a fixed-length type, cos/sin of positions ``0..N-1`` are computed once (float64
    angles, cast once to the table's dtype) per device and dtype, kept on this module, and gathered by
    position whenever the caller names a host-side bound on the positions. ``N`` grows geometrically
    as bounds grow (``table_rows``); nothing is allocated for lengths never asked for. The table is
    rebuilt when the module's frequencies change (another config, an in-place change of ``inv_freq``)
    and dropped when the module moves (``.to(...)``); a model that switches rope type builds a new
    ``RotaryEmbedding`` and so a new table.
    """

    def __init__(self, config: Any, device: torch.device | str | None = None):
        super().__init__()
        self.config = RopeConfig.from_hf(config)
        inv_freq, self.attention_factor = self.config.frequencies()
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)
        self._tables: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}
        self._tables_source: tuple | None = None  # what the tables were computed from (see ``_source``)

    def frequencies(self, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
        """(inv_freq ``(R/2,)`` float32, attention_factor) for the current length."""
        if not self.config.is_dynamic or seq_len is None:
            return self.inv_freq, self.attention_factor
        inv_freq, attention_factor = self.config.frequencies(seq_len)  # computed on the host
        return inv_freq.to(self.inv_freq.device, non_blocking=True), attention_factor  # no wait on the device

    def _source(self) -> tuple:
        """What the tables depend on; a change of any part drops them."""
        return (self.config, self.inv_freq, self.inv_freq._version, self.attention_factor)

    def table(self, length: int, device: torch.device | str | None = None,
              dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin ``(N, R/2)`` each with ``N >= length``: rows 0..N-1 of a fixed-length type's table on
        ``device`` (default: the buffer's) in ``dtype``, computed on first use and when a longer one is
        asked for (then at least twice as long). Row p equals ``rope_cos_sin(inv_freq, [p])``."""
        if self.config.is_dynamic:
            raise ValueError(f"rope type {self.config.rope_type!r} depends on the current length: it has no "
                             "single table (call the module with seq_len)")
        length = int(length)
        if not 0 < length <= MAX_POSITION:
            raise ValueError(f"a rope table holds 1 to 2**31 rows, asked for {length}")
        device = self.inv_freq.device if device is None else torch.device(device)
        source = self._source()
        if self._tables_source is None or any(a is not b for a, b in zip(self._tables_source, source, strict=True)):
            self._tables.clear()
            self._tables_source = source
        key = (device, dtype)
        cached = self._tables.get(key)
        if cached is None or cached[0].shape[0] < length:
            rows = table_rows(length, 0 if cached is None else cached[0].shape[0])
            positions = torch.arange(rows, device=device)
            cached = rope_cos_sin(self.inv_freq.to(device), positions, self.attention_factor, dtype)
            self._tables[key] = cached
        return cached

    def forward(self, positions: torch.Tensor, seq_len: int | None = None, dtype: torch.dtype = torch.float32,
                position_end: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin ``positions.shape + (R/2,)`` each in ``dtype`` for positions ``(T,)`` or ``(B, T)``.

        ``seq_len``: the current length for a length-dependent type (its frequencies are computed for it);
        ``position_end``: a host-side int greater than every position (the engine's count of its positions),
        which ``seq_len`` also is. Host synchronisation:

        - fixed-length type, integer positions, a bound known: rows gathered from ``table``, none;
        - fixed-length type otherwise (no bound, or positions between integers): computed directly from
          float64 angles, none;
        - length-dependent type without ``seq_len``: the largest position is read, one per call.
        """
        bound = seq_len if seq_len is not None else position_end
        if not self.config.is_dynamic:
            if bound is None or positions.dtype.is_floating_point or positions.numel() == 0:
                return rope_cos_sin(self.inv_freq, positions, self.attention_factor, dtype)
            check_positions(positions, bound)
            cos, sin = self.table(bound, positions.device, dtype)
            return gather_table(cos, sin, positions)
        if seq_len is None and positions.numel():
            seq_len = int(positions.max()) + 1  # the one host synchronisation of a length-dependent type
        inv_freq, attention_factor = self.frequencies(seq_len)
        return rope_cos_sin(inv_freq, positions, attention_factor, dtype)

    def _apply(self, fn, recurse: bool = True):
        self._tables.clear()  # a move or cast of the module: tables are rebuilt where they are next asked for
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"{self.config.describe()}, head_dim={self.config.head_dim}, base={self.config.rope_theta}"
