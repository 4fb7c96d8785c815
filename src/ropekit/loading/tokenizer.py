"""A small tokenizer wrapper over the ``tokenizers`` library, built from a GGUF or a tokenizer.json.

GGUF files carry no tokenizer.json: they store the vocabulary, merges, token types and special
ids as ``tokenizer.ggml.*`` metadata. For byte-level BPE vocabularies (``tokenizer.ggml.model ==
"gpt2"``, SmolLM2's) we rebuild the same tokenizer: BPE over the byte alphabet, control tokens
kept whole as special tokens, and the pre-tokenizer that llama.cpp's ``tokenizer.ggml.pre`` names.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

_CONTROL = 3  # llama.cpp token type: control (special) token
_USER_DEFINED = 4

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
                 chat_template: str | None = None):
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id if pad_token_id is not None else eos_token_id
        self.add_bos_token = add_bos_token
        self.chat_template = chat_template

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
        return render_chat_template(self.chat_template, list(messages), add_generation_prompt, **special)

    def _token(self, token_id: int | None) -> str:
        return "" if token_id is None else (self.backend.id_to_token(token_id) or "")

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any]) -> Tokenizer:
        """Build from ``tokenizer.ggml.*`` metadata (byte-level BPE only)."""
        kind = meta.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ValueError(f"unsupported GGUF tokenizer model {kind!r}; ropekit builds byte-level BPE "
                             "('gpt2') tokenizers from GGUF (use an HF folder with tokenizer.json otherwise)")
        tokens = list(meta["tokenizer.ggml.tokens"])
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
        vocab = {token: i for i, token in enumerate(tokens)}
        backend = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
        backend.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre"))
        backend.decoder = decoders.ByteLevel()
        types = list(meta.get("tokenizer.ggml.token_type", []))
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                    for t, kind in zip(tokens, types, strict=True) if kind == _CONTROL])
        backend.add_tokens([AddedToken(t, special=False, normalized=False)
                            for t, kind in zip(tokens, types, strict=True) if kind == _USER_DEFINED])
        return cls(backend, bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
                   eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
                   pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
                   add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
                   chat_template=meta.get("tokenizer.chat_template"))

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, hf_config: dict[str, Any] | None = None) -> Tokenizer:
        """Build from an HF folder's ``tokenizer.json`` (+ ``tokenizer_config.json`` if present)."""
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {folder}")
        backend = HFTokenizer.from_file(str(path))
        tcfg = _read_json(folder / "tokenizer_config.json")
        hf_config = hf_config or {}

        def special_id(name: str) -> int | None:
            token = tcfg.get(name)
            token = token.get("content") if isinstance(token, dict) else token
            token_id = backend.token_to_id(token) if token else None
            return token_id if token_id is not None else _first_int(hf_config.get(f"{name}_id"))

        return cls(backend, bos_token_id=special_id("bos_token"), eos_token_id=special_id("eos_token"),
                   pad_token_id=special_id("pad_token"), add_bos_token=bool(tcfg.get("add_bos_token", False)),
                   chat_template=tcfg.get("chat_template"))


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _first_int(value: Any) -> int | None:
    if isinstance(value, list):
        return int(value[0]) if value else None
    return int(value) if value is not None else None


def render_chat_template(template: str, messages: list[dict[str, str]], add_generation_prompt: bool,
                         **special: str) -> str:
    """Render a jinja chat template (sandboxed jinja2 when installed, else a ChatML fallback)."""
    try:
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        return _render_chatml(template, messages, add_generation_prompt)
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                            **special)


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
