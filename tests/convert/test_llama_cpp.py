"""ropekit convert against llama.cpp itself (through llama-cpp-python): the settings ropekit prints, run by
llama.cpp on the embedded SmolLM2 GGUF, give the perplexity ropekit's engine gives for the same spec.

One 4,096-token window of Pride and Prejudice, for ``none``, ``linear:factor=2`` and ``yarn:factor=2``
(with and without explicit betas), each stated with an original context of 2,048 tokens: once with the
flags ``convert --to llama.cpp`` prints (as llama-cpp-python's constructor arguments), once with the GGUF
``convert --to gguf --out`` writes and no flags. A translation acts on the frequencies, the attention
factor and the original length; with the original length at 2,048 the second half of the window lies
beyond it, so a short window tests every one of them as a 12,000-token window past SmolLM2's own
8,192 does, at a ninth of the attention cost. Both runtimes compute from the same Q4_1 weights
(ropekit dequantises them exactly; llama.cpp multiplies them with 8-bit activations and keeps an f16
KV cache), so the perplexity beyond 2,048 must agree within 2%, while the classic wrong translation
(the factor passed where llama.cpp wants 1/factor) is far off. Slow: ~10-30 s per llama.cpp evaluation.
"""

from __future__ import annotations

import ctypes
import math
import re

import numpy as np
import pytest
import torch

from ropekit.cli import main
from ropekit.eval.perplexity import evaluate_perplexity
from ropekit.eval.runners import EngineRunner
from ropekit.rope import RopeConfig
from ropekit.rope.formats import to_llama_cpp_python

N_TOKENS, ORIGINAL = 4096, 2048  # window; the original context every spec below states
_ORIG = f"original_max_position_embeddings={ORIGINAL}"
SPECS = ["none", f"linear:factor=2,{_ORIG}", f"yarn:factor=2,{_ORIG}",
         f"yarn:factor=2,beta_fast=32,beta_slow=1,{_ORIG}"]
FROM_FILE = dict(rope_scaling_type=-1, rope_freq_base=0.0, rope_freq_scale=0.0, yarn_ext_factor=-1.0,
                 yarn_attn_factor=-1.0, yarn_beta_fast=-1.0, yarn_beta_slow=-1.0, yarn_orig_ctx=0)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llama_cpp():
    try:
        import llama_cpp
    except ImportError as err:
        pytest.fail(f"llama-cpp-python is needed (the [test] extra builds it: see the README's test command): {err}")
    return llama_cpp


class LogLines:
    """llama.cpp's log (its model and context settings) through llama_log_set."""

    def __init__(self, llama_cpp):
        self.lines: list[str] = []

        @llama_cpp.llama_log_callback
        def callback(level, text, user_data):
            self.lines.append(text.decode("utf-8", "replace"))

        self._callback = callback  # a ctypes callback must outlive its use in C
        llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))

    def value(self, name: str) -> str | None:
        found = re.findall(rf"^print_info:\s+{re.escape(name)}\s*=\s*(.+?)\s*$", "".join(self.lines), re.M)
        return found[-1] if found else None


def _nll_rows(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    top = x.max(axis=1, keepdims=True)
    return top[:, 0] + np.log(np.exp(x - top).sum(axis=1)) - x[np.arange(len(x)), targets]


def llama_cpp_beyond(llama_cpp, path, tokens: list[int], **kwargs) -> float:
    """Perplexity of tokens at positions >= ORIGINAL of one window, computed by llama.cpp (streamed per batch)."""
    llm = llama_cpp.Llama(str(path), n_ctx=len(tokens), n_batch=512, n_ubatch=512, n_threads=2, n_threads_batch=2,
                          logits_all=True, verbose=False, flash_attn=False, **{**FROM_FILE, **kwargs})
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
    return math.exp(nll[np.arange(1, n) >= ORIGINAL].mean())


@pytest.fixture(scope="module")
def tokens(llama_cpp, smollm2, smollm2_path):
    from conftest import eval_text

    _, tokenizer = smollm2
    text = eval_text()[:100_000]
    ours = tokenizer.encode(text)[:N_TOKENS]
    llm = llama_cpp.Llama(str(smollm2_path), n_ctx=256, vocab_only=True, verbose=False)
    theirs = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)[:N_TOKENS]
    llm.close()
    assert ours == theirs, "ropekit's tokenizer and llama.cpp's disagree on the evaluation text"
    return ours


