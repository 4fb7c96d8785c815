"""Decode-time ops: one-row matrix-vector products and one-token attention, C++ and pure torch.

Decoding one token on a CPU reads every weight once: it is bound by memory bandwidth, and
``F.linear`` on one row is far from that bound. The model's layers call these four ops on
every forward; the dispatch point (``ropekit.dispatch``) runs the C++ kernels of
``csrc/gemv_cpu.cpp`` when the input is one float32 row on the CPU (a decode step) and the
pure-torch twin otherwise (prefill, batches, CUDA, or no compiler). Both have one contract:

- ``norm_linear(x, weights, norm_weight=None, eps=1e-5, biases=None) -> list``: for each
  ``W_i`` ``[N_i, C]``, ``W_i @ x' (+ b_i)`` of shape ``[..., N_i]``, where ``x' = RMSNorm(x) *
  norm_weight`` when a norm weight is given (the model's RMSNorm: normalised in float32,
  rounded to x's dtype, times the weight), else ``x``. The C++ path returns views of one buffer.
- ``norm_swiglu(x, w_gate, w_up, norm_weight=None, eps=1e-5)``: ``silu(W_gate x') * (W_up x')``.
- ``linear_residual(x, weight, residual, bias=None)``: ``residual + W x (+ b)``.
- ``decode_attention(q, k, v, k_cache, v_cache, slot, scale)``: q ``[H*D]``, k/v ``[Hkv*D]`` (q and
  k rotated) are one token's; k and v are written into slot ``slot`` (an int, or a 0-dim int64
  tensor read when the kernel runs) of the layer's caches ``[Hkv, S_max, D]``, then each query
  head attends to slots ``0..slot`` (grouped-query heads). Returns ``[H*D]``.

The C++ kernels take float32 or bfloat16 weights (widened exactly, multiplied in float32) and
float32 activations; caches may be float32 or bfloat16. They run on their own thread pool
(``torch.get_num_threads()`` threads; the caller never waits for a helper the OS has not
scheduled): robust on a shared machine. ``python -m ropekit.kernels.decode`` builds them ahead
of time; ``ROPEKIT_GEMV_BACKEND=torch`` forces the twins.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F

from ropekit.dispatch import define_op
from ropekit.kernels.build import JitExtension

SOURCE = Path(__file__).parent / "csrc" / "gemv_cpu.cpp"
ENV_VAR = "ROPEKIT_GEMV_BACKEND"
WEIGHT_DTYPES = (torch.float32, torch.bfloat16)

GEMV_EXTENSION = JitExtension("ropekit_gemv_cpu", SOURCE, "C++ GEMV kernels")

NORM_LINEAR = define_op("norm_linear", ENV_VAR, "(x, weights, norm_weight=None, eps=1e-5, biases=None) -> list")
NORM_SWIGLU = define_op("norm_swiglu", ENV_VAR, "(x, w_gate, w_up, norm_weight=None, eps=1e-5) -> Tensor")
LINEAR_RESIDUAL = define_op("linear_residual", ENV_VAR, "(x, weight, residual, bias=None) -> Tensor")
DECODE_ATTENTION = define_op("decode_attention", ENV_VAR, "(q, k, v, k_cache, v_cache, slot, scale) -> Tensor")


def extension() -> ModuleType | None:
    """The C++ module, or None (with one warning) when it cannot be built here."""
    return GEMV_EXTENSION.get()


# ---- the pure-torch twins (the reference the C++ kernels are tested against) ----------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The model's RMSNorm: ``weight * (x * rsqrt(mean(x^2) + eps))`` normalised in float32, rounded to x's dtype."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _as(w: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """``w`` in x's dtype (weights of another dtype are widened or rounded: slow, but exact and simple)."""
    return w if w is None or w.dtype == x.dtype else w.to(x.dtype)


