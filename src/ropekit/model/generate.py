"""Token generation with a KV cache: greedy, temperature, top-k, top-p; batches; streaming.

Positions follow LLaMA's cache decoding: the prompt is run once at positions 0..n-1 (with left
padding, each row's first real token is at position 0) and each new token is run alone at the
next position of its row, attending to the cached keys.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch

from ropekit.dispatch import use_backend
from ropekit.kernels.decode import DECODE_OPS
from ropekit.memory import available_memory, check_fits, request_bytes
from ropekit.model.kv_cache import KVCache

MAX_POSITIONS = 2**31  # positions are int32 in the fused kernels; a cache longer than this cannot be addressed


class LongPromptWarning(UserWarning):
    """A prompt longer than the model's trained context (the lab's use case: warned once, not an error)."""


def sample_next(logits: torch.Tensor, *, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick the next token of each row. logits ``[B, V]`` float -> ``[B]`` long.

    temperature 0 is greedy (argmax). Otherwise logits / temperature, then top-k, then top-p
    (the smallest set of tokens whose probability reaches ``top_p``), then a draw.
    """
    if temperature < torch.finfo(torch.float32).tiny:  # 0, and temperatures float32 cannot hold: the greedy limit
        return logits.argmax(dim=-1)
    logits = logits.float()
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature  # <= 0: -inf at worst, never NaN
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        logits = _top_p_filter(logits, top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)  # [B, 1] -> [B]


def _top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Mask tokens outside the nucleus: those whose higher-ranked tokens already hold ``top_p``."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # [B, V]: probability of strictly better tokens
    drop_sorted = mass_before > top_p
    drop_sorted[:, 0] = False  # always keep the best token
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def check_sampling(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not isinstance(max_new_tokens, int) or not 0 <= max_new_tokens < MAX_POSITIONS:
        raise ValueError(f"max_new_tokens must be an integer in [0, 2**31), got {max_new_tokens!r}")
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:  # NaN fails this too
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")


def check_generation_fits(config, prompt_tokens: int, max_new_tokens: int, dtype: torch.dtype,
                          batch_size: int = 1) -> None:
    """Refuse, before allocating, a generation whose KV cache and prompt pass cannot fit in memory
    (``config``: a ``LlamaConfig`` or transformers config)."""
    total = prompt_tokens + max_new_tokens
    if total > MAX_POSITIONS:
        raise ValueError(f"max_new_tokens={max_new_tokens} with a {prompt_tokens}-token prompt: {total} positions, "
                         f"more than the 2**31 a cache can address")
    available = available_memory()
    needed = request_bytes(config, total, dtype, batch_size=batch_size)
    if available is None or needed <= available:
        return
    per_token = max(1, request_bytes(config, 1, dtype, batch_size=batch_size))
    fit = max(0, available // per_token - prompt_tokens)
    check_fits(f"max_new_tokens={max_new_tokens} with a {prompt_tokens}-token prompt (batch {batch_size}): a KV "
               f"cache of {total} tokens", needed, f"at most about {fit} new tokens fit")


_WARNED_MODELS: weakref.WeakSet = weakref.WeakSet()


def warn_long_prompt(model, prompt_tokens: int) -> None:
    """Warn once per model when a prompt passes its trained context (``model``: a ``LlamaModel`` or a
    transformers model)."""
    config = model.config
    rope = getattr(config, "rope", None)
    trained = (getattr(rope, "original_max_position_embeddings", None)
               or getattr(config, "max_position_embeddings", None))
    if not trained or prompt_tokens <= trained or model in _WARNED_MODELS:
        return
    _WARNED_MODELS.add(model)
    warnings.warn(f"the prompt has {prompt_tokens} tokens, more than the model's trained context of {trained}: "
                  "past it the output depends on the extension method (--method)", LongPromptWarning, stacklevel=3)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (input_ids ``[B, T]``, attention_mask ``[B, T]`` bool), padded on the left."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("empty prompt: every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
        mask[row, width - len(prompt):] = True
    return ids, mask


@torch.inference_mode()
def generate_ids(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 64,
                 temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None, stop_ids: Iterable[int] = (), pad_id: int = 0,
                 max_length: int | None = None, fast: bool = True,
                 on_prefill_layer: Callable[[int], None] | None = None,
                 cache: KVCache | None = None) -> Iterator[torch.Tensor]:
    """Yield one ``[B]`` long tensor of new tokens per step (``-1`` for rows that already stopped).

    prompts: token id lists (left-padded into one batch). A row stops after emitting a token in
    ``stop_ids`` (that token is yielded); generation ends when all rows stopped or after
    ``max_new_tokens``. max_length: KV cache capacity (default: longest prompt + max_new_tokens);
    a prompt that does not fit raises ValueError, and generation stops when the cache is full.
    fast: one-token steps of one sequence on the CPU run the model's fused C++ decode kernels
    (``LlamaModel.decode_path()`` says which); ``fast=False`` runs them as torch ops.
    on_prefill_layer: called with i after layer i of the prompt's forward pass (progress).
    cache: continue from this ``KVCache`` (e.g. a ``fork`` of ``prefill``'s) instead of a new one: it
    already holds the first tokens of every row, and ``prompts`` are the tokens after them, all of one
    length (no padding), at the positions that follow the cached ones. It is written in place and its
    capacity bounds the generation (``max_length`` is not used).
    """
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    input_ids, mask = left_pad(prompts, pad_id)
    device = model.embed_tokens.weight.device
    input_ids, mask = input_ids.to(device), mask.to(device)
    if cache is not None:
        _check_continuation(cache, input_ids, mask)
        capacity = cache.max_len - cache.length
    else:
        capacity = max_length or input_ids.shape[1] + max_new_tokens
    if input_ids.shape[1] > capacity:
        raise ValueError(f"prompt of {input_ids.shape[1]} tokens is longer than the KV cache "
                         f"({capacity} tokens{' free' if cache is not None else ''})")
    if max_new_tokens == 0:
        return
    if cache is None:
        check_generation_fits(model.config, input_ids.shape[1], capacity - input_ids.shape[1],
                              model.embed_tokens.weight.dtype, input_ids.shape[0])
    warn_long_prompt(model, input_ids.shape[1] + (cache.length if cache is not None else 0))
    if seed is not None and (not isinstance(seed, int) or not 0 <= seed < 2**64):
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    sample = lambda logits: sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p,  # noqa: E731
                                        generator=generator)
    if cache is None:
        cache = KVCache.for_model(model, input_ids.shape[0], capacity)
    stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=device)
    with use_backend(None if fast else "torch", *DECODE_OPS):
        logits = model(input_ids, cache=cache, attention_mask=mask, logits_to_keep=1,
                       on_layer=on_prefill_layer)[:, -1]  # [B, V]
        if input_ids.shape[0] == 1:  # one sequence: plain ints between steps (a decode step is ~30 ms of kernels)
            yield from _one_sequence(model, cache, logits, max_new_tokens, sample, set(stop_ids))
            return
        for step in range(max_new_tokens):
            token = sample(logits)
            yield token.masked_fill(done, -1)
            done = done | torch.isin(token, stop)
            if bool(done.all()) or step + 1 == max_new_tokens or cache.length == cache.max_len:
                return
            token = token.masked_fill(done, pad_id)
            logits = model(token[:, None], cache=cache)[:, -1]  # [B, 1] -> [B, V]


