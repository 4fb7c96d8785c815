"""The model and its KV cache on tiny random models: transformers parity, cache and padding invariants."""

from __future__ import annotations

import pytest
import torch
from tiny_llama import tiny_model, to_transformers

from ropekit.model import KVCache, RopeAttention


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def test_logits_match_transformers(model):
    ids = torch.randint(0, model.config.vocab_size, (3, 33))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), to_transformers(model)(ids).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("rope", [
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    {"rope_type": "dynamic", "factor": 2.0},
])
def test_scaled_rope_matches_transformers(rope):
    model = tiny_model(rope={**rope, "rope_theta": 10000.0})
    ids = torch.randint(0, model.config.vocab_size, (1, 100))  # past the 32/128-token trained lengths
    with torch.no_grad():
        torch.testing.assert_close(model(ids), to_transformers(model)(ids).logits, atol=1e-5, rtol=0)


def test_explicit_positions_equal_default(model):
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids, positions=torch.arange(9)), model(ids), atol=0, rtol=0)
        per_row = torch.arange(9).expand(2, 9)
        torch.testing.assert_close(model(ids, positions=per_row), model(ids), atol=0, rtol=0)


def test_position_offset_changes_logits_but_not_causality(model):
    """Shifting every position keeps relative distances: outputs agree to rounding (RoPE is relative)."""
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    with torch.no_grad():
        shifted = model(ids, positions=torch.arange(12) + 1000)
        torch.testing.assert_close(shifted, model(ids), atol=1e-4, rtol=0)


def test_cached_decoding_equals_full_recomputation(model):
    """Prefill 7 tokens, then decode 9 one at a time. Equal to 1e-5, not bitwise: the full pass
    multiplies [T, D] blocks where decoding multiplies [1, D] rows, and BLAS sums in a different order."""
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    cache = KVCache.for_model(model, batch_size=2, max_len=16)
    with torch.no_grad():
        full = model(ids)
        steps = [model(ids[:, :7], cache=cache)]
        steps += [model(ids[:, t:t + 1], cache=cache) for t in range(7, 16)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)
    assert cache.length == 16 and cache.key_positions[0].tolist() == list(range(16))


def test_chunked_prefill_equals_full(model):
    ids = torch.randint(0, model.config.vocab_size, (1, 20))
    cache = model.new_cache(1, 32)
    with torch.no_grad():
        chunks = [model(ids[:, :8], cache=cache), model(ids[:, 8:], cache=cache)]
        torch.testing.assert_close(torch.cat(chunks, dim=1), model(ids), atol=1e-5, rtol=0)


def test_left_padded_batch_equals_each_row_alone(model):
    """Rows of lengths 11 and 4, the short one left-padded: its first real token sits at position 0."""
    torch.manual_seed(1)
    long, short = torch.randint(3, 200, (11,)), torch.randint(3, 200, (4,))
    ids = torch.stack([long, torch.cat([torch.zeros(7, dtype=torch.long), short])])
    mask = torch.tensor([[1] * 11, [0] * 7 + [1] * 4])
    cache = model.new_cache(2, 14)
    with torch.no_grad():
        batch = model(ids, cache=cache, attention_mask=mask)
        step = model(torch.tensor([[42], [42]]), cache=cache)  # decode: each row at its own next position
        alone_long = model(torch.cat([long, torch.tensor([42])])[None])
        alone_short = model(torch.cat([short, torch.tensor([42])])[None])
    torch.testing.assert_close(batch[0], alone_long[0, :11], atol=1e-5, rtol=0)
    torch.testing.assert_close(batch[1, 7:], alone_short[0, :4], atol=1e-5, rtol=0)
    torch.testing.assert_close(step[0, 0], alone_long[0, 11], atol=1e-5, rtol=0)
    torch.testing.assert_close(step[1, 0], alone_short[0, 4], atol=1e-5, rtol=0)
    assert cache.key_positions[1].tolist()[:8] == [-1] * 7 + [0]


def test_cache_overflow_is_a_clear_error(model):
    cache = model.new_cache(1, 8)
    with torch.no_grad():
        model(torch.ones(1, 6, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="KV cache overflow: 6 tokens cached \\+ 3 new > capacity 8"):
            model(torch.ones(1, 3, dtype=torch.long), cache=cache)
    assert cache.length == 6  # nothing was written by the failed call


def test_cache_reset(model):
    cache = model.new_cache(1, 8)
    ids = torch.randint(0, 100, (1, 5))
    with torch.no_grad():
        first = model(ids, cache=cache)
        cache.reset()
        assert cache.length == 0
        torch.testing.assert_close(model(ids, cache=cache), first, atol=0, rtol=0)


@pytest.mark.parametrize("bad, match", [(torch.ones(1, 0, dtype=torch.long), "empty"),
                                        (torch.ones(2, 3), "LongTensor"),
                                        (torch.full((1, 2), 10_000), "token ids must lie")])
def test_bad_input_ids(model, bad, match):
    with pytest.raises(ValueError, match=match):
        model(bad)


def test_set_rope_switches_and_restores(model):
    ids = torch.randint(0, 100, (1, 40))
    original = model.config.rope
    with torch.no_grad():
        before = model(ids)
        model.set_rope("linear:factor=2")
        assert model.config.rope.rope_type == "linear" and model.rope.config.rope_type == "linear"
        assert not torch.allclose(model(ids), before)
        model.set_rope(original)
        torch.testing.assert_close(model(ids), before, atol=0, rtol=0)


class _CountingAttention(RopeAttention):
    """An alternative attention: plain RoPE attention that counts its calls (the hook contract)."""

    def __init__(self):
        self.prepared, self.attended = 0, []

    def prepare(self, context):
        self.prepared += 1
        super().prepare(context)

    def attend(self, layer_idx, q, k, v, context):
        self.attended.append((layer_idx, tuple(q.shape), tuple(k.shape)))
        return super().attend(layer_idx, q, k, v, context)


def test_attention_hook_is_called_once_per_forward_and_per_layer():
    model = tiny_model()
    ids = torch.randint(0, 100, (1, 6))
    with torch.no_grad():
        expected = model(ids)
        hook = _CountingAttention()
        model.set_attention(hook)
        torch.testing.assert_close(model(ids), expected, atol=0, rtol=0)
    assert hook.prepared == 1  # cos/sin computed once per forward
    assert hook.attended == [(0, (1, 4, 6, 16), (1, 2, 6, 16)), (1, (1, 4, 6, 16), (1, 2, 6, 16))]