def _normed(x: torch.Tensor, norm_weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    return x if norm_weight is None else rms_norm(x, _as(norm_weight, x), eps)


def norm_linear_torch(x, weights, norm_weight=None, eps=1e-5, biases=None):
    xn = _normed(x, norm_weight, eps)
    biases = biases or [None] * len(weights)
    return [F.linear(xn, _as(w, xn), _as(b, xn)) for w, b in zip(weights, biases, strict=True)]


def norm_swiglu_torch(x, w_gate, w_up, norm_weight=None, eps=1e-5):
    xn = _normed(x, norm_weight, eps)
    return F.silu(F.linear(xn, _as(w_gate, xn))) * F.linear(xn, _as(w_up, xn))


def linear_residual_torch(x, weight, residual, bias=None):
    return residual + F.linear(x, _as(weight, x), _as(bias, x)).to(residual.dtype)


def decode_attention_torch(q, k, v, k_cache, v_cache, slot, scale):
    Hkv, S_max, D = k_cache.shape
    slot = int(slot)
    if not 0 <= slot < S_max:
        raise ValueError(f"decode_attention: slot {slot} outside the cache of {S_max} slots")
    k_cache[:, slot] = k.view(Hkv, D)
    v_cache[:, slot] = v.view(Hkv, D)
    # One query per head: the G = H / Hkv query heads of a kv head act as G "tokens" that all
    # see every key, so SDPA needs no mask and no repeated keys.
    H = q.numel() // D
    grouped = q.reshape(1, Hkv, H // Hkv, D)  # [1, Hkv, G, D]
    keys, values = k_cache[None, :, : slot + 1], v_cache[None, :, : slot + 1]  # [1, Hkv, S, D]
    if keys.dtype != q.dtype:
        keys, values = keys.to(q.dtype), values.to(q.dtype)
    return F.scaled_dot_product_attention(grouped, keys, values, scale=scale).reshape(H * D)


# ---- the C++ backends -----------------------------------------------------------------


def _one_cpu_row(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype == torch.float32 and x.numel() == x.shape[-1] and x.is_contiguous()


def _cpp_weight(w: torch.Tensor) -> bool:
    return w.device.type == "cpu" and w.dim() == 2 and w.dtype in WEIGHT_DTYPES and w.is_contiguous()


def _float_vector(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().reshape(-1).to(torch.float32).contiguous()


def _supports_norm_linear(x, weights, norm_weight=None, eps=1e-5, biases=None) -> bool:
    return _one_cpu_row(x) and all(_cpp_weight(w) for w in weights) and extension() is not None


def _supports_norm_swiglu(x, w_gate, w_up, norm_weight=None, eps=1e-5) -> bool:
    return _one_cpu_row(x) and _cpp_weight(w_gate) and _cpp_weight(w_up) and extension() is not None


def _supports_linear_residual(x, weight, residual, bias=None) -> bool:
    return (_one_cpu_row(x) and _cpp_weight(weight) and residual.dtype == torch.float32
            and residual.numel() == weight.shape[0] and extension() is not None)


def _supports_decode_attention(q, k, v, k_cache, v_cache, slot, scale) -> bool:
    return (_one_cpu_row(q) and k.is_contiguous() and v.is_contiguous() and k.dtype == v.dtype == torch.float32
            and k_cache.device.type == "cpu" and k_cache.dtype in WEIGHT_DTYPES and k_cache.is_contiguous()
            and v_cache.is_contiguous() and extension() is not None)


# Each C++ backend is a planner: ``(result, run)``, the output buffers and the call that fills them from
# the inputs' current values (what ``ropekit.model.decode_graph`` replays); the eager backend plans and runs.


def plan_norm_linear(x, weights, norm_weight=None, eps=1e-5, biases=None):
    sizes = [w.shape[0] for w in weights]
    y = torch.empty(sum(sizes), dtype=torch.float32)
    outs = [part.view(*x.shape[:-1], n) for part, n in zip(y.split(sizes), sizes, strict=True)]
    ext, ws, xv, nw, eps = extension(), list(weights), x.view(-1), _float_vector(norm_weight), float(eps)
    added = [(out, b.detach().to(torch.float32)) for out, b in zip(outs, biases or (), strict=False) if b is not None]

    def run() -> None:
        ext.gemv(ws, xv, y, False, nw, eps)
        for out, b in added:
            out.add_(b)

    return outs, run


def plan_norm_swiglu(x, w_gate, w_up, norm_weight=None, eps=1e-5):
    y = torch.empty(w_gate.shape[0], dtype=torch.float32)
    ext, xv, nw, eps = extension(), x.view(-1), _float_vector(norm_weight), float(eps)

    def run() -> None:
        ext.gemv_swiglu(w_gate, w_up, xv, y, nw, eps)

    return y.view(*x.shape[:-1], -1), run


def plan_linear_residual(x, weight, residual, bias=None):
    y = torch.empty(residual.numel(), dtype=torch.float32)
    ext, xv, rv, ws = extension(), x.view(-1), residual.reshape(-1), [weight]
    b = None if bias is None else bias.detach().to(torch.float32)

    def run() -> None:
        ext.gemv(ws, xv, y, False, None, 1e-5, rv)
        if b is not None:
            y.add_(b)

    return y.view(residual.shape), run


def plan_decode_attention(q, k, v, k_cache, v_cache, slot, scale):
    out = torch.empty(q.numel(), dtype=torch.float32)
    slot = slot if isinstance(slot, torch.Tensor) else torch.tensor(int(slot))
    ext, qv, kv, vv, scale = extension(), q.view(-1), k.reshape(-1), v.reshape(-1), float(scale)

    def run() -> None:
        ext.decode_attention(qv, kv, vv, k_cache, v_cache, slot, out, scale)

    return out, run


def _eager(plan):
    def backend(*args, **kwargs):
        result, run = plan(*args, **kwargs)
        run()
        return result

    backend.__name__ = plan.__name__.replace("plan_", "") + "_cpp"
    return backend


for _op, _torch_fn, _plan, _supports in (
        (NORM_LINEAR, norm_linear_torch, plan_norm_linear, _supports_norm_linear),
        (NORM_SWIGLU, norm_swiglu_torch, plan_norm_swiglu, _supports_norm_swiglu),
        (LINEAR_RESIDUAL, linear_residual_torch, plan_linear_residual, _supports_linear_residual),
        (DECODE_ATTENTION, decode_attention_torch, plan_decode_attention, _supports_decode_attention)):
    _op.register("torch", _torch_fn, priority=0)
    _op.register("cpp", _eager(_plan), supports=_supports, priority=10, plan=_plan)

norm_linear, norm_swiglu, linear_residual = NORM_LINEAR, NORM_SWIGLU, LINEAR_RESIDUAL
decode_attention = DECODE_ATTENTION
DECODE_OPS = tuple(op.name for op in (NORM_LINEAR, NORM_SWIGLU, LINEAR_RESIDUAL, DECODE_ATTENTION))


def fused_decode_available(weight: torch.Tensor) -> bool:
    """Whether a model with this weight runs its decode steps through the C++ kernels here."""
    forced = NORM_LINEAR.forced or os.environ.get(ENV_VAR) or None
    return (weight.device.type == "cpu" and weight.dtype in WEIGHT_DTYPES and forced != "torch"
            and extension() is not None)


def decode_path(weight: torch.Tensor) -> str:
    """One line naming the kernels a decode step of a model with this weight runs here."""
    if fused_decode_available(weight):
        return (f"fused C++ decode kernels ({extension().kernel_isa()}, {str(weight.dtype).removeprefix('torch.')} "
                f"weights, float32 activations, {torch.get_num_threads()} threads)")
    return f"torch ops ({weight.device.type}, {str(weight.dtype).removeprefix('torch.')})"


def main() -> None:
    """Build ahead of time and say where."""
    ext = GEMV_EXTENSION.build(verbose="-v" in sys.argv)
    print(f"ropekit C++ GEMV kernels ({ext.kernel_isa()}) ready in {GEMV_EXTENSION.cache_dir()}")


if __name__ == "__main__":
    main()