def _check_continuation(cache: KVCache, input_ids: torch.Tensor, mask: torch.Tensor) -> None:
    if cache.batch_size != input_ids.shape[0]:
        raise ValueError(f"the cache holds {cache.batch_size} rows, the prompts are {input_ids.shape[0]}")
    if not bool(mask.all()):
        raise ValueError("prompts that continue a cache must all have the same length (no padding)")
    if cache.length == 0 or cache.padded:
        raise ValueError("continue from a cache that holds an unpadded prefix (see prefill)")


@torch.inference_mode()
def prefill(model, prompt: Sequence[int], *, max_length: int | None = None, fast: bool = True,
            on_prefill_layer: Callable[[int], None] | None = None) -> KVCache:
    """A one-sequence ``KVCache`` holding ``prompt``, run once at positions 0..n-1, with ``max_length`` slots
    (default: exactly the prompt). Continue from it with ``generate_ids(model, [rest], cache=c.fork(n))``:
    the rest's tokens then sit at the positions they have in the whole prompt, next to the same cached
    keys. ``fast`` and ``on_prefill_layer`` as for ``generate_ids``.
    """
    input_ids, _ = left_pad([prompt], 0)
    input_ids = input_ids.to(model.embed_tokens.weight.device)
    capacity = max_length or input_ids.shape[1]
    if input_ids.shape[1] > capacity:
        raise ValueError(f"prompt of {input_ids.shape[1]} tokens is longer than the KV cache ({capacity} tokens)")
    check_generation_fits(model.config, input_ids.shape[1], capacity - input_ids.shape[1],
                          model.embed_tokens.weight.dtype)
    warn_long_prompt(model, input_ids.shape[1])
    cache = KVCache.for_model(model, 1, capacity)
    with use_backend(None if fast else "torch", *DECODE_OPS):
        model(input_ids, cache=cache, logits_to_keep=1, on_layer=on_prefill_layer)
    return cache


