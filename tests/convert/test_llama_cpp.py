"""ropekit convert against llama.cpp itself (through llama-cpp-python): the settings ropekit prints, run by
llama.cpp, give the logits ropekit's engine gives for the same method.

The translations are checked on a tiny random model written as an F32 GGUF (2 layers, head dim 32,
trained length 128) over a 512-token window, four times its trained length: both runtimes then
compute in float32 from the same weights (llama.cpp with float32 K/V caches), so every logit must
agree to 1e-3 of the largest one, while a wrong translation (the factor passed where llama.cpp wants
1/factor, or no scaling at all) moves logits by about their own size. Each method is run twice:
with the flags ``convert --to llama.cpp`` prints (as llama-cpp-python's constructor arguments) and
with the GGUF ``convert --to gguf --out`` writes and no flags. A window past the trained length
makes every part of a translation count (frequencies, the attention factor, the original length),
and comparing logits instead of a perplexity makes the check exact where a perplexity would need
tokens 8,192 and beyond of a real model to tell a translation from none.

The real model is checked too: SmolLM2's tokenizer and llama.cpp's agree on the evaluation text,
and llama.cpp's perplexity of the quantised SmolLM2 (Q4_1 weights; llama.cpp multiplies them with
8-bit activations and keeps an f16 KV cache) agrees with ropekit's within 2%.
"""

from __future__ import annotations

import ctypes
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_llama import tiny_model, write_gguf

from ropekit.cli import main
from ropekit.eval.perplexity import evaluate_perplexity
from ropekit.eval.runners import EngineRunner
from ropekit.model import patch
from ropekit.rope import RopeConfig
from ropekit.rope.formats import to_llama_cpp_python

TRAINED, WINDOW = 128, 512  # the tiny model's trained length; the window, 4x past it
SPECS = ["none", "linear:factor=4", "yarn:factor=4", "yarn:factor=4,beta_fast=16,beta_slow=2",
         "ntk:factor=4"]
FROM_FILE = dict(rope_scaling_type=-1, rope_freq_base=0.0, rope_freq_scale=0.0, yarn_ext_factor=-1.0,
                 yarn_attn_factor=-1.0, yarn_beta_fast=-1.0, yarn_beta_slow=-1.0, yarn_orig_ctx=0)
GGML_TYPE_F32 = 0
# llama.cpp forms rope angles in float32 (position * theta: ~6e-5 rad off at position 512) and sums in
# another order; 1e-3 of the largest logit leaves 10x room above that and is 1000x below a mistranslation.
RELATIVE_ATOL = 1e-3
SMOLLM2_TOKENS = 2048

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llama_cpp():
    try:
        import llama_cpp
    except ImportError as err:
        pytest.fail(f"llama-cpp-python is needed (the [test] extra builds it: see the README's test command): {err}")
    return llama_cpp


_LOG_CALLBACKS: list = []


class LogLines:
    """llama.cpp's log (its model and context settings) through llama_log_set."""

    def __init__(self, llama_cpp):
        self.lines: list[str] = []

        @llama_cpp.llama_log_callback
        def callback(level, text, user_data):
            self.lines.append(text.decode("utf-8", "replace"))

        # llama.cpp keeps calling the last callback it was given, after this object is gone: keep every one
        # alive for the whole session (a freed ctypes callback is a crash at the next log line)
        _LOG_CALLBACKS.append(callback)
        llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))

    def value(self, name: str) -> str | None:
        found = re.findall(rf"^print_info:\s+{re.escape(name)}\s*=\s*(.+?)\s*$", "".join(self.lines), re.M)
        return found[-1] if found else None


# ---- the translations, on a tiny F32 model: logits element by element ---------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model, its F32 GGUF, a 512-token window of ids [1, 512])."""
    model = tiny_model(hidden_size=128, head_dim=32, max_position_embeddings=TRAINED)
    path = write_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf", model, merges=["a b"])
    ids = torch.randint(3, model.config.vocab_size, (1, WINDOW), generator=torch.Generator().manual_seed(0))
    return model, path, ids


def llama_cpp_logits(llama_cpp, path: Path, ids: torch.Tensor, **kwargs) -> np.ndarray:
    """llama.cpp's logits ``[T, V]`` for one window of ids (one batch, float32 K/V caches)."""
    T = ids.shape[1]
    llm = llama_cpp.Llama(str(path), n_ctx=T, n_batch=T, n_ubatch=T, n_threads=2, n_threads_batch=2,
                          logits_all=True, verbose=False, flash_attn=False, type_k=GGML_TYPE_F32,
                          type_v=GGML_TYPE_F32, **{**FROM_FILE, **kwargs})
    try:
        llm._batch.set_batch(batch=ids[0].tolist(), n_past=0, logits_all=True)
        llm._ctx.decode(llm._batch)
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(T, llm.n_vocab())).copy()
    finally:
        llm.close()


def engine_logits(model, spec: str, ids: torch.Tensor) -> np.ndarray:
    base = model.config.rope
    try:
        patch(model, spec, base)
        with torch.no_grad():
            return model(ids)[0].numpy()
    finally:
        patch(model, "none", base)


def assert_logits_agree(ours: np.ndarray, theirs: np.ndarray, what: str) -> None:
    diff = np.abs(ours - theirs)
    atol = RELATIVE_ATOL * float(np.abs(ours).max())
    print(f"{what}: max |diff| {diff.max():.2e}, mean {diff.mean():.2e}, atol {atol:.2e}")
    assert diff.max() <= atol, f"{what}: max |diff| {diff.max():.3g} > {atol:.3g} (mean {diff.mean():.3g})"


