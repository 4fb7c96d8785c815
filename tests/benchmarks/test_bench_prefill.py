"""benchmarks/bench_prefill.py's FLOP count against independent counts on the tiny model (no timing here)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from tiny_llama import tiny_model
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from bench_prefill import prefill_flops  # noqa: E402  (a script folder, not a package)


def linear_flops(model: torch.nn.Module, T: int) -> int:
    """2 T x (in x out) summed over the model's own nn.Linear modules (q, k, v, o, gate, up, down, lm_head)."""
    return 2 * T * sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))


def causal_attention_flops(model: torch.nn.Module, T: int) -> int:
    """QK^T and PV of every attention layer, counted by torch's FLOP counter on full [H, T, T] products and
    halved for causality (the counter does not see the model's fused CPU attention kernel)."""
    total = 0
    for layer in (m for m in model.modules() if hasattr(m, "q_proj")):
        H, D = layer.num_heads, layer.q_proj.out_features // layer.num_heads
        q = k = v = torch.ones(H, T, D)
        with FlopCounterMode(display=False) as counter:
            torch.bmm(torch.bmm(q, k.transpose(1, 2)), v)  # [H, T, T] @ [H, T, D]
        total += counter.get_total_flops() // 2
    return total


@pytest.mark.parametrize("changes", [{}, {"tie_word_embeddings": True}, {"num_key_value_heads": 4},
                                     {"head_dim": 8, "num_attention_heads": 8, "num_key_value_heads": 2}])
@pytest.mark.parametrize("T", [1, 16, 33])
def test_prefill_flops_is_the_linear_shapes_plus_causal_attention(changes, T):
    model = tiny_model(**changes)
    assert prefill_flops(model.config, T) == linear_flops(model, T) + causal_attention_flops(model, T)


def test_matmul_part_is_what_the_forward_pass_multiplies():
    """torch's FLOP counter on the real prefill (hidden states + output head) sees the matmul part exactly."""
    model, T = tiny_model(), 24
    ids = torch.randint(0, model.config.vocab_size, (1, T))
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model.lm_head(model.hidden_states(ids))
    assert counter.get_total_flops() == prefill_flops(model.config, T) - causal_attention_flops(model, T)


def test_prefill_flops_reads_a_transformers_config_alike():
    import transformers

    model = tiny_model()
    hf = transformers.LlamaConfig(**model.config.to_hf())
    assert prefill_flops(hf, 100) == prefill_flops(model.config, 100)


def test_smollm2_numbers():
    """SmolLM2-135M's shapes (C 576, I 1536, 30 layers, 9/3 heads of 64, V 49152): 269 MFLOP of matmuls per token."""
    from types import SimpleNamespace

    config = SimpleNamespace(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                             num_key_value_heads=3, head_dim=64, vocab_size=49152)
    per_token = 30 * (576 * 576 * 2 + 576 * 192 * 2 + 3 * 576 * 1536) + 576 * 49152
    assert prefill_flops(config, 4096) == 2 * 4096 * per_token + 30 * 2 * 4096**2 * 9 * 64
    assert prefill_flops(config, 1) - prefill_flops(config, 0) == pytest.approx(269e6, rel=1e-3)
