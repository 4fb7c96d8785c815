"""A small tokenizer wrapper over the ``tokenizers`` library, built from a GGUF or a tokenizer.json.

GGUF files carry no tokenizer.json: they store the vocabulary, merges, token types and special
ids as ``tokenizer.ggml.*`` metadata. For byte-level BPE vocabularies (``tokenizer.ggml.model ==
"gpt2"``, SmolLM2's) we rebuild the same tokenizer: BPE over the byte alphabet, control tokens
kept whole as special tokens, and the pre-tokenizer that llama.cpp's ``tokenizer.ggml.pre`` names.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from ropekit.loading.chat_template import render_bounded
from ropekit.loading.checks import MISSING, Raw, fail, one_line, read_json_object

_CONTROL = 3  # llama.cpp token type: control (special) token
_USER_DEFINED = 4
# Control and user-defined tokens become added tokens, matched before BPE runs; building that matcher
# costs ~20 us each (a million take 20 s and 1.5 GB). Real vocabularies have a few thousand at most.
MAX_ADDED_TOKENS = 1 << 16

# Pre-tokenizers for llama.cpp's ``tokenizer.ggml.pre`` names. SmolLM ("smollm") splits every digit
# on its own, then applies GPT-2's byte-level regex (its tokenizer.json: Digits + ByteLevel).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _pre_tokenizer(pre: str | None):
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("smollm", "starcoder", "refact"):
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in ("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx"):
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    return byte_level  # "default", "gpt2" and unknown names: GPT-2's regex


class Tokenizer:
    """Text <-> token ids, special token ids, and the chat template.

    ``encode(text, add_special_tokens=False) -> list[int]``; ``decode(ids) -> str``;
    ``eos_token_id``, ``bos_token_id``, ``pad_token_id``; ``stop_token_ids`` (ids that end generation);
    ``apply_chat_template(messages, add_generation_prompt=True) -> str``.
    """

    def __init__(self, backend: HFTokenizer, *, bos_token_id: int | None, eos_token_id: int | None,
                 pad_token_id: int | None = None, add_bos_token: bool = False,
                 chat_template: str | None = None, source: str = "tokenizer"):
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id if pad_token_id is not None else eos_token_id
        self.add_bos_token = add_bos_token
        self.chat_template = chat_template
        self.source = source  # where the chat template came from, for messages

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def stop_token_ids(self) -> set[int]:
        """EOS plus the end-of-text / end-of-turn tokens the vocabulary has (any of them ends a reply)."""
        ids = {self.eos_token_id} if self.eos_token_id is not None else set()
        for token in ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "</s>"):
            token_id = self.backend.token_to_id(token)
            if token_id is not None:
                ids.add(token_id)
        return ids

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; BOS is prepended only when asked and the model wants it."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def apply_chat_template(self, messages: Sequence[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        """Render ``messages`` ([{"role": ..., "content": ...}]) with the model's chat template."""
        if not self.chat_template:
            raise ValueError("this model has no chat template (tokenizer.chat_template); use chat=False")
        special = {"bos_token": self._token(self.bos_token_id), "eos_token": self._token(self.eos_token_id)}
        return render_chat_template(self.chat_template, list(messages), add_generation_prompt,
                                    source=f"{self.source}: chat template", **special)

    def _token(self, token_id: int | None) -> str:
        return "" if token_id is None else (self.backend.id_to_token(token_id) or "")

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any], source: Any = "GGUF metadata") -> Tokenizer:
        """Build from ``tokenizer.ggml.*`` metadata (byte-level BPE only), every field checked first;
        ``source`` (the file) names it in messages."""
        kind = meta.get("tokenizer.ggml.model")
        if not isinstance(kind, str) or kind != "gpt2":
            raise fail(source, "tokenizer.ggml.model", _describe(kind), "unsupported GGUF tokenizer model; ropekit "
                       "builds byte-level BPE ('gpt2') tokenizers from GGUF (use an HF folder with tokenizer.json "
                       "otherwise)")
        tokens = _gguf_tokens(meta, source)
        merges = _gguf_merges(meta, source)
        types = _gguf_token_types(meta, source, len(tokens))
        try:
            backend = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                             fuse_unk=False, byte_fallback=False))
        except Exception as err:  # the tokenizers library raises plain Exception for a merge out of vocabulary
            raise fail(source, "tokenizer.ggml.merges", Raw(f"{len(merges)} merges"), one_line(err)) from None
        backend.pre_tokenizer = _pre_tokenizer(_optional_str(meta, "tokenizer.ggml.pre", source))
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                    for t, kind in zip(tokens, types, strict=True) if kind == _CONTROL])
        backend.add_tokens([AddedToken(t, special=False, normalized=False)
                            for t, kind in zip(tokens, types, strict=True) if kind == _USER_DEFINED])
        ids = {name: _gguf_token_id(meta, f"tokenizer.ggml.{name}_token_id", source, len(tokens))
               for name in ("bos", "eos", "padding")}
        add_bos = meta.get("tokenizer.ggml.add_bos_token", False)
        if not isinstance(add_bos, bool):
            raise fail(source, "tokenizer.ggml.add_bos_token", add_bos, "must be a bool")
        return cls(backend, bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["padding"],
                   add_bos_token=add_bos, chat_template=_optional_str(meta, "tokenizer.chat_template", source),
                   source=str(source))

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, hf_config: dict[str, Any] | None = None) -> Tokenizer:
        """Build from an HF folder's ``tokenizer.json`` (+ ``tokenizer_config.json`` if present)."""
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {folder}")
        backend = _read_tokenizer_json(path)
        config_path = folder / "tokenizer_config.json"
        tcfg = read_json_object(config_path, MAX_JSON_BYTES) if config_path.is_file() else {}
        hf_config = hf_config or {}

        def special_id(name: str) -> int | None:
            token = tcfg.get(name)
            token = token.get("content") if isinstance(token, dict) else token
            if token is not None and not isinstance(token, str):
                raise fail(config_path, name, token, "must be a token string, or an object with a string 'content'")
            token_id = backend.token_to_id(token) if token else None
            return token_id if token_id is not None else _config_id(hf_config, f"{name}_id", folder / "config.json")

        add_bos = tcfg.get("add_bos_token") or False
        if not isinstance(add_bos, bool):
            raise fail(config_path, "add_bos_token", add_bos, "must be true or false")
        return cls(backend, bos_token_id=special_id("bos_token"), eos_token_id=special_id("eos_token"),
                   pad_token_id=special_id("pad_token"), add_bos_token=add_bos,
                   chat_template=_folder_template(tcfg, config_path), source=str(config_path))