@pytest.mark.parametrize("spec", SPECS)
def test_printed_flags_run_in_llama_cpp_give_ropekit_logits(llama_cpp, tiny, spec, capsys):
    model, path, ids = tiny
    assert main(["convert", "--model", str(path), "--method", spec, "--to", "llama.cpp"]) == 0
    printed = capsys.readouterr().out.strip()
    base = model.config.rope
    rope = RopeConfig.from_llama_cpp(printed, base)  # the printed line reads back as the method
    expected = base.with_rope_type(spec)
    assert torch.equal(rope.frequencies()[0], expected.frequencies()[0])
    kwargs = {k: v for k, v in to_llama_cpp_python(expected).items() if k != "n_ctx"}
    assert_logits_agree(engine_logits(model, spec, ids), llama_cpp_logits(llama_cpp, path, ids, **kwargs),
                        f"flags {spec}")


@pytest.mark.parametrize("spec", ["linear:factor=4", "yarn:factor=4", "ntk:factor=4"])
def test_rewritten_gguf_runs_in_llama_cpp_with_no_flags(llama_cpp, tiny, spec, tmp_path):
    model, path, ids = tiny
    out = tmp_path / "new.gguf"
    assert main(["convert", "--model", str(path), "--method", spec, "--to", "gguf", "--out", str(out)]) == 0
    log = LogLines(llama_cpp)
    theirs = llama_cpp_logits(llama_cpp, out, ids)  # every rope setting from the file
    assert_logits_agree(engine_logits(model, spec, ids), theirs, f"rewritten gguf {spec}")
    # what llama.cpp itself reports reading from the file
    if not spec.startswith("ntk"):
        assert log.value("n_ctx_train") == str(4 * TRAINED)
        assert log.value("freq_scale_train") == "0.25"
        assert log.value("rope scaling") == spec.split(":")[0]
    if spec.startswith("yarn"):
        assert log.value("n_ctx_orig_yarn") == str(TRAINED)


@pytest.mark.parametrize(("wrong", "change"), [
    ("the factor where llama.cpp wants 1/factor", {"rope_freq_scale": 4.0}),
    ("no scaling at all", {"rope_scaling_type": 0, "rope_freq_scale": 1.0}),
])
def test_a_wrong_translation_is_far_off(llama_cpp, tiny, wrong, change):
    model, path, ids = tiny
    kwargs = {k: v for k, v in to_llama_cpp_python(model.config.rope.with_rope_type("yarn:factor=4")).items()
              if k != "n_ctx"}
    ours = engine_logits(model, "yarn:factor=4", ids)
    theirs = llama_cpp_logits(llama_cpp, path, ids, **{**kwargs, **change})
    diff = float(np.abs(ours - theirs).max())
    print(f"wrong translation ({wrong}): max |diff| {diff:.3g} against yarn:factor=4")
    assert diff > 100 * RELATIVE_ATOL * float(np.abs(ours).max()), f"{wrong}: max |diff| only {diff:.3g}"


# ---- the real model: tokenizer and the quantised path ---------------------------------------------


def _nll_rows(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    top = x.max(axis=1, keepdims=True)
    return top[:, 0] + np.log(np.exp(x - top).sum(axis=1)) - x[np.arange(len(x)), targets]


@pytest.fixture(scope="module")
def tokens(llama_cpp, smollm2, smollm2_path):
    from conftest import eval_text

    _, tokenizer = smollm2
    text = eval_text()[:100_000]
    ours = tokenizer.encode(text)[:SMOLLM2_TOKENS]
    llm = llama_cpp.Llama(str(smollm2_path), n_ctx=256, vocab_only=True, verbose=False)
    theirs = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)[:SMOLLM2_TOKENS]
    llm.close()
    assert ours == theirs, "ropekit's tokenizer and llama.cpp's disagree on the evaluation text"
    return ours


def test_smollm2_perplexity_in_llama_cpp_equals_ropekit(llama_cpp, smollm2, smollm2_path, tokens):
    """The quantised real model: llama.cpp's perplexity over 2,048 tokens within 2% of ropekit's."""
    llm = llama_cpp.Llama(str(smollm2_path), n_ctx=len(tokens), n_batch=512, n_ubatch=512, n_threads=2,
                          n_threads_batch=2, logits_all=True, verbose=False, flash_attn=False, **FROM_FILE)
    try:
        n, vocab, ids = len(tokens), llm.n_vocab(), np.asarray(tokens)
        nll = np.empty(n - 1)
        for i in range(0, n, llm.n_batch):
            batch = tokens[i:i + llm.n_batch]
            llm._batch.set_batch(batch=batch, n_past=i, logits_all=True)
            llm._ctx.decode(llm._batch)
            logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(len(batch), vocab))
            lo, hi = i + 1, min(i + len(batch), n - 1)  # row r predicts token i + r + 1
            if hi >= lo:
                nll[lo - 1:hi] = _nll_rows(logits[: hi - lo + 1], ids[lo:hi + 1])
    finally:
        llm.close()
    theirs = math.exp(nll.mean())
    model, tokenizer = smollm2
    ours = evaluate_perplexity(EngineRunner(model, tokenizer), torch.tensor(tokens), len(tokens),
                               trained=model.config.max_position_embeddings)["ppl"]
    print(f"SmolLM2 Q4_1, {len(tokens)} tokens: llama.cpp ppl {theirs:.3f}, ropekit {ours:.3f}, "
          f"ratio {theirs / ours:.4f}")
    assert theirs == pytest.approx(ours, rel=0.02), f"llama.cpp {theirs:.3f}, ropekit {ours:.3f}"
