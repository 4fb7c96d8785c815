"""What the lab runs a protocol on: ropekit's engine or a transformers model, behind one small interface.

A runner holds a loaded model and its tokenizer and offers what the protocols need:

- ``use(spec) -> dict``: switch to a method (from the model's own rope each time) and
  describe it (``{"rope": ..., "attention": ...}``);
- ``window_nll(ids, on_layer) -> [T-1]``: the NLL of each token of one window, one forward;
- ``greedy(ids, max_new_tokens, on_prefill_layer) -> list[int]``: greedy continuation with a cache;
- ``shared_prefix_length(prompts) -> int`` and ``greedy_many(prompts, max_new_tokens, on_prefill_layer,
  shared=...)``: several prompts, their first ``shared`` tokens run once when the runner can do that
  exactly (the engine; transformers runs each prompt whole);
- ``trained_length``, ``num_layers``, ``identity`` (what goes into every result's cell key:
  model file identity, dtype, device, backend).

``EngineRunner`` drives ``ropekit.model`` (specs through ``patch``);
``TransformersRunner`` drives a model loaded with ``AutoModelForCausalLM.from_pretrained`` (specs
through ``ropekit.hf.patch``) and also generates text through transformers' own ``generate()``
(``TransformersRunner.generate``, with the contract of ``ropekit.generate`` for one prompt). Both
tokenize with ropekit's tokenizer of the same file, so the same text gives the same tokens on both
backends.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ropekit.eval.perplexity import LOGIT_CHUNK, window_nll
from ropekit.method import parse_method
from ropekit.model.attention import patch
from ropekit.model.generate import (
    LongPromptWarning,
    TextStream,
    check_generation_fits,
    check_sampling,
    generate_ids,
    prefill,
    prepare_prompt,
    warn_long_prompt,
)
from ropekit.rope import RopeConfig

BACKENDS = ("ropekit", "transformers")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class EngineRunner:
    """ropekit's own engine (``LlamaModel``)."""

    backend = "ropekit"

    def __init__(self, model, tokenizer=None, model_id: str | None = None):
        self.model, self.tokenizer, self.model_id = model, tokenizer, model_id
        self.base_rope: RopeConfig = model.config.rope
        self.num_layers = model.config.num_hidden_layers
        rope = self.base_rope
        self.trained_length = int(rope.original_max_position_embeddings or model.config.max_position_embeddings)

    @property
    def config(self):
        return self.model.config

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def identity(self) -> dict[str, Any]:
        weight = self.model.embed_tokens.weight
        return {"model_id": self.model_id, "dtype": _dtype_name(weight.dtype), "device": weight.device.type,
                "backend": self.backend}

    def use(self, spec: str) -> dict:
        patch(self.model, spec, self.base_rope)
        return {"rope": self.model.config.rope.describe(), "attention": parse_method(spec).attention_name}

    def window_nll(self, ids: torch.Tensor, on_layer: Callable[[int], None] | None = None) -> torch.Tensor:
        return window_nll(self.model, ids, on_layer=on_layer)

    def greedy(self, ids: list[int], max_new_tokens: int, on_prefill_layer=None) -> list[int]:
        with warnings.catch_warnings():  # long prompts are what the lab measures
            warnings.simplefilter("ignore", LongPromptWarning)
            return [int(t[0]) for t in generate_ids(self.model, [ids], max_new_tokens=max_new_tokens,
                                                    on_prefill_layer=on_prefill_layer)]

    def shared_prefix_length(self, prompts: list[list[int]]) -> int:
        """How many first tokens of ``prompts`` one cached pass can serve exactly: their common prefix, less
        the one token each prompt must run itself (its logits pick the first answer token); 0 for fewer
        than two prompts, or with a length-dependent rope type (dynamic, dynamic_yarn, longrope), whose
        frequencies follow each pass's length, so a prefix run alone would be rotated differently."""
        if len(prompts) < 2 or self.model.config.rope.is_dynamic:
            return 0
        return min(common_prefix_length(prompts), min(len(p) for p in prompts) - 1)

    def greedy_many(self, prompts: list[list[int]], max_new_tokens: int, on_prefill_layer=None, *,
                    shared: int = 0) -> list[list[int]]:
        """Greedy continuations of ``prompts``: their first ``shared`` tokens (at most
        ``shared_prefix_length``) run once into a KV cache, each prompt continuing from a ``fork`` of it
        (the same tokens at the same positions: plain RoPE caches keys rotated at their positions, the
        attention variants cache them unrotated with their positions). ``on_prefill_layer`` is called
        per layer of every pass (the shared one included)."""
        if shared and not 0 < shared <= (limit := self.shared_prefix_length(prompts)):
            raise ValueError(f"shared={shared}: these prompts can share their first 0..{limit} tokens")
        if shared == 0:
            return [self.greedy(p, max_new_tokens, on_prefill_layer) for p in prompts]
        out = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", LongPromptWarning)
            cache = prefill(self.model, prompts[0][:shared], on_prefill_layer=on_prefill_layer)
            for p in prompts:
                fork = cache.fork(len(p) + max_new_tokens)
                out.append([int(t[0]) for t in generate_ids(self.model, [p[shared:]], max_new_tokens=max_new_tokens,
                                                            on_prefill_layer=on_prefill_layer, cache=fork)])
        return out


