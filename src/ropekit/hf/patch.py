"""``patch(model, method)`` / ``unpatch(model)``: ropekit's methods inside a transformers causal LM, in place.

Two seams transformers itself provides, nothing copied from its modeling code:

- **Rope types** replace the forward of the model's one rotary module (an instance attribute
  shadowing the class's, removed again by ``unpatch``): ropekit computes the frequencies with the
  model's geometry (head dim, partial rotary, base, trained length) and the cos/sin tables from
  float64 angles; the model applies them with its own ``apply_rotary_pos_emb``, keeps using its
  own attention kernel (SDPA, flash, ...) and caches rotated keys as usual.
- **Attention variants** (Self-Extend, ReRoPE, Leaky ReRoPE, Dual Chunk Attention, cache-consistent
  dynamic scaling)
  make the rotary module return the identity rotation (cos 1, sin 0: the model's apply becomes an
  exact no-op, so its cache holds *unrotated* keys) and switch the model to the attention
  implementation ``"ropekit"`` registered in ``AttentionInterface`` (with a mask function in
  ``AttentionMaskInterface``). That function reads each query's position from ``position_ids``
  and each cached key's position from the mask (a row's keys are consecutive slots ending at
  its last query), rotates q and every key on use (float32, rounded once) and calls the
  variant's ``attend`` from ``ropekit.attention``, the same code ropekit's own engine runs.
  Layers without RoPE stay unrotated; sliding-window layers keep plain RoPE inside their window.
  A variant's settings the model's config declares are honoured for the keys the method leaves out
  (``dca`` reads ``dual_chunk_attention_config``: ``chunk_size``, ``local_size``,
  ``original_max_position_embeddings``, as Qwen2.5-1M configs declare them).

A cache filled while a model is patched with an attention variant holds unrotated keys: do not
reuse it after ``unpatch`` (or the other way round).
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Any

import torch

from ropekit.attention import AttentionVariant, ConsistentDynamic, sdpa
from ropekit.hf.architectures import ARCHITECTURES, REFUSED, Architecture
from ropekit.method import Method, parse_method
from ropekit.rope import RopeConfig, RotaryEmbedding

IMPLEMENTATION = "ropekit"  # the name registered with transformers' attention and mask registries
_STATE = "_ropekit_patch"  # attribute holding the patch on the model
_LAYER = "_ropekit_layer"  # attribute holding a layer's plan on each attention module


def supported() -> list[str]:
    """The transformers ``model_type`` values ``patch`` accepts."""
    return sorted(ARCHITECTURES)


@dataclass
class _Layer:
    """How one attention module runs under the patch: its variant (None: no RoPE on this layer)."""

    variant: AttentionVariant | None
    kind: str  # "full", "sliding" or "nope": the key of the per-forward table cache


@dataclass
class _Patch:
    """Everything ``unpatch`` restores and the attention function reads."""

    model_type: str
    method: Method
    architecture: Architecture
    rotary: torch.nn.Module
    base_rope: RopeConfig
    rope: RotaryEmbedding
    attention_implementation: str | None  # the model's implementation before (None: attention untouched)
    modules: list[torch.nn.Module] = field(default_factory=list)
    tables: dict[str, tuple[tuple, Any]] = field(default_factory=dict)


def _model_type(model) -> str:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise ValueError(f"ropekit.hf.patch takes a transformers PreTrainedModel, got {type(model).__name__}")
    return model_type


def _rotary(model, model_type: str) -> torch.nn.Module:
    base = getattr(model, getattr(model, "base_model_prefix", "model"), model)
    rotary = getattr(base, "rotary_emb", None)
    if rotary is None or not hasattr(rotary, "inv_freq"):
        raise ValueError(f"{model_type}: no model-level rotary_emb with an inv_freq buffer was found, so its rotary "
                         "layout is unknown to ropekit.hf.patch")
    return rotary


def _attention_modules(model) -> list[torch.nn.Module]:
    return [m for m in model.modules() if type(m).__name__.endswith("Attention") and hasattr(m, "layer_idx")]


def _is_sliding(config, module) -> bool:
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return layer_types[module.layer_idx] == "sliding_attention"
    if hasattr(module, "sliding_window"):
        return module.sliding_window is not None
    return getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True)


def _base_rope(model, model_type: str) -> RopeConfig:
    """The model's own rope as a ``RopeConfig`` (geometry from its config), checked against its rotary module."""
    config = model.config
    rope_parameters = getattr(config, "rope_parameters", None) or {}
    if rope_parameters and all(isinstance(v, dict) for v in rope_parameters.values()):
        raise ValueError(f"{model_type}: a rope per layer type ({sorted(rope_parameters)}) is not supported")
    try:
        rope = RopeConfig.from_hf(config)
    except ValueError as err:
        raise ValueError(f"{model_type}: its rope config cannot be read: {err}") from None
    return rope


