"""Decode-time matrix-vector kernels: the C++ extension ``csrc/gemv_cpu.cpp`` and a torch fallback.

Built just in time the same way as the rotary kernel (``ropekit.kernels.build``: same flags,
same ``$ROPEKIT_CACHE`` root, one folder per source, torch, flags and CPU kind).
``python -m ropekit.kernels.gemv`` builds it ahead of time.

Every function here has a pure-torch twin with the same contract, so callers pick a backend
once (``backend()``) and never branch per call:

- ``gemv(weights, x, y, accumulate=False, norm_weight=None, eps=1e-5)``: ``y (+)= cat_i(W_i @ x')``
  with ``x' = rmsnorm(x) * norm_weight`` when a norm weight is given, else ``x``.
- ``gemv_swiglu(w_gate, w_up, x, y, norm_weight=None, eps=1e-5)``: ``y = silu(W_gate x') * (W_up x')``.
- ``decode_attention(qkv, k_cache, v_cache, pos, num_heads, out, scale)``: write the new k, v
  into slot ``pos``, then one query per head attends to slots ``0..pos`` (grouped-query).

Weights are float32 or bfloat16 ``[N, K]`` contiguous; vectors and caches are float32.
The C++ kernels use ``torch.get_num_threads()`` threads of their own pool (the caller never waits
for a helper the OS has not scheduled yet: robust on a shared machine); the extension's
``set_threading("openmp")`` switches them to ``at::parallel_for`` for comparison.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import torch
import torch.nn.functional as F

from ropekit.kernels.build import JitExtension

SOURCE = Path(__file__).parent / "csrc" / "gemv_cpu.cpp"
ENV_VAR = "ROPEKIT_GEMV_BACKEND"
BACKENDS = ("cpp", "torch")

GEMV_EXTENSION = JitExtension("ropekit_gemv_cpu", SOURCE, "C++ GEMV kernels")


def extension() -> ModuleType | None:
    """The C++ module, or None (with one warning) when it cannot be built here."""
    return GEMV_EXTENSION.get()


# ---- the pure-torch twins (the reference the C++ kernels are tested against) ----------------


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """As the model's RMSNorm in float32: ``weight * (x * rsqrt(mean(x^2) + eps))``."""
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _matvec(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``w @ x`` in float32 (bfloat16 weights widened first: slow, but exact and simple)."""
    return F.linear(x, w if w.dtype == torch.float32 else w.float())


def gemv_torch(weights: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor, accumulate: bool = False,
               norm_weight: torch.Tensor | None = None, eps: float = 1e-5) -> None:
    xn = x if norm_weight is None else _rms_norm(x, norm_weight, eps)
    result = torch.cat([_matvec(w, xn) for w in weights]) if len(weights) > 1 else _matvec(weights[0], xn)
    if accumulate:
        y.add_(result)
    else:
        y.copy_(result)


def gemv_swiglu_torch(w_gate: torch.Tensor, w_up: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                      norm_weight: torch.Tensor | None = None, eps: float = 1e-5) -> None:
    xn = x if norm_weight is None else _rms_norm(x, norm_weight, eps)
    y.copy_(F.silu(_matvec(w_gate, xn)) * _matvec(w_up, xn))


def decode_attention_torch(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: int,
                           num_heads: int, out: torch.Tensor, scale: float) -> None:
    Hkv, S_max, D = k_cache.shape
    H = num_heads
    if not 0 <= pos < S_max:
        raise ValueError(f"decode_attention: slot {pos} outside the cache of {S_max} slots")
    q, k, v = qkv.split([H * D, Hkv * D, Hkv * D])
    k_cache[:, pos] = k.view(Hkv, D)
    v_cache[:, pos] = v.view(Hkv, D)
    # One query per head: the G = H / Hkv query heads of a kv head act as G "tokens" that all
    # see every key, so SDPA needs no mask and no repeated keys.
    q = q.view(1, Hkv, H // Hkv, D)  # [1, Hkv, G, D]
    keys, values = k_cache[None, :, : pos + 1], v_cache[None, :, : pos + 1]  # [1, Hkv, S, D]
    att = F.scaled_dot_product_attention(q, keys, values, scale=scale)  # [1, Hkv, G, D]
    out.copy_(att.reshape(H * D))


TORCH_OPS = SimpleNamespace(name="torch", gemv=gemv_torch, gemv_swiglu=gemv_swiglu_torch,
                            decode_attention=decode_attention_torch)


def backend(name: str | None = None) -> SimpleNamespace:
    """The kernels to use: ``name`` ("cpp" or "torch"), else ``$ROPEKIT_GEMV_BACKEND``, else the C++
    extension when it builds here, else torch. Returns a namespace with ``name``, ``gemv``,
    ``gemv_swiglu`` and ``decode_attention``.
    """
    wanted = name or os.environ.get(ENV_VAR) or None
    if wanted is not None and wanted not in BACKENDS:
        raise ValueError(f"unknown GEMV backend {wanted!r} (from {'argument' if name else ENV_VAR}); "
                         f"known: {list(BACKENDS)}")
    if wanted == "torch":
        return TORCH_OPS
    ext = extension()
    if ext is None:
        if wanted == "cpp":
            raise RuntimeError(f"the ropekit C++ GEMV kernels are not available: {GEMV_EXTENSION.error}")
        return TORCH_OPS
    return SimpleNamespace(name="cpp", gemv=ext.gemv, gemv_swiglu=ext.gemv_swiglu,
                           decode_attention=ext.decode_attention)


def main() -> None:
    """Build ahead of time and say where."""
    ext = GEMV_EXTENSION.build(verbose="-v" in sys.argv)
    print(f"ropekit C++ GEMV kernels ({ext.kernel_isa()}) ready in {GEMV_EXTENSION.cache_dir()}")


if __name__ == "__main__":
    main()
