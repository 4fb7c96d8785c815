"""Rope settings across runtimes: translate a method, rewrite a GGUF file's rope, plan an extension.

- ``translate(spec, base, target)`` / ``translate_all``: HF (v5 and v4), GGUF metadata, llama.cpp
  flags, vLLM overrides, each exact or refused with the reason (``Inexpressible``);
- ``rewrite_gguf(source, target, metadata)``: a checked copy of a GGUF file with new rope settings;
- ``plan_extension(base, target_length)``: parameters of each method family for a target length
  and what each changes inside the trained window.
Imports the rope core and the extension grammar; ``gguf`` only for the rewrite.
"""

from ropekit.convert.gguf_rewrite import rewrite_gguf
from ropekit.convert.plan import Candidate, plan_extension
from ropekit.convert.translate import TARGETS, Translation, spec_from_llama_cpp, spec_text, translate, translate_all
from ropekit.rope.formats import Inexpressible

__all__ = ["TARGETS", "Candidate", "Inexpressible", "Translation", "plan_extension", "rewrite_gguf",
           "spec_from_llama_cpp", "spec_text", "translate", "translate_all"]
