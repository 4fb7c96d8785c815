"""Inverse frequencies for every rope type: small pure functions in float64.

Notation (see docs/rope-types.md): rotary dim ``d``, pair ``i = 0 .. d/2-1``, base ``b``,
``theta_i = b^(-2i/d)``, wavelength ``2*pi/theta_i``, trained length ``L``, scale ``s``.
Every function returns ``(inv_freq, attention_factor)`` with ``inv_freq`` a float64
tensor of shape ``(d/2,)``; the caller rounds it to float32 once.
"""

from __future__ import annotations

import math

import torch

from ropekit.rope.params import (
    DynamicParams,
    DynamicYarnParams,
    LinearParams,
    Llama3Params,
    LongRopeParams,
    NtkParams,
    ProportionalParams,
    YarnParams,
)

Frequencies = tuple[torch.Tensor, float]


def base_inv_freq(base: float, rotary_dim: int, exponent_dim: int | None = None) -> torch.Tensor:
    """theta_i = base^(-2i/exponent_dim) for i < rotary_dim/2. Shape ``(rotary_dim/2,)``, float64."""
    exponent_dim = exponent_dim or rotary_dim
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float64) / exponent_dim
    return 1.0 / base**exponents


def default_frequencies(base: float, rotary_dim: int) -> Frequencies:
    """Plain RoPE (RoFormer, Su et al. 2021, Eq. 15)."""
    return base_inv_freq(base, rotary_dim), 1.0


def linear_frequencies(base: float, rotary_dim: int, params: LinearParams) -> Frequencies:
    """Position interpolation (PI, arXiv 2306.15595, Eq. 4): m -> m/s, i.e. theta_i / s."""
    return base_inv_freq(base, rotary_dim) / params.factor, 1.0


def ntk_base(base: float, rotary_dim: int, scale: float) -> float:
    """NTK-aware base change (YaRN paper Sec. 3.1): b' = b * s^(d/(d-2))."""
    return base * scale ** (rotary_dim / (rotary_dim - 2))


def ntk_frequencies(base: float, rotary_dim: int, params: NtkParams) -> Frequencies:
    """Static NTK-aware scaling with a fixed scale."""
    return base_inv_freq(ntk_base(base, rotary_dim, params.factor), rotary_dim), 1.0


