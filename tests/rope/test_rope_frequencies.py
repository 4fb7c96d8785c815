"""Frequencies of every rope type against transformers' own functions, over many random configs."""

from __future__ import annotations

import math
import random

import pytest
import torch
from rope_reference import transformers_inv_freq

import ropekit
from ropekit.rope.frequencies import ntk_base

HEAD_DIMS = [32, 48, 64, 80, 96, 128, 256]
BASES = [10000.0, 100000.0, 500000.0, 1000000.0]


def random_config(rng: random.Random, rope_type: str) -> dict:
    """One random HF config dict for ``rope_type``."""
    head_dim = rng.choice(HEAD_DIMS)
    original = rng.choice([2048, 4096, 8192])
    factor = rng.choice([1.0, 1.5, 2.0, 4.0, 8.0, 16.0, 32.0])
    params: dict = {"rope_type": rope_type, "rope_theta": rng.choice(BASES)}
    max_len = original
    if rope_type in ("linear", "dynamic", "proportional"):
        params["factor"] = factor
    if rope_type == "proportional":
        params["partial_rotary_factor"] = rng.choice([0.25, 0.5, 0.75, 1.0])
    if rope_type == "yarn":
        max_len = int(original * factor)
        params.update(factor=factor, original_max_position_embeddings=original)
        if rng.random() < 0.3:
            params.update(beta_fast=rng.choice([16, 32, 64]), beta_slow=rng.choice([0.5, 1, 2]))
        if rng.random() < 0.3:
            params["truncate"] = False
        if rng.random() < 0.3:
            params.update(mscale=rng.choice([0.707, 1.0]), mscale_all_dim=rng.choice([0.707, 1.0]))
        if rng.random() < 0.2:
            params["attention_factor"] = rng.choice([0.9, 1.2])
    if rope_type == "longrope":
        pairs = head_dim // 2
        params.update(original_max_position_embeddings=original,
                      short_factor=[rng.uniform(1.0, 1.5) for _ in range(pairs)],
                      long_factor=[rng.uniform(1.0, 40.0) for _ in range(pairs)])
        max_len = int(original * factor)
        if rng.random() < 0.5:
            params["factor"] = factor
    if rope_type == "llama3":
        max_len = int(original * factor) + 1
        params.update(factor=factor, original_max_position_embeddings=original,
                      low_freq_factor=rng.choice([1.0, 2.0]), high_freq_factor=rng.choice([4.0, 8.0]))
    return {"head_dim": head_dim, "max_position_embeddings": max_len, "rope_parameters": params}


HF_TYPES = ["default", "linear", "dynamic", "yarn", "longrope", "llama3", "proportional"]
CASES = [(t, seed) for t in HF_TYPES for seed in range(12)]


