"""ropekit inside Hugging Face transformers: every rope type and attention variant on any supported causal LM.

``patch(model, spec)`` changes a loaded transformers model in place so that ``model(...)`` and
``model.generate(...)`` run the spec; ``unpatch(model)`` restores it exactly; ``supported()``
lists the model types. See ``ropekit.hf.patch`` for how (transformers' own rotary module and
attention registry, no copied modeling code). Needs the ``[hf]`` extra (transformers).
"""

from ropekit.hf.patch import IMPLEMENTATION, key_positions, patch, patched_method, supported, unpatch

__all__ = ["IMPLEMENTATION", "key_positions", "patch", "patched_method", "supported", "unpatch"]