_ENGINE: dict[str, float] = {}


def engine_beyond(smollm2, tokens: list[int], spec: str) -> float:
    if spec not in _ENGINE:
        model, tokenizer = smollm2
        runner = EngineRunner(model, tokenizer)
        try:
            runner.use(spec)
            _ENGINE[spec] = evaluate_perplexity(runner, torch.tensor(tokens), N_TOKENS, trained=ORIGINAL)["ppl_beyond"]
        finally:
            runner.use("none")
    return _ENGINE[spec]


def base_rope(smollm2) -> RopeConfig:
    return smollm2[0].config.rope


@pytest.mark.parametrize("spec", SPECS)
def test_printed_flags_run_in_llama_cpp_give_ropekit_perplexity(llama_cpp, smollm2, smollm2_path, tokens, spec,
                                                                capsys):
    assert main(["convert", "--model", str(smollm2_path), "--method", spec, "--to", "llama.cpp"]) == 0
    printed = capsys.readouterr().out.strip()
    rope = RopeConfig.from_llama_cpp(printed, base_rope(smollm2))  # the printed line reads back as the spec
    expected = base_rope(smollm2).with_rope_type(spec)
    assert torch.equal(rope.frequencies()[0], expected.frequencies()[0])
    kwargs = {k: v for k, v in to_llama_cpp_python(expected).items() if k != "n_ctx"}
    ours, theirs = engine_beyond(smollm2, tokens, spec), llama_cpp_beyond(llama_cpp, smollm2_path, tokens, **kwargs)
    print(f"flags {spec}: llama.cpp ppl beyond {ORIGINAL} {theirs:.3f}, ropekit {ours:.3f}, ratio {theirs / ours:.4f}")
    assert theirs == pytest.approx(ours, rel=0.02), f"{spec}: llama.cpp {theirs:.3f}, ropekit {ours:.3f}"


@pytest.mark.parametrize("spec", [f"linear:factor=2,{_ORIG}", f"yarn:factor=2,{_ORIG}"])
def test_rewritten_gguf_runs_in_llama_cpp_with_no_flags(llama_cpp, smollm2, smollm2_path, tokens, spec, tmp_path):
    out = tmp_path / "new.gguf"
    assert main(["convert", "--model", str(smollm2_path), "--method", spec, "--to", "gguf", "--out", str(out)]) == 0
    log = LogLines(llama_cpp)
    theirs = llama_cpp_beyond(llama_cpp, out, tokens)  # every rope setting from the file
    ours = engine_beyond(smollm2, tokens, spec)
    print(f"rewritten gguf {spec}: llama.cpp ppl beyond {ORIGINAL} {theirs:.3f}, ropekit {ours:.3f}, "
          f"ratio {theirs / ours:.4f}")
    assert theirs == pytest.approx(ours, rel=0.02), f"{spec}: llama.cpp {theirs:.3f}, ropekit {ours:.3f}"
    # what llama.cpp itself reports reading from the file
    assert log.value("n_ctx_train") == str(2 * ORIGINAL)
    assert log.value("freq_scale_train") == "0.5"
    assert log.value("freq_base_train") == "100000.0"
    assert log.value("rope scaling") == spec.split(":")[0]
    if spec.startswith("yarn"):
        assert log.value("n_ctx_orig_yarn") == str(ORIGINAL)


def test_a_wrong_translation_is_far_off(llama_cpp, smollm2, smollm2_path, tokens):
    """The factor where llama.cpp wants 1/factor (freq_scale 2 instead of 0.5): far from ropekit's YaRN."""
    kwargs = to_llama_cpp_python(base_rope(smollm2).with_rope_type(SPECS[2]))
    kwargs = {**{k: v for k, v in kwargs.items() if k != "n_ctx"}, "rope_freq_scale": 2.0}
    wrong, ours = llama_cpp_beyond(llama_cpp, smollm2_path, tokens, **kwargs), engine_beyond(smollm2, tokens, SPECS[2])
    print(f"wrong translation (freq_scale 2): llama.cpp {wrong:.2f}, ropekit {SPECS[2]} {ours:.3f}")
    assert wrong > 2 * ours, f"wrong translation {wrong:.2f} vs ropekit {ours:.2f}"