def common_prefix_length(prompts: list[list[int]]) -> int:
    """The number of first tokens every prompt of ``prompts`` has in common."""
    if not prompts:
        return 0
    first, n = prompts[0], min(len(p) for p in prompts)
    for other in prompts[1:]:
        n = next((i for i in range(n) if other[i] != first[i]), n)
    return n


class TransformersRunner:
    """A transformers causal LM, patched in place by ``ropekit.hf.patch`` for each spec."""

    backend = "transformers"

    def __init__(self, model, tokenizer=None, model_id: str | None = None):
        from ropekit.hf import patch, unpatch

        self.model, self.tokenizer, self.model_id = model, tokenizer, model_id
        self._patch, self._unpatch = patch, unpatch
        self.base_rope = RopeConfig.from_hf(model.config)
        self.num_layers = model.config.num_hidden_layers
        max_len = getattr(model.config, "max_position_embeddings", None)
        self.trained_length = int(self.base_rope.original_max_position_embeddings or max_len)
        self._layers = _decoder_layers(model)

    @property
    def config(self):
        return self.model.config

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def identity(self) -> dict[str, Any]:
        weight = next(self.model.parameters())
        return {"model_id": self.model_id, "dtype": _dtype_name(weight.dtype), "device": weight.device.type,
                "backend": self.backend}

    def use(self, spec: str) -> dict:
        self._patch(self.model, spec)
        from ropekit.hf import patched_method

        applied = patched_method(self.model)
        return {"rope": applied.rope_config(self.base_rope).describe(), "attention": applied.attention_name}

    def _with_progress(self, on_layer):
        """Forward hooks on the decoder layers calling ``on_layer(i)`` (removed by the caller)."""
        if on_layer is None:
            return []
        return [layer.register_forward_hook(lambda *_, i=i: on_layer(i)) for i, layer in enumerate(self._layers)]

    @torch.inference_mode()
    def window_nll(self, ids: torch.Tensor, on_layer: Callable[[int], None] | None = None,
                   logit_chunk: int = LOGIT_CHUNK) -> torch.Tensor:
        device = next(self.model.parameters()).device
        ids = ids.reshape(1, -1).to(device)
        hooks = self._with_progress(on_layer)
        try:
            base = getattr(self.model, self.model.base_model_prefix)
            hidden = base(input_ids=ids, use_cache=False).last_hidden_state[0, :-1]  # [T-1, C], final norm applied
        finally:
            for hook in hooks:
                hook.remove()
        head = self.model.get_output_embeddings()
        softcap = getattr(self.model.config, "final_logit_softcapping", None)
        targets = ids[0, 1:]
        out = torch.empty(targets.shape[0], dtype=torch.float64)
        for a in range(0, targets.shape[0], logit_chunk):
            logits = head(hidden[a:a + logit_chunk]).float()  # [chunk, V]
            if softcap:
                logits = torch.tanh(logits / softcap) * softcap
            nll = F.cross_entropy(logits, targets[a:a + logit_chunk], reduction="none")
            out[a:a + logit_chunk] = nll.double().cpu()
        return out

    @torch.inference_mode()
    def greedy(self, ids: list[int], max_new_tokens: int, on_prefill_layer=None) -> list[int]:
        device = next(self.model.parameters()).device
        x = torch.tensor([ids], device=device)
        counted = []

        def prefill_only(i):  # the hooks fire on every step; progress counts the prompt's pass
            if len(counted) < self.num_layers:
                counted.append(i)
                on_prefill_layer(i)

        hooks = self._with_progress(prefill_only if on_prefill_layer is not None else None)
        try:
            out = self.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                                      min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
        finally:
            for hook in hooks:
                hook.remove()
        return out[0, len(ids):].tolist()

    @torch.inference_mode()
    def generate(self, prompt: str, *, max_new_tokens: int = 64, temperature: float = 0.0, seed: int | None = None,
                 top_k: int | None = None, top_p: float | None = None, stream: Callable[[str], None] | None = None,
                 chat: bool = False) -> str:
        """The continuation of ``prompt`` through transformers' own ``generate()``, with the contract of
        ``ropekit.model.generate.generate`` for one prompt: text only (the prompt and stop tokens left out),
        greedy at temperature 0 (else sampling with ``top_k`` / ``top_p``, repeatable with ``seed``), each
        text piece passed to ``stream`` as it is produced, ``chat`` wrapping the prompt in the chat template.
        The request is checked before anything runs (sampling arguments, the memory it needs); a prompt
        past the trained context warns once.
        """
        check_sampling(max_new_tokens, temperature, top_k, top_p)
        ids = prepare_prompt(self.tokenizer, prompt, chat)
        if max_new_tokens:
            check_generation_fits(self.model.config, len(ids), max_new_tokens, self.dtype)
            warn_long_prompt(self.model, len(ids))
        stop = self.tokenizer.stop_token_ids
        pieces: list[str] = []
        streamer = _TextStreamer(self.tokenizer, stop, lambda piece: _send(piece, pieces, stream))
        if seed is not None:
            torch.manual_seed(seed)
        x = torch.tensor([ids], device=next(self.model.parameters()).device)
        self.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                            eos_token_id=sorted(stop) or None, pad_token_id=self.tokenizer.pad_token_id or 0,
                            streamer=streamer, **_sampling_arguments(temperature, top_k, top_p))
        return "".join(pieces)

    def shared_prefix_length(self, prompts: list[list[int]]) -> int:
        """0: each prompt runs whole in transformers' own ``generate`` (no shared prefix)."""
        return 0

    def greedy_many(self, prompts: list[list[int]], max_new_tokens: int, on_prefill_layer=None, *,
                    shared: int = 0) -> list[list[int]]:
        if shared:
            raise ValueError("the transformers runner runs every prompt whole (shared must be 0)")
        return [self.greedy(p, max_new_tokens, on_prefill_layer) for p in prompts]