def dynamic_frequencies(base: float, rotary_dim: int, params: DynamicParams, original: int,
                        seq_len: int | None) -> Frequencies:
    """Dynamic NTK (transformers ``dynamic``): s_eff = factor*n/L - (factor-1) for n = max(seq_len, L)."""
    length = max(seq_len or original, original)
    scale = params.factor * length / original - (params.factor - 1)
    return base_inv_freq(ntk_base(base, rotary_dim, scale), rotary_dim), 1.0


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN attention temperature sqrt(1/t) = 0.1*mscale*ln(s) + 1 (YaRN Eq. 22); 1 for s <= 1."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_correction_dim(num_rotations: float, rotary_dim: int, base: float, original: int) -> float:
    """The pair index whose wavelength fits ``num_rotations`` turns in L (YaRN Eq. 17, inverted)."""
    return rotary_dim * math.log(original / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def yarn_ramp(low: float, high: float, pairs: int) -> torch.Tensor:
    """gamma: 0 below ``low``, 1 above ``high``, linear between. Shape ``(pairs,)``, float64."""
    if low == high:
        high += 0.001  # avoid dividing by zero, as the reference does
    return ((torch.arange(pairs, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)


def yarn_attention_factor(scale: float, params: YarnParams | DynamicYarnParams) -> float:
    """The YaRN mscale folded into cos/sin: explicit, or from mscale/mscale_all_dim, or 0.1 ln s + 1."""
    if params.attention_factor is not None:
        return params.attention_factor
    if params.mscale and params.mscale_all_dim:
        return yarn_mscale(scale, params.mscale) / yarn_mscale(scale, params.mscale_all_dim)
    return yarn_mscale(scale)


def yarn_inv_freq(base: float, rotary_dim: int, scale: float, params: YarnParams | DynamicYarnParams
                  ) -> torch.Tensor:
    """NTK-by-parts (YaRN Sec. 3.4): interpolate pairs below the ramp, keep pairs above it."""
    original = params.original_max_position_embeddings
    low = yarn_correction_dim(params.beta_fast, rotary_dim, base, original)
    high = yarn_correction_dim(params.beta_slow, rotary_dim, base, original)
    if params.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotary_dim - 1)
    keep = 1.0 - yarn_ramp(low, high, rotary_dim // 2)  # 1 = extrapolate (keep theta_i)
    theta = base_inv_freq(base, rotary_dim)
    return theta / scale * (1.0 - keep) + theta * keep


def yarn_frequencies(base: float, rotary_dim: int, params: YarnParams) -> Frequencies:
    """YaRN with a fixed scale factor."""
    return yarn_inv_freq(base, rotary_dim, params.factor, params), yarn_attention_factor(params.factor, params)


def dynamic_yarn_frequencies(base: float, rotary_dim: int, params: DynamicYarnParams,
                             seq_len: int | None) -> Frequencies:
    """Dynamic YaRN (YaRN Sec. 3.3 applied to Sec. 3.4): s = max(1, seq_len / L)."""
    scale = max(1.0, (seq_len or 0) / params.original_max_position_embeddings)
    return yarn_inv_freq(base, rotary_dim, scale, params), yarn_attention_factor(scale, params)


def longrope_frequencies(base: float, rotary_dim: int, params: LongRopeParams, max_length: int | None,
                         seq_len: int | None) -> Frequencies:
    """LongRoPE (arXiv 2402.13753): theta_i / ext_i, long factors once seq_len exceeds L."""
    original = params.original_max_position_embeddings
    use_long = seq_len is not None and seq_len > original
    ext = torch.tensor(params.long_factor if use_long else params.short_factor, dtype=torch.float64)
    factor = params.factor if params.factor is not None else (max_length or original) / original
    if params.attention_factor is not None:
        attention_factor = params.attention_factor
    elif factor <= 1.0:
        attention_factor = 1.0
    else:
        attention_factor = math.sqrt(1 + math.log(factor) / math.log(original))
    return base_inv_freq(base, rotary_dim) / ext, attention_factor


def llama3_frequencies(base: float, rotary_dim: int, params: Llama3Params) -> Frequencies:
    """Llama 3.1 bands: short wavelengths kept, long ones divided by factor, a smooth blend between."""
    theta = base_inv_freq(base, rotary_dim)
    original = params.original_max_position_embeddings
    # Classify bands on float32 wavelengths, as the reference does, so boundary pairs agree.
    wavelength = (2 * math.pi / theta.float()).double()
    blend = (original / wavelength - params.low_freq_factor) / (params.high_freq_factor - params.low_freq_factor)
    blended = (1 - blend) * theta / params.factor + blend * theta
    scaled = torch.where(wavelength > original / params.low_freq_factor, theta / params.factor, theta)
    is_medium = (wavelength >= original / params.high_freq_factor) & (wavelength <= original / params.low_freq_factor)
    return torch.where(is_medium, blended, scaled), 1.0


def proportional_frequencies(base: float, head_dim: int, partial_rotary_factor: float,
                             params: ProportionalParams) -> Frequencies:
    """Proportional RoPE: the first p*d/2 pairs use full-dim exponents, the rest are zero (unrotated)."""
    rotated_pairs = int(partial_rotary_factor * head_dim // 2)
    rotated = base_inv_freq(base, 2 * rotated_pairs, exponent_dim=head_dim)
    padding = torch.zeros(head_dim // 2 - rotated_pairs, dtype=torch.float64)
    return torch.cat([rotated, padding]) / params.factor, 1.0
