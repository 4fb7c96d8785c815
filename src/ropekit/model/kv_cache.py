"""A preallocated, position-tracked key/value cache.

Decoding with a cache, as in LLaMA: a prompt of n tokens is rotated at positions 0..n-1 and its
keys stored; each new token is rotated at n, n+1, ... and appended. Stored keys keep the rotation
they got when they were written. The cache also records, per row and slot, the position each key
was rotated at (``-1`` for a padding slot), so attention can mask padding and methods that
re-rotate keys (dynamic scaling, Self-Extend, ReRoPE) know where every key sits.

Slots fill left to right and are shared by all rows of the batch (left padding keeps rows
aligned), so one integer ``length`` says how many slots are in use.
"""

from __future__ import annotations

import math

import torch

from ropekit.dispatch import Recording
from ropekit.kernels.decode import decode_attention
from ropekit.memory import check_fits, kv_cache_bytes


class KVCache:
    """Keys and values for every layer, preallocated to ``max_len`` slots.

    Buffers: ``keys``/``values`` ``[L, B, Hkv, S_max, D]``; ``key_positions`` ``[B, S_max]`` (long,
    ``-1`` = empty or padding). ``length`` slots are filled after each complete forward pass.
    """

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int, max_len: int,
                 *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        if max_len < 1:
            raise ValueError(f"KVCache max_len must be >= 1, got {max_len}")
        check_fits(f"a KV cache of {max_len} slots (batch {batch_size}, {num_layers} layers, {num_kv_heads} kv heads x "
                   f"{head_dim}, {dtype})", kv_cache_bytes(num_layers, batch_size, num_kv_heads, head_dim, max_len,
                                                           dtype))
        shape = (num_layers, batch_size, num_kv_heads, max_len, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.key_positions = torch.full((batch_size, max_len), -1, dtype=torch.long, device=device)
        self.max_len = max_len
        self._fill = [0] * num_layers  # slots written per layer; all equal between forward passes
        self.slot = torch.zeros((), dtype=torch.long)  # the slot of the current one-token step (decode kernel)
        self.padded = False  # whether a padding slot (position -1) was ever written since the last reset
        self._last_position = -1  # one-sequence caches: the largest position written (Python int)
        self._position_end = 0  # every position written so far is below this (Python int)
        # keys kept in other forms (an attention variant's rotations), by name: (buffers, filled slots per layer)
        self._derived: dict[str, tuple[list[torch.Tensor], list[int]]] = {}

    def derived_keys(self, name: str, count: int, layer_idx: int) -> tuple[list[torch.Tensor], int]:
        """``count`` buffers of layer ``layer_idx`` kept under ``name`` beside the keys (each ``[B, Hkv, S_max,
        D]``, the cache's dtype; allocated on first use) and how many of their first slots are written
        (``set_derived_fill``). An attention variant keeps its rotated keys here, so each key is rotated once.
        Forks copy them; ``reset`` drops them."""
        if name not in self._derived:
            check_fits(f"{count} rotated copies of the KV cache's keys", count * self.keys.numel()
                       * self.keys.element_size())
            self._derived[name] = ([torch.zeros_like(self.keys) for _ in range(count)], [0] * len(self._fill))
        buffers, fill = self._derived[name]
        return [b[layer_idx] for b in buffers], fill[layer_idx]

    def set_derived_fill(self, name: str, layer_idx: int, filled: int) -> None:
        """The derived buffers ``name`` of layer ``layer_idx`` hold their first ``filled`` slots."""
        self._derived[name][1][layer_idx] = filled

    @classmethod
    def for_model(cls, model, batch_size: int, max_len: int) -> KVCache:
        """A cache shaped for ``model`` (a ``LlamaModel``), in the model's dtype and device."""
        cfg = model.config
        param = model.embed_tokens.weight
        return cls(cfg.num_hidden_layers, batch_size, cfg.num_key_value_heads, cfg.head_dim, max_len,
                   dtype=param.dtype, device=param.device)

    @property
    def length(self) -> int:
        """Slots filled by completed forward passes (the last layer writes last)."""
        return self._fill[-1]

    @property
    def batch_size(self) -> int:
        return self.key_positions.shape[0]

    def check_room(self, num_new: int) -> None:
        """Raise ``ValueError`` if ``num_new`` more tokens do not fit (before anything is written)."""
        if self.length + num_new > self.max_len:
            raise ValueError(f"KV cache overflow: {self.length} tokens cached + {num_new} new > "
                             f"capacity {self.max_len}; allocate a longer cache")

    def next_positions(self) -> torch.Tensor:
        """``[B]`` long: the position the next real token of each row gets (0 for an empty row)."""
        if self.length == 0:
            return torch.zeros(self.batch_size, dtype=torch.long, device=self.key_positions.device)
        return self.key_positions[:, : self.length].max(dim=1).values.clamp(min=-1) + 1

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
               first_position: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's keys/values for one layer and return all of that layer's so far.

        k, v: ``[B, Hkv, T, D]`` (k already rotated, or not: the cache does not care);
        positions: ``[B, T]`` long, ``-1`` for padding; ``first_position``: the host int p when every row's
        positions are ``p .. p + T - 1`` (then nothing is read back from them), else None. Returns
        ``(keys, values)``, each ``[B, Hkv, S, D]`` with ``S = length + T``: views into the buffers, valid until
        the next update.
        """
        start = self._fill[layer_idx]
        end = start + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow in layer {layer_idx}: {start} + {k.shape[2]} > "
                             f"{self.max_len}")
        self.keys[layer_idx, :, :, start:end] = k
        self.values[layer_idx, :, :, start:end] = v
        if layer_idx == 0:
            self.key_positions[:, start:end] = positions
            self._note_positions(positions, first_position)
        self._fill[layer_idx] = end
        return self.keys[layer_idx, :, :, :end], self.values[layer_idx, :, :, :end]

    def _note_positions(self, positions: torch.Tensor, first_position: int | None = None) -> None:
        """Host-side bookkeeping of the positions written (padding seen, the largest position)."""
        if positions.numel() == 0:
            return
        if first_position is None:  # read from the tensor: a host synchronisation
            low, high = int(positions.min()), int(positions.max())
        else:
            low, high = first_position, first_position + positions.shape[-1] - 1
        self.padded = self.padded or low < 0
        self._position_end = max(self._position_end, high + 1)
        if self.batch_size == 1:
            self._last_position = max(self._last_position, high)

    @property
    def position_end(self) -> int:
        """A host-side int greater than every position written since the last reset (0 when none)."""
        return self._position_end

    def next_position(self) -> int:
        """The next position of a one-sequence cache (the largest written + 1, 0 when empty)."""
        if self.batch_size != 1:
            raise ValueError(f"next_position is for one-sequence caches, this one holds {self.batch_size}")
        return self._last_position + 1

    def open_slot(self, position: torch.Tensor | int) -> int:
        """Start a one-token step of a one-sequence cache: the slot it writes (also in ``self.slot``), its
        position recorded. ``position``: the token's position (an int, or a tensor with one element)."""
        slot = self.length
        if self.batch_size != 1:
            raise ValueError(f"a one-token step takes a one-sequence cache, this one holds {self.batch_size}")
        if slot >= self.max_len:
            raise ValueError(f"KV cache overflow: {slot} tokens cached + 1 new > capacity {self.max_len}; "
                             "allocate a longer cache")
        position = int(position) if isinstance(position, int) else int(position.reshape(-1)[0])
        self.slot.fill_(slot)
        self.key_positions[0, slot] = position
        self.padded = self.padded or position < 0
        self._last_position = max(self._last_position, position)
        self._position_end = max(self._position_end, position + 1)
        return slot

    def close_slot(self) -> None:
        """End a one-token step: every layer has written its slot."""
        self._fill = [self.length + 1] * len(self._fill)

    def attend_one(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   positions: torch.Tensor | int, recording: Recording | None = None) -> torch.Tensor:
        """One new token of a one-sequence cache: store k, v in the next slot of this layer and attend over
        slots 0..slot (the ``decode_attention`` op: a C++ kernel for float32 activations on the CPU).

        q ``[1, H, 1, D]`` and k ``[1, Hkv, 1, D]`` rotated, v ``[1, Hkv, 1, D]``, positions ``[1, 1]`` (or the
        position as a host int: then nothing is read back from the device).
        Returns ``[1, H, 1, D]`` in q's dtype. The layers of one forward share the step's slot: the
        first opens it, the last closes it. ``recording``: keep the kernel call for replay (the slot is
        then read from ``self.slot`` when the call runs).
        """
        if q.shape[0] != 1 or q.shape[2] != 1:
            raise ValueError(f"attend_one takes one token of one sequence, got q of shape {tuple(q.shape)}")
        if layer_idx == 0:
            self.open_slot(positions)
        elif self._fill[layer_idx] != self._fill[0] - 1:
            raise ValueError(f"attend_one: layer {layer_idx} is not at the step layer 0 opened")
        out = decode_attention(q.reshape(-1), k.reshape(-1), v.reshape(-1), self.keys[layer_idx, 0],
                               self.values[layer_idx, 0], self.slot, 1.0 / math.sqrt(q.shape[-1]),
                               recording=recording)
        self._fill[layer_idx] += 1
        return out.view(q.shape).to(q.dtype)

    def fork(self, max_len: int | None = None) -> KVCache:
        """A new cache holding a copy of this one's filled slots (keys, values, positions), with ``max_len``
        slots in all (default: this cache's capacity); this cache is left as it is.

        A prefix shared by several prompts runs once into a cache; each prompt then continues from a fork
        of it: the same keys at the same positions as if it had run the whole prompt itself. Only between
        forward passes (every layer at the same fill).
        """
        max_len = self.max_len if max_len is None else int(max_len)
        n = self.length
        if max_len < n:
            raise ValueError(f"a fork of a cache holding {n} tokens needs at least {n} slots, got {max_len}")
        if any(fill != n for fill in self._fill):
            raise ValueError("fork a cache between forward passes, not while a pass is writing it")
        L, B, H, _, D = self.keys.shape
        new = KVCache(L, B, H, D, max_len, dtype=self.keys.dtype, device=self.keys.device)
        new.keys[:, :, :, :n] = self.keys[:, :, :, :n]
        new.values[:, :, :, :n] = self.values[:, :, :, :n]
        new.key_positions[:, :n] = self.key_positions[:, :n]
        new._fill = [n] * L
        new.padded, new._last_position, new._position_end = self.padded, self._last_position, self._position_end
        for name, (buffers, fill) in self._derived.items():
            copies = [torch.zeros_like(new.keys) for _ in buffers]
            for copy, buffer in zip(copies, buffers, strict=True):
                copy[:, :, :, :n] = buffer[:, :, :, :n]
            new._derived[name] = (copies, [min(f, n) for f in fill])
        return new

    def reset(self) -> None:
        """Forget everything (buffers stay allocated)."""
        self._fill = [0] * len(self._fill)
        self._derived.clear()
        self.key_positions.fill_(-1)
        self.padded, self._last_position, self._position_end = False, -1, 0
