"""The tokenizer (ropekit.loading.tokenizer) from GGUF metadata and from HF tokenizer files: SmolLM2's against
transformers' (``slow``), and bad tokens, merges, special ids and chat templates named in one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import eval_text
from file_edits import edited_gguf, hf_copy
from test_hostile_files import GGUFParts, V, tiny_gguf_parts
from tiny_llama import tiny_model, write_hf_folder

from ropekit.loading import load_model, load_tokenizer

# ---------------------------------------------------------------- SmolLM2 against transformers


@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers(smollm2, smollm2_path):
    transformers = pytest.importorskip("transformers")
    theirs = transformers.AutoTokenizer.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name)
    _, tokenizer = smollm2
    text = eval_text()[:20000] + " <|im_start|>user\nCafé ☕ 12345<|im_end|>"
    assert tokenizer.encode(text) == theirs.encode(text, add_special_tokens=False)
    messages = [{"role": "user", "content": "Hi there"}]
    assert tokenizer.apply_chat_template(messages) == theirs.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)


# ---------------------------------------------------------------- hostile files (each test names the bug it guards)


@pytest.fixture(scope="module")
def base_parts(tmp_path_factory) -> GGUFParts:
    return tiny_gguf_parts(tmp_path_factory.mktemp("base"))


def test_gguf_without_tokens_key_is_rejected(tmp_path, base_parts):
    path = edited_gguf(tmp_path, base_parts, delete=["tokenizer.ggml.tokens"], llama__vocab_size=(V.UINT32, 259))
    with pytest.raises(ValueError, match=r"tokenizer.ggml.tokens = \(missing\): required"):
        load_model(path)
    with pytest.raises(ValueError, match=r"tokenizer.ggml.tokens = \(missing\): required"):
        load_tokenizer(path)


def test_gguf_token_count_must_match_the_embedding_rows(tmp_path, base_parts):
    path = edited_gguf(tmp_path, base_parts, tokenizer__ggml__tokens=((V.ARRAY, V.STRING), ["a", "b"]))
    with pytest.raises(ValueError, match=r"vocab_size = 2|token_embd.weight shape = \[259, 64\]: must be \[2, 64\]"):
        load_model(path)


@pytest.mark.parametrize("merges, match", [
    (["ab"], r"tokenizer.ggml.merges\[0\] = 'ab': must be two tokens separated by a space"),
    (["Q Z"], r"tokenizer.ggml.merges = 1 merges: .*out of vocabulary"),
])
def test_gguf_bad_merges_are_rejected(tmp_path, base_parts, merges, match):
    path = edited_gguf(tmp_path, base_parts, tokenizer__ggml__merges=((V.ARRAY, V.STRING), merges))
    with pytest.raises(ValueError, match=match):
        load_model(path)


@pytest.mark.parametrize("key, types, value, match", [
    ("tokenizer.ggml.bos_token_id", V.STRING, "x", r"bos_token_id = 'x': must be a token id in \[0, 259\)"),
    ("tokenizer.ggml.eos_token_id", V.UINT32, 259, r"eos_token_id = 259: must be a token id in \[0, 259\)"),
    ("tokenizer.ggml.token_type", (V.ARRAY, V.INT32), [1, 2], r"token_type = array of 2 int32: must be an array "
                                                                r"of 259 integers"),
    ("tokenizer.chat_template", V.UINT32, 5, r"tokenizer.chat_template = 5: must be a string"),
])
def test_gguf_bad_tokenizer_metadata_names_the_key(tmp_path, base_parts, key, types, value, match):
    with pytest.raises(ValueError, match=match):
        load_model(edited_gguf(tmp_path, base_parts, **{key.replace(".", "__"): (types, value)}))


# HF folders


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory) -> Path:
    return write_hf_folder(tmp_path_factory.mktemp("hf") / "tiny-hf", tiny_model(seed=1))


def test_hf_junk_tokenizer_json_is_rejected(tmp_path, hf_base):
    for junk in ("not json", "{}", '{"model": {"type": "BPE", "vocab": 5}}'):
        folder = hf_copy(tmp_path / str(len(junk)), hf_base, tokenizer__json=junk)
        with pytest.raises(ValueError, match=r"tokenizer.json: not a valid tokenizer.json: "):
            load_model(folder)


def test_hf_bad_tokenizer_config_names_the_key(tmp_path, hf_base):
    for content, match in (('{"bos_token": 5}', r"tokenizer_config.json: bos_token = 5: must be a token string"),
                           ('{"chat_template": 5}', r"tokenizer_config.json: chat_template = 5: must be a string"),
                           ("[]", r"tokenizer_config.json: \(the whole file\) = \[\]: must be a JSON object")):
        folder = hf_copy(tmp_path / str(len(list(tmp_path.iterdir()))), hf_base, tokenizer_config__json=content)
        with pytest.raises(ValueError, match=match):
            load_model(folder)


# chat templates


def test_chat_template_of_a_gguf_names_the_file_in_errors(tmp_path, base_parts):
    path = edited_gguf(tmp_path, base_parts, tokenizer__chat_template=(V.STRING, "{% for %}"))
    _, tokenizer = load_model(path)
    with pytest.raises(ValueError, match=r"edited.gguf: chat template: TemplateSyntaxError: .*\(line 1\)"):
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