class _TextStreamer:
    """transformers' streamer protocol (``put(token ids)``, ``end()``): skips the prompt's ids, then passes
    the text of each new token (stop tokens left out) to ``send`` as ``TextStream`` completes it."""

    def __init__(self, tokenizer, stop: set[int], send: Callable[[str], None]):
        self.text, self.stop, self.send = TextStream(tokenizer), stop, send
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            if token not in self.stop and (piece := self.text.push(int(token))):
                self.send(piece)

    def end(self) -> None:
        if rest := self.text.flush():
            self.send(rest)


def _send(piece: str, pieces: list[str], stream: Callable[[str], None] | None) -> None:
    """Keep ``piece`` in ``pieces`` and pass it on to ``stream`` when there is one."""
    pieces.append(piece)
    if stream is not None:
        stream(piece)


def _sampling_arguments(temperature: float, top_k: int | None, top_p: float | None) -> dict[str, Any]:
    """transformers' ``generate()`` arguments for ropekit's sampling settings: greedy at temperature 0,
    no top-k / top-p filter where none is given."""
    if temperature <= 0:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": temperature, "top_k": top_k or 0, "top_p": top_p or 1.0}


def _decoder_layers(model) -> list[torch.nn.Module]:
    base = getattr(model, model.base_model_prefix, model)
    layers = getattr(base, "layers", None)
    return list(layers) if layers is not None else []


def as_runner(model_or_runner, tokenizer=None):
    """A runner for ``model_or_runner``: a runner itself, a ropekit ``LlamaModel`` or a transformers model."""
    if hasattr(model_or_runner, "window_nll") and hasattr(model_or_runner, "use"):
        return model_or_runner
    if hasattr(model_or_runner, "attention_context"):
        return EngineRunner(model_or_runner, tokenizer)
    return TransformersRunner(model_or_runner, tokenizer)


def load_transformers(source: str | os.PathLike, *, dtype: torch.dtype, device: torch.device):
    """``AutoModelForCausalLM.from_pretrained`` on a GGUF file (``gguf_file=``) or an HF folder, eval mode."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    from ropekit.loading import resolve_source

    path = Path(resolve_source(source))
    logging.set_verbosity_error()  # transformers' own GGUF conversion bar and notices
    if path.is_dir():
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    return model.to(device).eval()


def load_runner(source: str | os.PathLike, *, backend: str = "ropekit", dtype: torch.dtype | str = torch.float32,
                device: torch.device | str | None = None):
    """Load ``source`` on ``backend`` (``"ropekit"`` or ``"transformers"``) as a runner with its tokenizer."""
    from ropekit.loading import load_model, load_tokenizer, model_identity, parse_device, parse_dtype

    if backend not in BACKENDS:
        raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    dtype, device = parse_dtype(dtype), parse_device(device)
    model_id = model_identity(source)
    if backend == "ropekit":
        model, tokenizer = load_model(source, dtype=dtype, device=device)
        return EngineRunner(model, tokenizer, model_id)
    return TransformersRunner(load_transformers(source, dtype=dtype, device=device), load_tokenizer(source), model_id)