def patch(model, method: str | Method):
    """Make ``model`` (a transformers causal LM) run ``method`` in ``model(...)`` and ``model.generate(...)``.

    method: a method as on ropekit's command line (``"yarn:factor=2"``,
    ``"dynamic:factor=2+consistent"``, ``"self-extend:group=4,window=1024"``,
    ``"yarn:factor=2+self-extend:group=8,window=2048"``, ...); a method without a rope part keeps the
    model's own rope. Patching a patched model replaces its patch. Returns ``model``. Raises a
    ``ValueError`` naming the model type for anything the patch cannot honour.
    """
    method = parse_method(method)
    if getattr(model, _STATE, None) is not None:
        unpatch(model)
    model_type = _model_type(model)
    if model_type in REFUSED:
        raise ValueError(f"{model_type}: not supported by ropekit.hf.patch: {REFUSED[model_type]}")
    if model_type not in ARCHITECTURES:
        raise ValueError(f"{model_type}: not supported by ropekit.hf.patch; supported: {', '.join(supported())}")
    architecture = ARCHITECTURES[model_type]
    rotary = _rotary(model, model_type)
    base = _base_rope(model, model_type)
    if 2 * rotary.inv_freq.shape[-1] != base.rotary_dim:
        raise ValueError(f"{model_type}: its rotary module rotates {2 * rotary.inv_freq.shape[-1]} channels, its "
                         f"config says {base.rotary_dim}: unknown rotary layout")
    rope_config = method.rope_config(base)
    if rope_config.rotary_dim != base.rotary_dim:
        raise ValueError(f"{model_type}: rope type {rope_config.rope_type!r} rotates {rope_config.rotary_dim} "
                         f"channels, the model {base.rotary_dim}")
    state = _Patch(model_type=model_type, method=method, architecture=architecture, rotary=rotary, base_rope=base,
                   rope=RotaryEmbedding(rope_config, device=rotary.inv_freq.device), attention_implementation=None)
    variant = method.variant()
    if variant is not None:
        variant = variant.with_model_config(model.config)  # e.g. DCA's dual_chunk_attention_config
    if variant is None:
        rotary.forward = types.MethodType(_rope_type_forward, rotary)
        rotary._ropekit = state
    else:
        layers = _plan_layers(model, model_type, architecture, variant)
        _register()
        state.attention_implementation = model.config._attn_implementation
        for module, layer in layers:
            setattr(module, _LAYER, (state, layer))
            state.modules.append(module)
        rotary.forward = types.MethodType(_identity_forward, rotary)
        rotary._ropekit = state
        model.set_attn_implementation(IMPLEMENTATION)
    setattr(model, _STATE, state)
    return model


def _plan_layers(model, model_type: str, architecture: Architecture, variant: AttentionVariant):
    modules = _attention_modules(model)
    if not modules:
        raise ValueError(f"{model_type}: no attention modules with a layer_idx were found")
    plan, extended = [], 0
    for module in modules:
        if not architecture.uses_rope(module):
            plan.append((module, _Layer(None, "nope")))
        elif _is_sliding(model.config, module):
            plan.append((module, _Layer(ConsistentDynamic(), "sliding")))  # plain RoPE within the window
        else:
            plan.append((module, _Layer(variant, "full")))
            extended += 1
    if not extended:
        window = getattr(model.config, "sliding_window", None)
        raise ValueError(f"{model_type}: every layer attends within a sliding window ({window} tokens, "
                         "config.sliding_window): an attention variant has no distance past it to remap "
                         "(set config.sliding_window=None for full attention)")
    return plan