MAX_TOKENIZER_JSON_BYTES = 64 << 20  # tokenizer.json [33 MB: Gemma 3]
MAX_JSON_BYTES = 16 << 20  # config.json, tokenizer_config.json


def _read_tokenizer_json(path: Path) -> HFTokenizer:
    """``tokenizers.Tokenizer.from_file``; ValueError for a file too large or one the library rejects."""
    size = path.stat().st_size
    if size > MAX_TOKENIZER_JSON_BYTES:
        raise fail(path, "size", Raw(f"{size} bytes"), f"at most {MAX_TOKENIZER_JSON_BYTES} bytes")
    try:
        return HFTokenizer.from_file(str(path))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:  # the library raises Exception, or a PanicException (a BaseException)
        raise ValueError(f"{path}: not a valid tokenizer.json: {one_line(err)}") from None


def _folder_template(tcfg: dict[str, Any], path: Path) -> str | None:
    """``chat_template`` of a tokenizer_config.json: a string, or HF's list of named templates ("default")."""
    template = tcfg.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default", next(iter(named.values()), None))
    if template is not None and not isinstance(template, str):
        raise fail(path, "chat_template", template, "must be a string (or a list of {name, template})")
    return template


def _config_id(hf_config: dict[str, Any], key: str, path: Path) -> int | None:
    """A special token id from config.json: an int, a list of ints (the first counts) or null."""
    value = hf_config.get(key)
    first = value[0] if isinstance(value, list) and value else None if isinstance(value, list) else value
    if first is None:
        return None
    if isinstance(first, bool) or not isinstance(first, int) or first < 0:
        raise fail(path, key, value, "must be a token id >= 0, a list of them, or null")
    return first


