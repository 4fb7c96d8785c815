"""An method (rope part + attention part) in every runtime's settings, or why a runtime cannot run it.

The rope part goes through ``ropekit.rope.formats``. Of the attention variants only Self-Extend
has a runtime equivalent outside ropekit: llama.cpp's ``--grp-attn-n G --grp-attn-w W`` (in its
``llama-completion`` and ``llama-passkey`` programs; it shifts cached positions block by block
instead of merging two attentions, so long-range scores are close, not equal). ReRoPE, Leaky
ReRoPE, Dual Chunk Attention and cache-consistent dynamic scaling exist only in ropekit (its
engine and ``ropekit.hf.patch``): no runtime runs DCA (vLLM removed its dual-chunk attention
backend in v0.11, transformers ignores a config's ``dual_chunk_attention_config``, llama.cpp has
none), so every target refuses it.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from typing import Any

from ropekit.method import Method, parse_method
from ropekit.rope import RopeConfig
from ropekit.rope import formats as F
from ropekit.rope.formats import Inexpressible

TARGETS = ("hf", "hf-legacy", "gguf", "llama.cpp", "vllm")
ONLY_IN_ROPEKIT = "exists only in ropekit (its engine, and transformers models through ropekit.hf.patch)"
NO_DCA_RUNTIME = ("Dual Chunk Attention (dca) runs in no runtime: vLLM removed its DCA backend in v0.11, "
                  "transformers ignores dual_chunk_attention_config, llama.cpp has none; it " + ONLY_IN_ROPEKIT)


@dataclass(frozen=True)
class Translation:
    """One target's settings: ``value`` (a dict, or a list of flags) and ``text`` (what to print), with
    ``notes`` on how to use them."""

    target: str
    value: Any
    text: str
    notes: tuple[str, ...] = ()


def _attention_check(spec: Method, target: str) -> tuple[str, ...]:
    """Flags or nothing for the attention part; Inexpressible when the target has no equivalent."""
    if spec.attention is None:
        return ()
    if spec.attention == "consistent":
        raise Inexpressible(f"{target}: cache-consistent dynamic scaling {ONLY_IN_ROPEKIT}")
    if spec.attention == "dca":
        raise Inexpressible(f"{target}: {NO_DCA_RUNTIME}")
    if spec.attention == "self-extend" and target == "llama.cpp":
        p = spec.attention_params
        return ("--grp-attn-n", str(p.group), "--grp-attn-w", str(p.window))
    raise Inexpressible(f"{target}: the attention variant {spec.attention!r} {ONLY_IN_ROPEKIT}")


def translate(spec: str | Method, base: RopeConfig, target: str, arch: str = "llama") -> Translation:
    """``spec`` on a model whose own rope is ``base``, in ``target``'s settings (Inexpressible if impossible)."""
    spec = parse_method(spec)
    if target not in TARGETS:
        raise ValueError(f"--to must be one of {', '.join(TARGETS)} or all, got {target!r}")
    rope = spec.rope_config(base)
    attention = _attention_check(spec, target)
    if target == "hf":
        value = F.to_hf(rope)
        return Translation(target, value, json.dumps(value, indent=1))
    if target == "hf-legacy":
        value = F.to_hf_legacy(rope)
        return Translation(target, value, json.dumps(value, indent=1))
    if target == "gguf":
        value = F.to_gguf(rope, arch)
        shown = {k: (f"<tensor of {len(v)} float32>" if k.endswith(".weight") else v) for k, v in value.items()}
        notes = ("write it into a copy of the model with: ropekit convert --model FILE.gguf --method METHOD "
                 "--to gguf --out NEW.gguf",)
        return Translation(target, value, json.dumps(shown, indent=1), notes)
    if target == "llama.cpp":
        flags = F.to_llama_cpp(rope)
        if attention and "-c" in flags:  # Self-Extend's reach, (L - W) * G + W
            p, trained = spec.attention_params, rope.original_max_position_embeddings
            flags[flags.index("-c") + 1] = str(max(int(flags[flags.index("-c") + 1]),
                                                   (trained - p.window) * p.group + p.window))
        flags += attention
        notes = ("--grp-attn-n/--grp-attn-w (Self-Extend) work in llama-completion and llama-passkey only",) \
            if attention else ()
        return Translation(target, flags, shlex.join(flags), notes)
    value = F.to_vllm(rope)
    text = f"--hf-overrides {shlex.quote(json.dumps(value['hf_overrides']))}"
    if "max_model_len" in value:
        text += f" --max-model-len {value['max_model_len']}"
    return Translation(target, value, text)


def translate_all(spec: str | Method, base: RopeConfig, arch: str = "llama") -> list[tuple[str, str]]:
    """``(target, settings or "cannot: reason")`` for every target."""
    rows = []
    for target in TARGETS:
        try:
            rows.append((target, translate(spec, base, target, arch).text.replace("\n", " ")))
        except Inexpressible as err:
            rows.append((target, f"cannot: {err}"))
    return rows


def spec_from_llama_cpp(flags: str, base: RopeConfig) -> Method:
    """The method llama.cpp's flags describe on a model whose file rope is ``base``."""
    values = F.parse_llama_cpp_flags(flags)
    rope = F.from_llama_cpp(_without(shlex.split(flags), ("--grp-attn-n", "-gan", "--grp-attn-w", "-gaw")), base)
    text = spec_text(rope)
    if "group" in values or "window" in values:
        text += f"+self-extend:group={int(values.get('group', 1))},window={int(values.get('window', 512))}"
    return parse_method(text)


def _without(tokens: list[str], flags: tuple[str, ...]) -> list[str]:
    out, skip = [], False
    for token in tokens:
        if skip:
            skip = False
            continue
        name = token.partition("=")[0]
        if name in flags:
            skip = "=" not in token
            continue
        out.append(token)
    return out


def spec_text(rope: RopeConfig) -> str:
    """A spec string for a rope configuration (JSON values; lists for LongRoPE)."""
    params = rope.params.to_hf()
    parts = [f"{k}={json.dumps(v).replace(' ', '')}" for k, v in params.items()]
    if rope.rope_theta is not None:
        parts.append(f"rope_theta={json.dumps(rope.rope_theta)}")
    return rope.rope_type + (":" + ",".join(parts) if parts else "")