def unpatch(model):
    """Undo ``patch``: the model's own rotary forward and attention implementation are back; logits equal
    the unpatched model's bit for bit. Returns ``model``."""
    state = getattr(model, _STATE, None)
    if state is None:
        return model
    if "forward" in vars(state.rotary):
        del state.rotary.forward
    if hasattr(state.rotary, "_ropekit"):
        del state.rotary._ropekit
    for module in state.modules:
        if hasattr(module, _LAYER):
            delattr(module, _LAYER)
    if state.attention_implementation is not None:
        model.set_attn_implementation(state.attention_implementation)
    delattr(model, _STATE)
    return model


def patched_method(model) -> Method | None:
    """The method a model is patched with, or None."""
    state = getattr(model, _STATE, None)
    return None if state is None else state.method


# ---- the rotary module's forward under the patch -----------------------------------------------


def _hf_table(table: torch.Tensor, architecture: Architecture) -> torch.Tensor:
    """ropekit's half table ``[..., R/2]`` -> the rotary module's ``[..., R]`` layout."""
    if architecture.table == "interleaved":
        return table.repeat_interleave(2, dim=-1)
    return torch.cat([table, table], dim=-1)


def _rope_type_forward(self, x: torch.Tensor, position_ids: torch.Tensor, layer_type: str | None = None):
    """cos/sin ``[B, T, R]`` in x's dtype from ropekit's frequencies (float64 angles, reduced mod 2 pi).

    transformers hands the rotary module no host-side bound on ``position_ids``, so the rows are computed
    for these positions directly rather than gathered from a table: no host synchronisation for a
    fixed-length rope type, one (the largest position, read as the current length) for a length-dependent one.
    """
    state: _Patch = self._ropekit
    positions = position_ids.to(device=x.device, dtype=torch.long)
    cos, sin = _rope_on(state, x.device)(positions)
    return _hf_table(cos, state.architecture).to(x.dtype), _hf_table(sin, state.architecture).to(x.dtype)


def _rope_on(state: _Patch, device: torch.device) -> RotaryEmbedding:
    """The patch's ``RotaryEmbedding`` with its frequencies on ``device`` (moved once, where the model runs:
    a copy from the host on every forward would synchronise)."""
    if state.rope.inv_freq.device != device:
        state.rope.to(device)
    return state.rope


def _identity_forward(self, x: torch.Tensor, position_ids: torch.Tensor, layer_type: str | None = None):
    """cos 1 and sin 0: the model's own apply becomes an exact no-op and its cache keeps unrotated keys."""
    shape = (*position_ids.shape, 2 * self.inv_freq.shape[-1])
    one = torch.ones(shape, dtype=x.dtype, device=x.device)
    return one, torch.zeros_like(one)


# ---- the attention implementation "ropekit" ----------------------------------------------------


def key_positions(q_pos: torch.Tensor, mask: torch.Tensor | None, num_keys: int) -> torch.Tensor:
    """``[B, S]`` positions of the keys the layer attends to.

    A row's keys are consecutive slots ending at the row's last query (transformers' caches append
    in order; a static cache's unfilled slots and left padding are masked), so key j sits at
    ``q_pos[b, -1] - (last[b] - j)`` where ``last[b]`` is the last slot the row's last query may see.
    Without a mask the layer runs a plain causal prefill: the keys are the queries.
    """
    if mask is None:
        if q_pos.shape[1] != num_keys:
            raise ValueError(f"ropekit attention: no mask but {q_pos.shape[1]} queries for {num_keys} keys")
        return q_pos
    slots = torch.arange(num_keys, device=q_pos.device)
    last = torch.where(mask[:, 0, -1, :], slots, -1).amax(dim=-1)  # [B]
    return q_pos[:, -1:] - (last[:, None] - slots[None, :])  # [B, S]


