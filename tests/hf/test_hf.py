"""ropekit inside transformers (ropekit.hf): tiny random models of every supported architecture, built from
their config classes, against transformers' own rope types, the engine, and recomputation without a cache.

References: for rope types, the same weights in a model that transformers builds with that
``rope_parameters`` (its own frequency code); for attention variants, ropekit's engine on the same
GGUF (SmolLM2) and, on tiny models, the patched model recomputed from scratch at every step (the
cache invariant) and each prompt alone (left padding). Tolerances at each call: float32 logits of a
2-layer model agree to ~1e-7; 1e-5 leaves room for float32 angles on transformers' side.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from ropekit.hf import key_positions, patch, patched_method, supported, unpatch

COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, vocab_size=100, pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=32)
EXTRA = {"qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
         "mixtral": dict(num_local_experts=4, num_experts_per_tok=2), "smollm3": dict(num_hidden_layers=4),
         "gemma2": dict(sliding_window=8), "ministral": dict(sliding_window=8,
                                                               layer_types=["full_attention", "sliding_attention"]),
         "mistral": dict(sliding_window=None), "phi3": dict(original_max_position_embeddings=16)}
REQUIRED = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2"]
T = 48  # tokens: past the tiny models' trained length of 32


def tiny(model_type: str, rope: dict | None = None, seed: int = 0, **changes):
    """A random 2-layer ``model_type`` model in float32, eval mode; ``rope`` replaces the rope type (the base,
    theta 1e4 and the architecture's own partial rotary factor, is kept)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        probe = AutoConfig.for_model(model_type, **{**COMMON, **EXTRA.get(model_type, {})})
        base = {"rope_type": "default", "rope_theta": 10000.0}
        partial = probe.rope_parameters.get("partial_rotary_factor")
        if partial is not None and partial != 1.0:
            base["partial_rotary_factor"] = partial
        config = AutoConfig.for_model(model_type, **{**COMMON, **EXTRA.get(model_type, {}), **changes,
                                                     "rope_parameters": {**base, **(rope or {})}})
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config).eval()
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens (greedy references never stop)
    return model


