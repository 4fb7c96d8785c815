"""Generation: greedy vs full recomputation, batches with left padding, sampling, stop, streaming, CLI."""

from __future__ import annotations

import pytest
import torch
from conftest import float32_logits_atol
from tiny_llama import tiny_backend_tokenizer, tiny_model, write_gguf

from ropekit.cli import main
from ropekit.loading.tokenizer import Tokenizer
from ropekit.model.generate import TextStream, generate, generate_ids, sample_next, stream_generate


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=3)


@pytest.fixture(scope="module")
def tokenizer():
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return Tokenizer(tiny_backend_tokenizer(), bos_token_id=1, eos_token_id=2, chat_template=template)


def greedy_by_recomputation(model, prompt: list[int], n: int) -> list[int]:
    """The oracle: rerun the whole sequence without a cache for every new token."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def test_greedy_with_cache_equals_recomputation(model):
    prompt = [5, 17, 99, 3, 250]
    tokens = [int(t[0]) for t in generate_ids(model, [prompt], max_new_tokens=12)]
    assert tokens == greedy_by_recomputation(model, prompt, 12)


@pytest.mark.parametrize("spec", ["self-extend:group=2,window=8", "rerope:window=8", "leaky-rerope:window=8,k=2",
                                  "dynamic:factor=2+consistent", "yarn:factor=2"])
def test_bfloat16_decoding_with_every_variant_follows_recomputation(tmp_path, spec):
    """In bfloat16 the fused decode step hands the attention a float32 q and a bfloat16 cache: every
    variant rotates and rounds once and decodes (this used to fail with a dtype mismatch), and its
    step logits match a full recomputation in bfloat16 to bfloat16 rounding."""
    from ropekit.loading import load_model
    from ropekit.model import patch

    path = write_gguf(tmp_path / "tiny.gguf", tiny_model(seed=3))
    bf16, _ = load_model(path, dtype="bfloat16")
    patch(bf16, spec)
    prompt = list(range(5, 45))
    tokens = [int(t[0]) for t in generate_ids(bf16, [prompt], max_new_tokens=4)]
    with torch.no_grad():
        full = bf16(torch.tensor([prompt + tokens[:3]]))[0, -4:].float()  # [4, V]: the logits of each step
    picked = full.gather(1, torch.tensor(tokens)[:, None])[:, 0]
    # each cached step's token is (within bfloat16 rounding, ~2^-8 relative) the recomputation's best one
    assert torch.all(picked >= full.max(dim=1).values - 0.05 * full.abs().max()), (tokens, full.argmax(1).tolist())


def test_left_padded_batch_generates_like_each_row_alone(model):
    prompts = [[5, 17, 99, 3, 250, 8, 9], [40], [7, 7, 7]]
    rows = list(zip(*[t.tolist() for t in generate_ids(model, prompts, max_new_tokens=10)], strict=True))
    for prompt, row in zip(prompts, rows, strict=True):
        assert list(row) == [int(t[0]) for t in generate_ids(model, [prompt], max_new_tokens=10)]


def test_stop_on_eos_per_row(model):
    prompt = [5, 17, 99]
    free = greedy_by_recomputation(model, prompt, 6)
    stop = free[2]  # pretend the third token is EOS
    tokens = [t.tolist() for t in generate_ids(model, [prompt, prompt], max_new_tokens=6, stop_ids={stop})]
    first_stop = free.index(stop)
    assert [t[0] for t in tokens] == free[:first_stop + 1]  # the stop token is yielded, then nothing


def test_seeded_sampling_is_repeatable(model):
    draw = lambda seed: [int(t[0]) for t in generate_ids(  # noqa: E731
        model, [[5, 6]], max_new_tokens=20, temperature=1.5, seed=seed)]
    assert draw(1) == draw(1)
    assert draw(1) != draw(2)


def test_top_k_one_and_tiny_top_p_are_greedy(model):
    greedy = [int(t[0]) for t in generate_ids(model, [[5, 6]], max_new_tokens=8)]
    for options in ({"top_k": 1}, {"top_p": 1e-6}):
        sampled = [int(t[0]) for t in generate_ids(model, [[5, 6]], max_new_tokens=8, temperature=1.0, seed=0,
                                                   **options)]
        assert sampled == greedy, options


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(2000, 4)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, temperature=1.0, top_k=2, generator=g).tolist()) == {0, 1}
    # top_p 0.7: 0.5 alone is short of 0.7, 0.5 + 0.3 reaches it, so tokens {0, 1} remain.
    assert set(sample_next(logits, temperature=1.0, top_p=0.7, generator=g).tolist()) == {0, 1}
    assert set(sample_next(logits, temperature=1.0, top_p=0.9, generator=g).tolist()) == {0, 1, 2}


def test_streaming_pieces_join_to_the_result(model, tokenizer):
    pieces = []
    text = generate(model, tokenizer, "Hi", max_new_tokens=12, stream=pieces.append)
    assert "".join(pieces) == text
    assert "".join(stream_generate(model, tokenizer, "Hi", max_new_tokens=12)) == text


def test_text_stream_holds_back_split_utf8(tokenizer):
    stream = TextStream(tokenizer)
    first, second = tokenizer.encode("é")  # two byte tokens
    assert stream.push(first) == ""
    assert stream.push(second) == "é"


def test_batch_generate_returns_a_list(model, tokenizer):
    outs = generate(model, tokenizer, ["Hello", "A"], max_new_tokens=5)
    assert outs == [generate(model, tokenizer, "Hello", max_new_tokens=5),
                    generate(model, tokenizer, "A", max_new_tokens=5)]


def test_chat_uses_the_template(model, tokenizer):
    rendered = tokenizer.encode("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    expected = [int(t[0]) for t in generate_ids(model, [rendered], max_new_tokens=6,
                                                stop_ids=tokenizer.stop_token_ids)]
    expected = [t for t in expected if t not in tokenizer.stop_token_ids]
    assert generate(model, tokenizer, "Hi", chat=True, max_new_tokens=6) == tokenizer.decode(expected)


@pytest.mark.parametrize("kwargs, match", [
    ({"prompt": ""}, "empty prompt"),
    ({"prompt": "a long prompt", "max_length": 4}, "longer than the KV cache"),
    ({"prompt": ["a", "b"], "stream": print}, "single prompt"),
    ({"prompt": "a", "temperature": -1.0}, "temperature"),
    ({"prompt": "a", "temperature": float("nan")}, "temperature must be a finite number"),
    ({"prompt": "a", "seed": -1, "temperature": 1.0}, r"seed must be an integer in \[0, 2\*\*64\)"),
    ({"prompt": "a", "top_p": 0.0}, "top_p"),
])
def test_generation_errors(model, tokenizer, kwargs, match):
    prompt = kwargs.pop("prompt")
    with pytest.raises(ValueError, match=match):
        generate(model, tokenizer, prompt, **kwargs)


# ---------------------------------------------------------------- CLI


def test_cli_generate_and_info_on_a_gguf(tmp_path, capsys):
    path = write_gguf(tmp_path / "tiny.gguf", tiny_model(seed=3))
    assert main(["generate", "Hi", "--model", str(path), "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.endswith("\n")
    assert main(["info", "--model", str(path), "--rope", "yarn", "--factor", "2"]) == 0
    out = capsys.readouterr().out
    assert "rope type" in out and "yarn" in out and "heads (q / kv)    4 / 2" in out


@pytest.mark.parametrize("argv, match", [
    (["generate", "Hi", "--model", "no-such-model"], "unknown model name"),
    (["generate", "", "--model", "TINY"], "empty prompt"),
    (["info", "--model", "TINY", "--factor", "2"], "need --rope"),
    (["info", "--model", "TINY", "--rope", "warp"], "unknown rope_type"),
])
def test_cli_bad_input_exits_2_with_a_message(tmp_path, capsys, argv, match):
    path = write_gguf(tmp_path / "tiny.gguf", tiny_model())
    argv = [str(path) if a == "TINY" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err


# ---------------------------------------------------------------- SmolLM2


@pytest.mark.slow
def test_smollm2_generates_text(smollm2):
    import ropekit.model.generate as gen

    model, tokenizer = smollm2
    text = gen.generate(model, tokenizer, "Once upon a time", max_new_tokens=16)
    assert len(text.split()) >= 8
    answer = gen.generate(model, tokenizer, "What is the capital of France?", chat=True, max_new_tokens=16)
    assert "Paris" in answer


@pytest.mark.slow
def test_smollm2_left_padded_batch_equals_rows_alone(smollm2):
    """Real-model version of the padding invariant (different matmul shapes, same maths: the rounding bound)."""
    model, tokenizer = smollm2
    from ropekit.model.generate import left_pad

    short = tokenizer.encode("Mr. Bennet")
    long = tokenizer.encode("It is a truth universally acknowledged, that a single man")
    ids, mask = left_pad([long, short], tokenizer.pad_token_id)
    with torch.no_grad():
        batch = model(ids, attention_mask=mask)
        alone = model(torch.tensor([short]))
    cfg = model.config
    atol = float32_logits_atol(alone, cfg.num_hidden_layers, cfg.intermediate_size)
    torch.testing.assert_close(batch[1, -len(short):], alone[0], atol=atol, rtol=0)
