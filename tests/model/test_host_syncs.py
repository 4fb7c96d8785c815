"""A forward of a fixed-length rope type reads nothing back from its tensors (no host synchronisation: on a
GPU it can be captured); a length-dependent type reads one value per forward. Counted on the CPU by wrapping
every tensor-to-Python read, and checked under ``torch.cuda.set_sync_debug_mode("error")`` where CUDA exists."""

from __future__ import annotations

import pytest
import torch
from host_syncs import count_host_reads
from tiny_llama import tiny_model

from ropekit.attention import ConsistentDynamic, DualChunk, PartsVariant, ReRope, SelfExtend
from ropekit.model import KVCache
from ropekit.model.attention import patch
from ropekit.rope import RopeConfig, RotaryEmbedding, rope_cos_sin

FIXED = ["default", "linear:factor=2", "ntk:factor=2", "yarn:factor=4,original_max_position_embeddings=32",
         "llama3:factor=4,low_freq_factor=1,high_freq_factor=4,original_max_position_embeddings=32"]


def new_cache(model, ids: torch.Tensor) -> KVCache:
    """An empty one-sequence cache with room for ``ids`` and two more tokens, on the model's device."""
    return model.new_cache(1, ids.shape[1] + 2)


def run_prefill_and_decode(model, ids: torch.Tensor, cache: KVCache) -> list[torch.Tensor]:
    """Logits of a prefill without a cache, a prefill into the empty ``cache``, and two one-token steps on it."""
    return [model(ids), model(ids, cache=cache), model(ids[:, :1], cache=cache), model(ids[:, 1:2], cache=cache)]


def reference_logits(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """The same four results from full recomputations with explicit positions (rows computed directly)."""
    longer = torch.cat([ids, ids[:, :2]], dim=1)
    full = model(longer, positions=torch.arange(longer.shape[1]))
    return [full[:, : ids.shape[1]], full[:, : ids.shape[1]], full[:, -2:-1], full[:, -1:]]


@pytest.mark.parametrize("spec", FIXED)
def test_fixed_length_forward_reads_nothing_back(spec):
    model = patch(tiny_model(), spec)
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    with torch.no_grad():
        run_prefill_and_decode(model, ids, new_cache(model, ids))  # warm-up: the table is built here
        cache = new_cache(model, ids)
        with count_host_reads() as reads:
            got = run_prefill_and_decode(model, ids, cache)
        want = reference_logits(model, ids)
    assert not reads, f"{spec}: host reads during a forward: {dict(reads)}"
    for step, (g, w) in enumerate(zip(got, want, strict=True)):
        # cached steps multiply [1, D] rows where the full pass multiplies [T, D] blocks: rounding only
        torch.testing.assert_close(g, w, atol=1e-5, rtol=0, msg=lambda m, s=step: f"{spec} step {s}: {m}")


@pytest.mark.parametrize("spec", ["dynamic:factor=2", "dynamic_yarn:original_max_position_embeddings=8"])
def test_length_dependent_forward_reads_its_length_once(spec):
    model = patch(tiny_model(), spec)
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    with torch.no_grad():
        cache = model.new_cache(1, 4)
        for run in (lambda: model(ids), lambda: model(ids[:, :3], cache=cache)):
            with count_host_reads() as reads:
                run()
            assert sum(reads.values()) == 1, dict(reads)


@pytest.mark.parametrize("variant", [SelfExtend(group=2, window=4), ReRope(window=4), ReRope(window=4, leak=2.0),
                                     DualChunk(chunk=12, local=4), ConsistentDynamic()])
def test_variant_tables_read_back_at_most_the_rows_layout(variant):
    """Fixed-length rope: the frequencies need no read; a variant made of parts reads its rows' layout once
    per forward (the fused path's rectangles are host integers), shared by every layer."""
    rope = RotaryEmbedding(RopeConfig(head_dim=16, max_position_embeddings=16).with_rope_type("yarn:factor=2"))
    q_pos = torch.arange(20, 26).expand(2, -1)
    k_pos = torch.cat([torch.full((2, 1), -1), torch.arange(26).expand(2, -1)], dim=1)  # a padding key first
    with count_host_reads() as reads:
        tables = variant.tables(rope, q_pos, k_pos)
    expected = 1 if isinstance(variant, PartsVariant) else 0
    assert sum(reads.values()) == expected, f"{variant!r}: {dict(reads)}"
    if expected:
        assert tables.groups is not None  # and the layout was understood: the fused path applies


def test_variant_tables_use_the_fixed_frequencies():
    """Self-Extend's tables without the length read: the near rows are the rope's own rows at each position."""
    rope = RotaryEmbedding(RopeConfig(head_dim=16, max_position_embeddings=16).with_rope_type("yarn:factor=2"))
    q_pos, k_pos = torch.arange(20, 26)[None], torch.arange(26)[None]
    tables = SelfExtend(group=2, window=4).tables(rope, q_pos, k_pos)
    want = rope_cos_sin(rope.inv_freq, q_pos, rope.attention_factor)
    torch.testing.assert_close(tables.parts[0].q_table, want, rtol=0, atol=0)


def test_set_rope_at_run_time_serves_the_new_rope():
    """Switching the rope type (``patch``) must not keep the old table: logits equal a model built with it."""
    ids = torch.randint(0, 259, (1, 20))
    model = tiny_model()
    with torch.no_grad():
        model(ids)  # builds the default table
        patch(model, "linear:factor=4")
        switched = model(ids)
        fresh = tiny_model(rope={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0})(ids)
    torch.testing.assert_close(switched, fresh, rtol=0, atol=0)


def test_decode_graph_replays_rows_of_a_growing_table():
    """Recorded decode steps past the first table's rows (256): the table grows during replay and every
    step's logits equal the eager forward's bit for bit (the same rows, the same kernels)."""
    from ropekit.kernels import decode

    if decode.extension() is None:
        pytest.fail(f"the C++ decode kernels did not build: {decode.GEMV_EXTENSION.error}")
    model = tiny_model()
    prompt = torch.randint(3, 250, (1, 250), generator=torch.Generator().manual_seed(3))
    tokens = torch.randint(3, 250, (12,), generator=torch.Generator().manual_seed(4)).tolist()
    caches = model.new_cache(1, 262), model.new_cache(1, 262)
    with torch.no_grad():
        for cache in caches:
            model(prompt, cache=cache)
        graph = model.capture_decode(caches[0])
        replayed = torch.stack([graph.step(token)[0, -1] for token in tokens])
        eager = torch.stack([model(torch.tensor([[token]]), cache=caches[1])[0, -1] for token in tokens])
    assert graph.recording is not None and model.rope.table(1)[0].shape[0] == 512
    torch.testing.assert_close(replayed, eager, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("spec", ["default", "yarn:factor=4,original_max_position_embeddings=32"])
def test_fixed_length_forward_does_not_synchronise_on_cuda(spec):
    model = patch(tiny_model(), spec).cuda()
    ids = torch.randint(0, model.config.vocab_size, (1, 12), device="cuda")
    with torch.no_grad():
        want = [x.cpu() for x in run_prefill_and_decode(model, ids, new_cache(model, ids))]  # warm-up: tables built
        cache = new_cache(model, ids)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            got = run_prefill_and_decode(model, ids, cache)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.cpu(), w, atol=0, rtol=0)  # the same kernels on the same inputs