def _gguf_tokens(meta: dict[str, Any], source: Any) -> list[str]:
    tokens = meta.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise fail(source, "tokenizer.ggml.tokens", MISSING, "required (the vocabulary)")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise fail(source, "tokenizer.ggml.tokens", _describe(tokens), "must be a non-empty array of strings")
    return tokens


def _gguf_merges(meta: dict[str, Any], source: Any) -> list[tuple[str, str]]:
    """``tokenizer.ggml.merges`` as pairs: each entry two non-empty tokens separated by a space."""
    merges = meta.get("tokenizer.ggml.merges", [])
    if isinstance(merges, np.ndarray) and merges.size == 0:
        return []
    if not isinstance(merges, list):
        raise fail(source, "tokenizer.ggml.merges", _describe(merges), "must be an array of strings")
    pairs = []
    for i, merge in enumerate(merges):
        pair = tuple(merge.split(" ", 1)) if isinstance(merge, str) else ()
        if len(pair) != 2 or not all(pair):
            raise fail(source, f"tokenizer.ggml.merges[{i}]", merge, "must be two tokens separated by a space")
        pairs.append(pair)
    return pairs


def _gguf_token_types(meta: dict[str, Any], source: Any, n_tokens: int) -> list[int]:
    """``tokenizer.ggml.token_type``: one integer per token (all normal, 1, when absent)."""
    types = meta.get("tokenizer.ggml.token_type")
    if types is None:
        return [1] * n_tokens
    if isinstance(types, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in types):
        types = np.asarray(types, dtype=np.int64)  # metadata read by gguf-py's reader
    if not isinstance(types, np.ndarray) or types.dtype.kind not in "iu" or types.shape != (n_tokens,):
        raise fail(source, "tokenizer.ggml.token_type", _describe(types),
                   f"must be an array of {n_tokens} integers (one per token)")
    added = int(np.isin(types, (_CONTROL, _USER_DEFINED)).sum())
    if added > MAX_ADDED_TOKENS:
        raise fail(source, "tokenizer.ggml.token_type", Raw(f"{added} control or user-defined tokens"),
                   f"at most {MAX_ADDED_TOKENS}")
    return types.tolist()


def _gguf_token_id(meta: dict[str, Any], key: str, source: Any, n_tokens: int) -> int | None:
    value = meta.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n_tokens:
        raise fail(source, key, _describe(value), f"must be a token id in [0, {n_tokens})")
    return value


def _optional_str(meta: dict[str, Any], key: str, source: Any) -> str | None:
    value = meta.get(key)
    if value is not None and not isinstance(value, str):
        raise fail(source, key, _describe(value), "must be a string")
    return value


def _describe(value: Any) -> Any:
    """A short stand-in for a long array in a message."""
    if isinstance(value, np.ndarray):
        return Raw(f"array of {value.size} {value.dtype}")
    if isinstance(value, list) and len(value) > 8:
        return Raw(f"array of {len(value)} items")
    return value


def render_chat_template(template: str, messages: list[dict[str, str]], add_generation_prompt: bool,
                         source: str = "chat template", **special: str) -> str:
    """Render a jinja chat template: sandboxed jinja2 within limits on work and size
    (``chat_template.render_bounded``) when installed, else a ChatML fallback. ValueError, one line
    naming ``source``, for a template that fails or goes past a limit."""
    try:
        import jinja2  # noqa: F401
    except ImportError:
        return _render_chatml(template, messages, add_generation_prompt)
    variables = {"messages": messages, "add_generation_prompt": add_generation_prompt, **special}
    return render_bounded(template, variables, source)


def _render_chatml(template: str, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    """ChatML without jinja: ``<|im_start|>role\\ncontent<|im_end|>\\n`` per message (SmolLM2's format)."""
    if "<|im_start|>" not in template:
        raise ValueError("rendering this chat template needs jinja2 (pip install jinja2)")
    parts = [f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages]
    smollm_default = "You are a helpful AI assistant named SmolLM" in template
    if messages and messages[0]["role"] != "system" and smollm_default:
        parts.insert(0, "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
                        "Face<|im_end|>\n")
    if add_generation_prompt:
        parts.append("<|im_start|>assistant\n")
    return "".join(parts)
