"""``RotaryEmbedding``: a thin nn.Module over ``RopeConfig.frequencies`` and ``rope_cos_sin``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ropekit.rope.config import RopeConfig
from ropekit.rope.cos_sin import rope_cos_sin


class RotaryEmbedding(nn.Module):
    """Holds a model's rope configuration and its inverse frequencies (a non-persistent buffer).

    ``forward(positions, seq_len=None)`` returns ``(cos, sin)`` of shape ``positions.shape + (R/2,)``.
    For length-dependent types (dynamic, dynamic_yarn, longrope) the frequencies are recomputed
    from ``seq_len`` (default: the largest position + 1), statelessly: the same call always gives
    the same tables.
    """

    def __init__(self, config: Any, device: torch.device | str | None = None):
        super().__init__()
        self.config = RopeConfig.from_hf(config)
        inv_freq, self.attention_factor = self.config.frequencies()
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)

    def frequencies(self, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
        """(inv_freq ``(R/2,)`` float32, attention_factor) for the current length."""
        if not self.config.is_dynamic or seq_len is None:
            return self.inv_freq, self.attention_factor
        inv_freq, attention_factor = self.config.frequencies(seq_len)
        return inv_freq.to(self.inv_freq.device), attention_factor

    def forward(self, positions: torch.Tensor, seq_len: int | None = None,
                dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        if seq_len is None and self.config.is_dynamic and positions.numel():
            seq_len = int(positions.max()) + 1
        inv_freq, attention_factor = self.frequencies(seq_len)
        return rope_cos_sin(inv_freq, positions, attention_factor, dtype)

    def extra_repr(self) -> str:
        return f"{self.config.describe()}, head_dim={self.config.head_dim}, base={self.config.rope_theta}"
