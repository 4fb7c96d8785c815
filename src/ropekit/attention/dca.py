"""Dual Chunk Attention, DCA (An et al. 2024, "Training-Free Long-Context Scaling of Large Language
Models", arXiv 2402.17463; repo HKUNLP/ChunkLlama, ``chunkllama_attn_replace.py``).

Chunk size S and local window W; chunk length ``CL = S - W``. Positions are cut into chunks of CL
tokens from position 0 (chunk of position p: ``floor(p / CL)``). Every key at position j is
rotated at ``j mod CL``; a query at position i is rotated at one of three positions, chosen per
query-key pair by how many chunks lie between them:

- **intra-chunk** (key in the query's own chunk): ``i mod CL``, so the relative distance is
  the true one, ``i - j``;
- **successive-chunk** (key in the previous chunk): ``min(i mod CL + CL, S)``: the true distance
  for the first W queries of a chunk, capped at S after them;
- **inter-chunk** (any older chunk): ``min(2 CL - 1, S)`` for every query.

The three score sets share ONE softmax (merged exactly), with no magnitude scaling; no relative
distance exceeds S, which stays inside the trained length L. The inter-chunk query position is the
one ChunkLlama's code uses (the successive table at ``CL - 1``: ``min(2 CL - 1, S)``), as did vLLM's
``DualChunkRotaryEmbedding`` (``qc_t`` clamped at ``chunk_size``, inter query at ``chunk_len - 1``);
the paper's text writes the inter-chunk query position as a constant one position away from it.

Defaults for a model trained on L tokens (``original_max_position_embeddings``, else
``max_position_embeddings`` of the rope config): ``S = 3L/4``, ``W = L/8`` (integer division).

The three parts run through the merge engine (``ropekit.attention.engine``): intra
``ChunkApart(CL, None, 0)``, successive ``ChunkApart(CL, 1, 1)``, inter ``ChunkApart(CL, 2, None)``;
on the fused path each chunk of queries is a causal square over its own chunk and full rectangles
over the previous chunk and the older ones.
"""

from __future__ import annotations

import torch

from ropekit.attention.engine import DEFAULT_BLOCK, ChunkApart, Part
from ropekit.attention.remap import PartsVariant
from ropekit.rope import RotaryEmbedding, rope_cos_sin

INTRA, SUCCESSIVE, INTER = 0, 1, 2


def dca_sizes(trained: int | None, chunk: int | None = None, local: int | None = None) -> tuple[int, int]:
    """(S, W): ``chunk`` and ``local`` where given, else ``3L/4`` and ``L/8`` of the trained length L.

    ValueError naming the key when a size is out of range (``local >= 1``, ``chunk > local``) or when
    a default is needed and L is unknown.
    """
    if (chunk is None or local is None) and not trained:
        raise ValueError("dca needs 'chunk' and 'local' (integers, chunk > local >= 1) when the model's trained "
                         "length (original_max_position_embeddings or max_position_embeddings) is unknown")
    S = int(chunk) if chunk is not None else 3 * int(trained) // 4
    W = int(local) if local is not None else int(trained) // 8
    if W < 1:
        raise ValueError(f"dca key 'local'={W} is out of range [1, chunk - 1]"
                         + ("" if local is not None else f" (default L/8 of the trained length {trained})"))
    if S <= W:
        raise ValueError(f"dca key 'chunk'={S} is out of range [local + 1 = {W + 1}, inf): the chunk must be "
                         f"longer than the local window 'local'={W}")
    return S, W


def dca_query_positions(q_pos: torch.Tensor, chunk: int, local: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                               torch.Tensor]:
    """A query's three rotation positions: (intra ``i mod CL``, successive ``min(i mod CL + CL, S)``,
    inter ``min(2 CL - 1, S)``), each shaped like q_pos ``[B, T]`` (long), ``CL = chunk - local``."""
    CL = chunk - local
    within = q_pos.clamp(min=0) % CL
    return within, (within + CL).clamp(max=chunk), torch.full_like(q_pos, min(2 * CL - 1, chunk))


def dca_key_positions(k_pos: torch.Tensor, chunk_len: int) -> torch.Tensor:
    """A key's rotation position ``j mod CL``; k_pos ``[B, S]`` long (negative = padding: rotated at 0)."""
    return k_pos.clamp(min=0) % chunk_len


def dca_parts(q_pos: torch.Tensor, k_pos: torch.Tensor, chunk_len: int) -> torch.Tensor:
    """``[B, T, S]`` long: INTRA (0), SUCCESSIVE (1) or INTER (2) for each pair, from the chunk distance
    ``floor(i / CL) - floor(j / CL)`` (0, 1, >= 2); a key in a later chunk counts as INTRA (causality
    masks it). q_pos ``[B, T]``, k_pos ``[B, S]`` long."""
    apart = q_pos.clamp(min=0)[:, :, None] // chunk_len - k_pos.clamp(min=0)[:, None, :] // chunk_len
    return apart.clamp(min=0, max=INTER)


class DualChunk(PartsVariant):
    """DCA with chunk size ``chunk`` (S) and local window ``local`` (W); None = the default from the
    trained length (S = 3L/4, W = L/8). ``block``: queries per block on the general path."""

    name = "dca"

    def __init__(self, chunk: int | None = None, local: int | None = None, block: int = DEFAULT_BLOCK):
        self.chunk = None if chunk is None else int(chunk)
        self.local = None if local is None else int(local)
        self.block = int(block)
        if self.chunk is not None and self.local is not None:
            dca_sizes(None, self.chunk, self.local)

    def sizes(self, rope: RotaryEmbedding) -> tuple[int, int]:
        """(S, W) for a model with this rope (defaults from its trained length)."""
        return dca_sizes(rope.config.original_max_position_embeddings, self.chunk, self.local)

    def with_model_config(self, config) -> DualChunk:
        """The sizes a model config declares in ``dual_chunk_attention_config`` (``chunk_size``,
        ``local_size``, ``original_max_position_embeddings``, as Qwen2.5-1M's) for the keys not given;
        self when it declares none."""
        declared = getattr(config, "dual_chunk_attention_config", None)
        if not isinstance(declared, dict) or (self.chunk is not None and self.local is not None):
            return self
        trained = declared.get("original_max_position_embeddings")
        chunk = self.chunk if self.chunk is not None else declared.get("chunk_size")
        local = self.local if self.local is not None else declared.get("local_size")
        if trained and (chunk is None or local is None):
            chunk, local = dca_sizes(int(trained), chunk, local)
        return DualChunk(chunk, local, self.block)

    def parts(self, rope: RotaryEmbedding, q_pos: torch.Tensor, k_pos: torch.Tensor, inv_freq: torch.Tensor,
              factor: float) -> list[Part]:
        """Three parts sharing the keys' rotation (at ``j mod CL``): intra, successive, inter."""
        S, W = self.sizes(rope)
        CL = S - W
        intra, succ, inter = dca_query_positions(q_pos, S, W)
        keys = rope_cos_sin(inv_freq, dca_key_positions(k_pos, CL), factor)
        return [Part(rope_cos_sin(inv_freq, intra, factor), keys, ChunkApart(CL, None, 0)),
                Part(rope_cos_sin(inv_freq, succ, factor), keys, ChunkApart(CL, 1, 1)),
                Part(rope_cos_sin(inv_freq, inter, factor), keys, ChunkApart(CL, 2, None))]

    def __repr__(self) -> str:
        return f"DualChunk(chunk={self.chunk}, local={self.local})"
