"""What ``ropekit.hf.patch`` needs to know about each transformers architecture, and nothing more.

Every supported model keeps one rotary module at the base model (``model.model.rotary_emb``),
calls it once per forward, passes ``position_ids`` on to its attention implementation through
``AttentionInterface``, and rotates the first ``R = 2 * len(inv_freq)`` channels of each head.
They differ in how the rotary module lays out cos/sin, how pairs are formed, and which layers
use RoPE at all:

- ``table``: how the rotary module returns cos/sin: ``"halves"`` (``cat(freqs, freqs)``, the
  usual) or ``"interleaved"`` (``repeat_interleave(freqs, 2)``: Cohere);
- ``layout``: which channels a pair turns: ``"half"`` (i, i + R/2) or ``"interleaved"`` (2i, 2i+1:
  Cohere, GLM, Helium, whose apply function interleaves the halves table itself);
- ``uses_rope(module)``: False on layers without RoPE (SmolLM3's ``no_rope_layers``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


def _always(module) -> bool:
    return True


def _use_rope_attribute(module) -> bool:
    return bool(getattr(module, "use_rope", True))


@dataclass(frozen=True)
class Architecture:
    table: str = "halves"
    layout: str = "half"
    uses_rope: Callable[[object], bool] = field(default=_always)
    notes: str = ""


_STANDARD = Architecture()
_INTERLEAVED_FROM_HALVES = Architecture(layout="interleaved", notes="apply interleaves the halves table")

ARCHITECTURES: dict[str, Architecture] = {
    **{name: _STANDARD for name in (
        "llama", "mistral", "ministral", "mixtral", "qwen2", "qwen3", "qwen3_moe", "phi3", "gemma", "gemma2", "olmo",
        "olmo2", "granite", "starcoder2", "stablelm", "phi", "nemotron", "arcee", "seed_oss", "apertus", "gpt_neox")},
    "cohere": Architecture(table="interleaved", layout="interleaved", notes="GPT-J pairs"),
    "glm": _INTERLEAVED_FROM_HALVES,
    "glm4": _INTERLEAVED_FROM_HALVES,
    "helium": _INTERLEAVED_FROM_HALVES,
    "smollm3": Architecture(uses_rope=_use_rope_attribute, notes="no RoPE on the layers of config.no_rope_layers"),
}

# Architectures known not to fit, with the reason given to the user.
REFUSED: dict[str, str] = {
    "gemma3": "a rope per layer type (local and global bases) is not supported yet",
    "gemma3_text": "a rope per layer type (local and global bases) is not supported yet",
    "olmo3": "a rope per layer type is not supported yet",
    "cohere2": "RoPE on the sliding layers only is not supported yet",
    "exaone4": "RoPE on the sliding layers only is not supported yet",
    "persimmon": "its attention does not receive position_ids",
    "deepseek_v3": "multi-head latent attention rotates a separate rope slice of q and k",
    "deepseek_v2": "multi-head latent attention rotates a separate rope slice of q and k",
    "llama4": "chunked attention with NoPE layers and complex-number rope is not supported",
}