def ids(batch: int = 1, length: int = T, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 100, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model, x, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(x, **kwargs).logits


def rotary(model):
    return getattr(model, model.base_model_prefix).rotary_emb


def rotary_dim(model) -> int:
    return 2 * rotary(model).inv_freq.shape[-1]


def rope_types_for(model_type: str, pairs: int) -> dict[str, tuple[str, dict]]:
    """spec -> the matching transformers rope_parameters (phi3's config accepts default and longrope only)."""
    short, long = [1.0 + 0.1 * i for i in range(pairs)], [2.0 + 0.5 * i for i in range(pairs)]
    longrope = (f"longrope:short_factor={short},long_factor={long},original_max_position_embeddings=16",
                {"rope_type": "longrope", "short_factor": short, "long_factor": long,
                 "original_max_position_embeddings": 16})
    if model_type == "phi3":
        return {"longrope": longrope}
    return {
        "yarn": ("yarn:factor=2", {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32}),
        "linear": ("linear:factor=2", {"rope_type": "linear", "factor": 2.0}),
        "dynamic": ("dynamic:factor=2", {"rope_type": "dynamic", "factor": 2.0}),
        "llama3": ("llama3:factor=4,low_freq_factor=1,high_freq_factor=4,original_max_position_embeddings=16",
                   {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 16}),
        "longrope": longrope,
    }


def test_supported_lists_the_required_architectures():
    assert set(REQUIRED) <= set(supported())
    assert supported() == sorted(supported())


@pytest.mark.parametrize("model_type", supported())
def test_rope_types_equal_transformers_building_the_model_with_them(model_type):
    """patch(model, spec) == the same weights in a model transformers built with that rope_parameters."""
    model = tiny(model_type)
    x = ids()
    for name, (spec, rope) in rope_types_for(model_type, rotary_dim(model) // 2).items():
        reference = tiny(model_type, rope)
        reference.load_state_dict(model.state_dict())
        want = logits(reference, x)
        patch(model, spec)
        assert patched_method(model).text == spec
        torch.testing.assert_close(logits(model, x), want, atol=1e-5, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
        unpatch(model)


@pytest.mark.parametrize("model_type", supported())
@pytest.mark.parametrize("spec", ["none", "self-extend:group=2,window=1000", "rerope:window=1000",
                                  "dynamic:factor=2+consistent"])
def test_variants_that_change_nothing_reproduce_the_model_and_unpatch_is_bit_exact(model_type, spec):
    """A window longer than the text (dynamic scaling within the trained length) is plain RoPE: the rotation
    moves from the model's apply into ropekit's attention and the logits stay; unpatch gives the original
    logits bit for bit."""
    model = tiny(model_type)
    x = ids(length=T if "dynamic" not in spec else 30)
    before = logits(model, x)
    patch(model, spec)
    torch.testing.assert_close(logits(model, x), before, atol=1e-5, rtol=0)
    unpatch(model)
    assert torch.equal(logits(model, x), before)
    assert "forward" not in vars(rotary(model))


def greedy_without_cache(model, prompt: torch.Tensor, steps: int) -> list[int]:
    out = prompt
    for _ in range(steps):
        nxt = logits(model, out)[:, -1].argmax(-1, keepdim=True)
        out = torch.cat([out, nxt], dim=1)
    return out[0, prompt.shape[1]:].tolist()


@pytest.mark.parametrize("model_type", REQUIRED + ["cohere", "glm", "smollm3", "phi"])
@pytest.mark.parametrize("spec", ["self-extend:group=3,window=6", "leaky-rerope:window=5,k=3",
                                  "yarn:factor=2+self-extend:group=2,window=8"])
def test_generate_with_the_cache_equals_recomputation_without_it(model_type, spec):
    model = patch(tiny(model_type), spec)
    prompt = ids(length=40)
    with torch.no_grad():
        cached = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
                                do_sample=False, pad_token_id=0)[0, 40:].tolist()
    assert cached == greedy_without_cache(model, prompt, 8)


@pytest.mark.parametrize("model_type", ["llama", "gemma2", "qwen3"])
@pytest.mark.parametrize("spec", ["self-extend:group=2,window=4", "leaky-rerope:window=3,k=2",
                                  "dynamic:factor=2+consistent"])
def test_left_padded_batch_equals_each_prompt_alone(model_type, spec):
    model = patch(tiny(model_type), spec)
    short, long = ids(length=20, seed=2), ids(length=29, seed=3)
    batch = torch.cat([torch.cat([torch.zeros(1, 9, dtype=torch.long), short], 1), long])
    mask = torch.ones(2, 29, dtype=torch.long)
    mask[0, :9] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate() computes them: each row counts from 0
    both = logits(model, batch, attention_mask=mask, position_ids=positions)
    torch.testing.assert_close(both[0, 9:], logits(model, short)[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(both[1], logits(model, long)[0], atol=1e-5, rtol=0)
    with torch.no_grad():
        generated = model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                   pad_token_id=0)
        alone = model.generate(short, attention_mask=torch.ones_like(short), max_new_tokens=6,
                               do_sample=False, pad_token_id=0)
    assert generated[0, 29:].tolist() == alone[0, 20:].tolist()


def cached_vs_scratch(model, x, prompt: int):
    """(each new token's logits decoded with the cache, the same from a full recomputation)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model(x[:, :prompt], cache=cache, use_cache=True)
        cached = [out.logits[:, -1]]
        for t in range(prompt, x.shape[1]):
            out = model(x[:, t:t + 1], cache=out.cache, use_cache=True)
            cached.append(out.logits[:, -1])
        scratch = [model(x[:, :t + 1]).logits[:, -1] for t in range(prompt - 1, x.shape[1])]
    return torch.cat(cached), torch.cat(scratch)


def test_consistent_dynamic_in_transformers_equals_recomputation_where_transformers_dynamic_does_not():
    """After a prompt longer than the trained length (32), every decode step crosses a new length: with
    cache-consistent dynamic scaling the cached step equals recomputing from scratch (one layer: deeper
    layers' keys come from hidden states computed at their own time), transformers' own dynamic type keeps
    cached keys at older bases (transformers issue 25104) and drifts."""
    x = ids(length=56, seed=4)
    ours = patch(tiny("llama", num_hidden_layers=1), "dynamic:factor=2+consistent")
    cached, scratch = cached_vs_scratch(ours, x, prompt=40)
    torch.testing.assert_close(cached, scratch, atol=1e-5, rtol=0)
    theirs = tiny("llama", {"rope_type": "dynamic", "factor": 2.0}, num_hidden_layers=1)
    cached, scratch = cached_vs_scratch(theirs, x, prompt=40)
    drift = (cached - scratch).abs().max().item()
    assert drift > 1e-4, f"transformers' dynamic NTK drifts by {drift:.2e} only"  # measured 6.2e-4


def test_key_positions_from_the_mask():
    """Keys are consecutive slots ending at the row's last query: left padding and a static cache's empty tail."""
    q_pos = torch.tensor([[3, 4], [5, 6]])
    mask = torch.zeros(2, 1, 2, 8, dtype=torch.bool)
    mask[0, 0, :, 2:7] = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)  # 2 pads, 1 empty
    mask[1, 0, :, :7] = torch.tensor([[1] * 6 + [0], [1] * 7], dtype=torch.bool)
    k_pos = key_positions(q_pos, mask, 8)
    assert k_pos[0, 2:7].tolist() == [0, 1, 2, 3, 4] and k_pos[1, :7].tolist() == list(range(7))
    assert torch.equal(key_positions(q_pos, None, 2), q_pos)
    with pytest.raises(ValueError, match="no mask but 2 queries for 5 keys"):
        key_positions(q_pos, None, 5)


def test_bfloat16_model_rotates_with_float32_angles():
    model = patch(tiny("llama").to(torch.bfloat16), "yarn:factor=2")
    position_ids = torch.arange(T)[None]
    cos, sin = rotary(model)(torch.zeros(1, dtype=torch.bfloat16), position_ids)
    from ropekit.rope import RopeConfig, rope_cos_sin

    rope = RopeConfig.from_hf(model.config).with_rope_type("yarn:factor=2")
    inv_freq, factor = rope.frequencies()
    want_cos, _ = rope_cos_sin(inv_freq, position_ids, factor)
    assert cos.dtype == torch.bfloat16
    assert torch.equal(cos, torch.cat([want_cos, want_cos], -1).to(torch.bfloat16))
    patch(model, "self-extend:group=2,window=8")
    with torch.no_grad():
        out = model.generate(ids(length=40), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 44)


@pytest.mark.parametrize(("make", "spec", "message"), [
    (lambda: tiny("mistral", sliding_window=16), "self-extend:group=2,window=4",
     "mistral: every layer attends within a sliding window"),
    (lambda: tiny("llama"), "bogus", "unknown name 'bogus'"),
    (lambda: tiny("llama"), "yarn:factor=0.5", r"'factor'=0.5 is out of range"),
    (lambda: tiny("llama"), "longrope:short_factor=[1,1],long_factor=[1,1]", "'short_factor' must have length 8"),
    (lambda: torch.nn.Linear(2, 2), "yarn:factor=2", "takes a transformers PreTrainedModel"),
])
def test_unsupported_cases_raise_a_value_error_naming_them(make, spec, message):
    with pytest.raises(ValueError, match=message):
        patch(make(), spec)


@pytest.mark.parametrize("model_type", ["gemma3_text", "persimmon"])
def test_refused_architectures_name_the_reason(model_type):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = AutoConfig.for_model(model_type, **{k: v for k, v in COMMON.items() if k != "head_dim"})
        model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match=f"{model_type}: not supported by ropekit.hf.patch"):
        patch(model, "yarn:factor=2")


def test_an_unknown_architecture_lists_the_supported_ones():
    model = tiny("llama")
    model.config.model_type = "brand_new"
    with pytest.raises(ValueError, match="brand_new: not supported by ropekit.hf.patch; supported: apertus"):
        patch(model, "yarn:factor=2")


def test_patching_twice_replaces_the_patch():
    model = tiny("llama")
    x = ids()
    patch(model, "self-extend:group=2,window=4")
    first = logits(model, x)
    patch(model, "yarn:factor=2")
    assert model.config._attn_implementation != "ropekit"
    patch(model, "self-extend:group=2,window=4")
    assert torch.equal(logits(model, x), first)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU test: needs CUDA")
@pytest.mark.parametrize("spec", ["yarn:factor=2", "self-extend:group=3,window=6", "dynamic:factor=2+consistent"])
def test_patched_model_on_cuda_equals_cpu(spec):
    model = patch(tiny("llama"), spec)
    x = ids(batch=2)
    cpu = logits(model, x)
    gpu = logits(model.to("cuda"), x.cuda()).cpu()
    torch.testing.assert_close(gpu, cpu, atol=1e-4, rtol=1e-4)


# ---- SmolLM2 in transformers vs ropekit's engine on the same GGUF --------------------------------


@pytest.fixture(scope="module")
def hf_smollm2_model(smollm2_path):
    from ropekit.eval.runners import load_transformers

    return load_transformers(smollm2_path, dtype=torch.float32, device=torch.device("cpu"))


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["self-extend:group=4,window=64", "rerope:window=64",
                                  "leaky-rerope:window=64,k=4", "yarn:factor=2+self-extend:group=8,window=128"])
def test_smollm2_in_transformers_equals_the_engine(smollm2, hf_smollm2_model, spec):
    """300 tokens of Pride and Prejudice with windows of 64-128: most pairs are in the far regime."""
    from conftest import eval_text, float32_logits_atol

    from ropekit import model as engine

    model, tokenizer = smollm2
    x = torch.tensor([tokenizer.encode(eval_text()[:4000])[:300]])
    base = model.config.rope
    try:
        engine.patch(model, spec, base)
        with torch.no_grad():
            ours = model(x)
        patch(hf_smollm2_model, spec)
        theirs = logits(hf_smollm2_model, x)
        unpatch(hf_smollm2_model)
        # engine vs transformers over 30 float32 layers: the rounding bound of tests/loading/test_gguf_file.py
        cfg = model.config
        atol = float32_logits_atol(theirs, cfg.num_hidden_layers, cfg.intermediate_size)
        torch.testing.assert_close(ours, theirs, atol=atol, rtol=0)
        prompt = x[:, :200]
        patch(hf_smollm2_model, spec)
        with torch.no_grad():
            hf_tokens = hf_smollm2_model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12,
                                                  do_sample=False, pad_token_id=0)[0, 200:].tolist()
        from ropekit.model.generate import generate_ids

        engine_tokens = [int(t[0]) for t in generate_ids(model, [prompt[0].tolist()], max_new_tokens=12)]
        assert hf_tokens == engine_tokens
    finally:
        engine.patch(model, "none", base)
        model.set_rope(base)
        unpatch(hf_smollm2_model)