def is_causal_by_slot(mask: torch.Tensor) -> bool:
    """Whether ``mask`` ``[B, 1, T, S]`` (bool) is plain causality by slot (query t sees slots ``<= S - T + t``,
    no padding): then passing None instead says the same. Compared in blocks of queries."""
    B, _, T, S = mask.shape
    slots = torch.arange(S, device=mask.device)
    for a in range(0, T, 1024):
        b = min(a + 1024, T)
        causal = slots[None, :] <= (S - T + torch.arange(a, b, device=mask.device))[:, None]
        if not torch.equal(mask[:, 0, a:b], causal.expand(B, -1, -1)):
            return False
    return True


def _mask(**kwargs):
    """The mask for the "ropekit" implementation: None for a plain causal prefill without padding (the
    variants' fast prefill path), else transformers' SDPA mask, always materialised (4D bool)."""
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    padding = kwargs.get("attention_mask")
    q_offset = kwargs.get("q_offset", 0)
    plain = (kwargs.get("allow_is_causal_skip", True) and kwargs.get("mask_function") is causal_mask_function
             and kwargs.get("local_size") is None and kwargs["q_length"] == kwargs["kv_length"]
             and isinstance(q_offset, int) and q_offset == 0 and (padding is None or bool(padding.all())))
    if plain:
        return None
    return sdpa_mask(**{**kwargs, "allow_is_causal_skip": False})


def _attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
               softcap: float | None = None, **kwargs):
    """transformers' attention-interface contract: q ``[B, H, T, D]``, k/v ``[B, Hkv, S, D]`` (here
    unrotated) -> ``(out [B, T, H, D], None)``."""
    entry = getattr(module, _LAYER, None)
    if entry is None:
        raise ValueError(f"{type(module).__name__}: the 'ropekit' attention runs only on models patched by "
                         "ropekit.hf.patch (and patched models cannot be copied)")
    state, layer = entry
    if dropout:
        raise ValueError(f"{state.model_type}: ropekit attention variants are for inference; call model.eval()")
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        raise ValueError(f"{state.model_type}: its attention receives no position_ids, which ropekit attention "
                         "variants need")
    B, S = query.shape[0], key.shape[2]
    mask = attention_mask
    if mask is not None and mask.dtype != torch.bool:
        mask = mask == 0  # an additive float mask: 0 where attention is allowed
    q_pos = position_ids.to(query.device).long().expand(B, -1)  # [B, T]
    if layer.variant is None:  # a layer without RoPE
        out = sdpa(query, key, value, mask, scaling, softcap)
    else:
        tables, causal = _tables(state, layer, position_ids, attention_mask, q_pos, mask, S)
        out = layer.variant.attend(query, key, value, tables, None if causal else mask, scale=scaling, softcap=softcap,
                                   layout=state.architecture.layout)
    return out.transpose(1, 2).contiguous(), None


def _tables(state: _Patch, layer: _Layer, position_ids, attention_mask, q_pos, mask, num_keys: int):
    """The variant's tables, computed once per forward and layer kind: every layer of a forward gets the
    same ``position_ids`` and mask objects (held in the key, so they cannot be freed and reused)."""
    key = (position_ids, attention_mask, (num_keys, q_pos.device, id(layer.variant)))
    cached = state.tables.get(layer.kind)
    if cached is not None and cached[0][0] is key[0] and cached[0][1] is key[1] and cached[0][2] == key[2]:
        return cached[1]
    tables = layer.variant.tables(_rope_on(state, q_pos.device), q_pos, key_positions(q_pos, mask, num_keys))
    causal = mask is None or is_causal_by_slot(mask)  # then the variant's fused path may run
    state.tables[layer.kind] = (key, (tables, causal))
    return tables, causal


_registered = False


def _register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(IMPLEMENTATION, _attention)
    AttentionMaskInterface.register(IMPLEMENTATION, _mask)
    _registered = True
