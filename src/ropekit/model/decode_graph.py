"""One-token decode steps recorded once and replayed: the engine's explicit decode capture.

Decoding one token on a CPU streams every weight once; the Python between the fused kernels then
runs on a cold cache and costs more than the kernels' own calls. A ``DecodeGraph`` removes that
Python: ``graph = model.capture_decode(cache)``, then ``graph.step(token)`` per new token.

- The first step runs the model's own ``forward`` (the same layer code as every other pass) with a
  ``ropekit.dispatch.Recording``: each fused op runs through its planner, which fixes its output
  buffers and returns the call that refills them. The pass also leaves its input buffers in the
  recording (the ``AttentionContext`` with the step's cos/sin rows, the embedding row).
- Later steps write the new inputs into those buffers (the token's embedding row, the rope rows at
  its position, the cache slot) and make the recorded calls in order. The logits equal an eager
  forward's bit for bit: the same kernels on the same buffers.
- A step records again when the model's rope, attention or weights, or the cache, changed since the
  last recording; a step that cannot be replayed (gradients on, torch ops forced, another attention
  than plain rope, a padded or batched cache, no C++ kernels here) runs the eager forward.

Nothing else in the engine records: ``LlamaModel.forward`` is always the plain forward pass, and an
op records only when it is handed a ``Recording``.
"""

from __future__ import annotations

import torch
from torch import nn

from ropekit.dispatch import Recording
from ropekit.kernels.decode import fused_decode_available
from ropekit.model.attention import RopeAttention
from ropekit.model.kv_cache import KVCache


class DecodeGraph:
    """One-token steps of one sequence on ``cache``: recorded on the first step, replayed after it.

    ``step(token) -> logits [1, 1, V]`` (float32), the same as ``model(tensor([[token]]), cache=cache)``.
    """

    def __init__(self, model: nn.Module, cache: KVCache):
        """``model``: a ``ropekit.model.LlamaModel`` (which builds graphs with ``capture_decode``)."""
        self.model, self.cache = model, cache
        self.recording: Recording | None = None
        self._key: tuple | None = None
        self._logits: torch.Tensor | None = None

    @staticmethod
    def replayable(model: nn.Module, cache: KVCache) -> bool:
        """Whether a step on ``cache`` can be recorded now: plain rope attention, one unpadded CPU sequence,
        no gradients, the fused C++ decode kernels in force for the model's weights."""
        return (type(model.attention) is RopeAttention and cache.batch_size == 1 and not cache.padded
                and not torch.is_grad_enabled() and fused_decode_available(model.embed_tokens.weight))

    def _state(self) -> tuple:
        """What a recording depends on: the cache and its buffers, the attention, the rope, the weights."""
        model, cache = self.model, self.cache
        weight = model.embed_tokens.weight
        return (id(cache), cache.keys.data_ptr(), id(model.attention), id(model.rope), weight.data_ptr(),
                weight.dtype, model.lm_head.weight.data_ptr())

    def step(self, token: int | torch.Tensor) -> torch.Tensor:
        """Logits ``[1, 1, V]`` of one new token (an int or a ``[1, 1]`` long tensor) at the next position."""
        input_ids = token if isinstance(token, torch.Tensor) else torch.tensor([[int(token)]])
        if input_ids.shape != (1, 1) or not self.replayable(self.model, self.cache):
            return self.model(input_ids, cache=self.cache)
        if self.recording is None or self._key != self._state():
            return self._record(input_ids)
        return self._replay(int(input_ids[0, 0]))

    def _record(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Run the step eagerly (the model's own forward) with a recording."""
        recording = Recording()
        logits = self.model._logits(input_ids, None, self.cache, None, 0, None, recording=recording)
        self.recording, self._key, self._logits = recording, self._state(), logits
        return logits.clone()

    def _replay(self, token: int) -> torch.Tensor:
        model, cache = self.model, self.cache
        context, embedding = self.recording.inputs["context"], self.recording.inputs["embedding"]
        if not 0 <= token < model.config.vocab_size:
            raise ValueError(f"token ids must lie in [0, {model.config.vocab_size}), got [{token}, {token}]")
        position = cache.next_position()
        rope = model.rope
        if rope.config.is_dynamic:  # the row at this position, from the current length position + 1
            cos, sin = rope(torch.tensor([position], device=context.cos.device), seq_len=position + 1)  # [1, R/2]
        else:  # a row of the rope's table (built once, grown on demand)
            cos, sin = (table[position] for table in rope.table(position + 1, context.cos.device))  # [R/2]
        context.cos.copy_(cos)
        context.sin.copy_(sin)
        embedding.view(-1).copy_(model.embed_tokens.weight[token])
        cache.open_slot(position)
        self.recording.replay()
        cache.close_slot()
        return self._logits.clone()
