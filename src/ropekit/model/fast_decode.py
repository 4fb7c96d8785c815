"""Deprecated (one release): ``FastDecoder`` was a second, hand-written decode loop.

The model's own layers now run one-token decode steps through the fused C++ kernels
(``ropekit.kernels.decode``), so ``model(token, cache=cache)`` is the fast path and
``ropekit.model.generate.generate_ids`` the decoding loop. ``FastDecoder`` remains as a thin
wrapper over them with its old interface.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence

import torch

from ropekit.model.kv_cache import KVCache


class FastDecoder:
    """Deprecated: greedy decoding of one sequence through the model itself and a ``KVCache``."""

    def __init__(self, model, max_len: int | None = None, **unused):
        warnings.warn("FastDecoder is deprecated: the model itself decodes through the fused kernels; use "
                      "model(token[:, None], cache=cache) or ropekit.model.generate.generate_ids",
                      DeprecationWarning, stacklevel=2)
        self.model = model
        self.max_len = int(max_len or model.config.max_position_embeddings)
        if self.max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {self.max_len}")
        self.cache = KVCache.for_model(model, 1, self.max_len)

    @property
    def length(self) -> int:
        return self.cache.length

    @torch.inference_mode()
    def prefill(self, ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Start a sequence with ``ids``; the last logits ``[V]``."""
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(1, -1)
        self.cache.reset()
        return self.model(ids, cache=self.cache, logits_to_keep=1)[0, -1]

    @torch.inference_mode()
    def step(self, token: int) -> torch.Tensor:
        """Append ``token``; its next-token logits ``[V]``."""
        return self.model(torch.tensor([[int(token)]]), cache=self.cache)[0, -1]

    def generate(self, ids: Sequence[int] | torch.Tensor, max_new_tokens: int,
                 stop_ids: Iterable[int] = ()) -> list[int]:
        """Greedy continuation of ``ids``."""
        from ropekit.model.generate import generate_ids

        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1).tolist()
        return [int(t[0]) for t in generate_ids(self.model, [ids], max_new_tokens=max_new_tokens,
                                                 stop_ids=stop_ids, max_length=self.max_len)]