@pytest.mark.parametrize(("rope_type", "seed"), CASES)
def test_matches_transformers(rope_type: str, seed: int):
    """Every HF rope type equals transformers' to 1e-6 relative (we compute in float64, round once)."""
    rng = random.Random(f"{rope_type}-{seed}")
    hf = random_config(rng, rope_type)
    max_len = hf["max_position_embeddings"]
    for seq_len in (None, max_len // 2, max_len, 3 * max_len):
        ours, ours_factor = ropekit.compute_inv_freq(hf, seq_len=seq_len)
        theirs, their_factor = transformers_inv_freq(hf, seq_len=seq_len)
        assert ours.dtype == torch.float32
        torch.testing.assert_close(ours, theirs.float(), rtol=1e-6, atol=0,
                                   msg=lambda m, n=seq_len: f"{hf} seq_len={n}: {m}")
        assert math.isclose(ours_factor, float(their_factor), rel_tol=1e-12), (ours_factor, their_factor)


def test_our_frequencies_are_closer_to_float64_truth_than_float32_pow():
    """We round float64 maths once; transformers' float32 pow is up to ~1e-6 off for large bases."""
    hf = {"head_dim": 128, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}
    truth = 1.0 / 1e6 ** (torch.arange(0, 128, 2, dtype=torch.float64) / 128)
    ours = ropekit.compute_inv_freq(hf)[0].double()
    theirs = transformers_inv_freq(hf)[0].double()
    assert ((ours - truth).abs() / truth).max() <= 2**-24  # one float32 rounding
    assert ((ours - truth).abs() / truth).max() <= ((theirs - truth).abs() / truth).max()


@pytest.mark.parametrize("seed", range(8))
def test_ntk_static_formula(seed: int):
    """Static NTK: base' = base * s^(d/(d-2)); the lowest pair is interpolated exactly like PI (YaRN Sec 3.1)."""
    rng = random.Random(seed)
    head_dim, base, factor = rng.choice(HEAD_DIMS), rng.choice(BASES), rng.choice([2.0, 4.0, 8.0])
    key = "alpha" if seed % 2 else "factor"
    hf = {"head_dim": head_dim, "rope_parameters": {"rope_type": "ntk", "rope_theta": base, key: factor}}
    ours = ropekit.compute_inv_freq(hf)[0].double()
    new_base = base * factor ** (head_dim / (head_dim - 2))
    expected = 1.0 / new_base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    torch.testing.assert_close(ours, expected, rtol=1e-7, atol=0)
    plain = ropekit.compute_inv_freq({"head_dim": head_dim, "rope_theta": base})[0].double()
    assert ours[0] == plain[0]  # the highest frequency is untouched
    torch.testing.assert_close(ours[-1], plain[-1] / factor, rtol=1e-6, atol=0)  # the lowest is PI's
    assert ntk_base(base, head_dim, factor) == pytest.approx(new_base)


@pytest.mark.parametrize("seq_len", [None, 100, 4096, 8192, 8193, 20000, 100000])
def test_dynamic_yarn_equals_yarn_at_current_scale(seq_len):
    """dynamic_yarn at length n is YaRN with factor max(1, n/L), computed independently by transformers."""
    original = 4096
    hf = {"head_dim": 64, "max_position_embeddings": original,
          "rope_parameters": {"rope_type": "dynamic_yarn", "rope_theta": 10000.0,
                              "original_max_position_embeddings": original}}
    ours, ours_factor = ropekit.compute_inv_freq(hf, seq_len=seq_len)
    scale = max(1.0, (seq_len or 0) / original)
    yarn = {"head_dim": 64, "max_position_embeddings": original,
            "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": scale,
                                "original_max_position_embeddings": original}}
    theirs, their_factor = transformers_inv_freq(yarn)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    assert ours_factor == pytest.approx(their_factor, rel=1e-12)


def test_yarn_ramp_endpoints():
    """YaRN keeps the highest-frequency pairs exactly and divides the lowest by s (Sec. 3.4)."""
    hf = {"head_dim": 64, "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                              "original_max_position_embeddings": 2048}}
    ours = ropekit.compute_inv_freq(hf)[0]
    plain = ropekit.compute_inv_freq({"head_dim": 64, "rope_theta": 10000.0})[0]
    assert torch.equal(ours[:4], plain[:4])
    torch.testing.assert_close(ours[-4:], plain[-4:] / 4, rtol=1e-6, atol=0)


def test_llama3_bands_match_meta_reference_loop():
    """Llama 3.1 scaling equals a per-frequency loop written like Meta's apply_scaling."""
    base, dim, factor, low, high, original = 500000.0, 128, 8.0, 1.0, 4.0, 8192
    hf = {"head_dim": dim, "max_position_embeddings": 131072,
          "rope_parameters": {"rope_type": "llama3", "rope_theta": base, "factor": factor,
                              "low_freq_factor": low, "high_freq_factor": high,
                              "original_max_position_embeddings": original}}
    ours = ropekit.compute_inv_freq(hf)[0]
    expected = []
    for i in range(0, dim, 2):
        theta = 1.0 / base ** (i / dim)
        wavelength = 2 * math.pi / theta
        if wavelength < original / high:
            expected.append(theta)
        elif wavelength > original / low:
            expected.append(theta / factor)
        else:
            t = (original / wavelength - low) / (high - low)
            expected.append((1 - t) * theta / factor + t * theta)
    torch.testing.assert_close(ours.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=0)