def _one_sequence(model, cache: KVCache, logits: torch.Tensor, max_new_tokens: int,
                  sample: Callable[[torch.Tensor], torch.Tensor], stop: set[int]) -> Iterator[torch.Tensor]:
    """``generate_ids``'s loop for a batch of one: yields ``[1]`` tensors. Its steps run through a
    ``DecodeGraph`` (recorded once, replayed; the eager forward where a step cannot be replayed)."""
    graph = model.capture_decode(cache)
    for step in range(max_new_tokens):
        token = sample(logits)  # [1]
        yield token
        if int(token) in stop or step + 1 == max_new_tokens or cache.length == cache.max_len:
            return
        logits = graph.step(token[:, None])[:, -1]  # [1, 1] -> [1, V]


def prepare_prompt(tokenizer, prompt: str, chat: bool) -> list[int]:
    """Token ids for a prompt (through the chat template when ``chat``); ValueError if empty."""
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a str, got {type(prompt).__name__}")
    if not prompt:
        raise ValueError("empty prompt: give at least one character of text")
    if chat:
        messages = [{"role": "user", "content": prompt}]
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    ids = tokenizer.encode(prompt, add_special_tokens=True)
    if not ids:
        raise ValueError(f"prompt {prompt!r} encodes to no tokens")
    return ids


class TextStream:
    """Turns token ids, one at a time, into text pieces, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.sent = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""  # a multi-byte character split across tokens: wait for the rest
        piece, self.sent = text[self.sent:], len(text)
        return piece

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character decodes as U+FFFD)."""
        text = self.tokenizer.decode(self.ids)
        piece, self.sent = text[self.sent:], len(text)
        return piece


def stream_generate(model, tokenizer, prompt: str, *, max_new_tokens: int = 64, temperature: float = 0.0,
                    seed: int | None = None, top_k: int | None = None, top_p: float | None = None,
                    chat: bool = False, max_length: int | None = None, fast: bool = True) -> Iterator[str]:
    """Yield the continuation of ``prompt`` as text pieces while it is generated (stop token excluded)."""
    ids = prepare_prompt(tokenizer, prompt, chat)
    stop_ids = tokenizer.stop_token_ids
    stream = TextStream(tokenizer)
    tokens = generate_ids(model, [ids], max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                          top_p=top_p, seed=seed, stop_ids=stop_ids, pad_id=tokenizer.pad_token_id or 0,
                          max_length=max_length, fast=fast)
    for token in tokens:
        token_id = int(token[0])
        if token_id in stop_ids:
            break
        piece = stream.push(token_id)
        if piece:
            yield piece
    if rest := stream.flush():
        yield rest


def generate(model, tokenizer, prompt: str | Sequence[str], *, max_new_tokens: int = 64,
             temperature: float = 0.0, seed: int | None = None, top_k: int | None = None,
             top_p: float | None = None,
             stream: Callable[[str], None] | None = None, chat: bool = False,
             max_length: int | None = None, fast: bool = True) -> str | list[str]:
    """The continuation of ``prompt`` (text only; the prompt and the stop token are not included).

    temperature 0 is greedy; ``seed`` makes sampling repeatable. ``stream`` is called with each
    text piece as it is produced (single prompt only). ``chat`` wraps the prompt in the model's
    chat template as a user turn. A list of prompts runs as one left-padded batch and returns a
    list of strings. ``fast`` (default) runs one-sequence CPU decode steps through the fused C++ kernels.
    """
    options = dict(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, top_k=top_k,
                   top_p=top_p, chat=chat, max_length=max_length, fast=fast)
    if isinstance(prompt, str):
        pieces = []
        for piece in stream_generate(model, tokenizer, prompt, **options):
            pieces.append(piece)
            if stream is not None:
                stream(piece)
        return "".join(pieces)
    if stream is not None:
        raise ValueError("stream= works with a single prompt, not a batch")
    return generate_batch(model, tokenizer, list(prompt), **options)


def generate_batch(model, tokenizer, prompts: list[str], *, chat: bool = False, **options) -> list[str]:
    """Continuations of several prompts, run as one left-padded batch."""
    if not prompts:
        raise ValueError("no prompts given")
    ids = [prepare_prompt(tokenizer, p, chat) for p in prompts]
    stop_ids = tokenizer.stop_token_ids
    outputs: list[list[int]] = [[] for _ in prompts]
    for tokens in generate_ids(model, ids, stop_ids=stop_ids, pad_id=tokenizer.pad_token_id or 0, **options):
        for row, token_id in enumerate(tokens.tolist()):
            if token_id >= 0 and token_id not in stop_ids:
                outputs[row].append(token_id)
    return [tokenizer.decode(out) for out in outputs]
