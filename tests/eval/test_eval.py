"""Evaluation harness: perplexity protocols against direct cross-entropy, window plans, passkey
prompts and scoring, resumable sweeps, the CLI contract; and one real-model check of the seed's
claim (past the trained length plain RoPE breaks down, YaRN does not)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from tiny_llama import tiny_model, write_hf_folder

from ropekit.eval import passkey as pk
from ropekit.eval import perplexity as pp
from ropekit.eval import sweep as sw
from ropekit.eval.results import ResultStore
from ropekit.model import patch


@pytest.fixture(scope="module")
def model():
    return tiny_model(max_position_embeddings=32)


def tokens(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 250, (n,), generator=torch.Generator().manual_seed(seed))


def direct_nll(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits = model(ids[None])[0]
    return F.cross_entropy(logits[:-1], ids[1:], reduction="none").double()


def test_window_nll_equals_cross_entropy_of_full_logits(model):
    ids = tokens(70)
    torch.testing.assert_close(pp.window_nll(model, ids, logit_chunk=16), direct_nll(model, ids),
                               rtol=1e-5, atol=1e-5)


def test_single_window_perplexity_and_split(model):
    ids = tokens(100)
    r = pp.evaluate_perplexity(model, ids, 64, trained=32, segment=16)
    nll = direct_nll(model, ids[:64])  # targets at positions 1..63
    assert r["tokens_scored"] == 63 and r["tokens_in_window"] == 31 and r["tokens_beyond"] == 32
    assert r["ppl"] == pytest.approx(math.exp(nll.mean()), rel=1e-5)
    assert r["ppl_in_window"] == pytest.approx(math.exp(nll[:31].mean()), rel=1e-5)
    assert r["ppl_beyond"] == pytest.approx(math.exp(nll[31:].mean()), rel=1e-5)
    assert [s["tokens"] for s in r["segments"]] == [15, 16, 16, 16]
    assert r["segments"][2]["ppl"] == pytest.approx(math.exp(nll[31:47].mean()), rel=1e-5)
    assert r["peak_mem_mb"] > 0 and r["seconds"] >= 0


def test_in_window_only_has_null_beyond(model):
    r = pp.evaluate_perplexity(model, tokens(40), 20, trained=32)
    assert r["ppl_beyond"] is None and r["tokens_beyond"] == 0


def test_several_single_windows_average_per_token(model):
    ids = tokens(100)
    r = pp.evaluate_perplexity(model, ids, 30, trained=32, windows=3)
    nll = torch.cat([direct_nll(model, ids[i * 30:(i + 1) * 30]) for i in range(3)])
    assert r["tokens_scored"] == 87 and r["ppl"] == pytest.approx(math.exp(nll.mean()), rel=1e-5)


@pytest.mark.parametrize("n,length,stride", [(100, 32, 8), (37, 32, 5), (10, 32, 4),
                                              (64, 16, 7), (100, 32, 31)])
def test_sliding_plan_scores_every_token_once(n, length, stride):
    plan = pp.plan_windows(n, length, "sliding", stride)
    scored = [begin + w for begin, end, first in plan for w in range(first, end - begin)]
    assert sorted(scored) == list(range(1, n))
    assert all(end - begin <= length for begin, end, _ in plan)


def test_sliding_with_stride_equal_to_length_is_disjoint_windows():
    """Each window's first token has no context inside its window, so it is not scored."""
    plan = pp.plan_windows(100, 32, "sliding", 32)
    assert plan == [(0, 32, 1), (32, 64, 1), (64, 96, 1), (96, 100, 1)]


def test_sliding_perplexity_equals_direct_windows(model):
    ids, L, S = tokens(90, seed=3), 40, 16
    r = pp.evaluate_perplexity(model, ids, L, trained=32, protocol="sliding", stride=S)
    total, count, prev_end = 0.0, 0, 0
    for begin in range(0, 90, S):
        end = min(begin + L, 90)
        nll = direct_nll(model, ids[begin:end])
        first = max(1, prev_end - begin)
        total, count = total + float(nll[first - 1:].sum()), count + len(nll[first - 1:])
        prev_end = end
        if end == 90:
            break
    assert r["tokens_scored"] == count == 89
    assert r["ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_sliding_reference_scores_the_text_after_the_trained_length(model):
    """ppl_text_beyond of a sliding run at the trained length = the mean NLL of text tokens >= trained,
    each scored in its own window; segments are by text index in the sliding protocol."""
    ids, L, S, trained = tokens(96, seed=5), 32, 16, 32
    r = pp.evaluate_perplexity(model, ids, L, trained=trained, protocol="sliding", stride=S, segment=32)
    by_token = {}
    for begin in range(0, 96 - L + 1, S):  # windows [0,32), [16,48), ...: token j scored once, first time seen
        nll = direct_nll(model, ids[begin:begin + L])  # entry w-1: token begin+w
        for w in range(1, L):
            by_token.setdefault(begin + w, float(nll[w - 1]))
    beyond = [v for j, v in by_token.items() if j >= trained]
    assert r["ppl_beyond"] is None and r["segments_by"] == "text"
    assert r["ppl_text_beyond"] == pytest.approx(math.exp(sum(beyond) / len(beyond)), rel=1e-5)
    seg2 = [v for j, v in by_token.items() if 64 <= j < 96]
    assert r["segments"][2]["start"] == 64 and r["segments"][2]["tokens"] == len(seg2) == 32
    assert r["segments"][2]["ppl"] == pytest.approx(math.exp(sum(seg2) / 32), rel=1e-5)
    single = pp.evaluate_perplexity(model, ids[:64], 64, trained=trained)
    assert single["ppl_text_beyond"] == pytest.approx(single["ppl_beyond"], rel=1e-12)


@pytest.mark.parametrize("args", [(100, 1, "single"), (100, 64, "single", None, 2), (100, 32, "nope"),
                                  (100, 32, "sliding", 0), (100, 32, "sliding", 33)])
def test_plan_rejects(args):
    with pytest.raises(ValueError):
        pp.plan_windows(*args)


class CharTokenizer:
    """One token per character (ids = code points), enough for prompt construction."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join(chr(i) for i in ids)


@pytest.mark.parametrize("length,depth", [(2000, 0.0), (2000, 0.5), (3333, 1.0), (700, 0.25)])
def test_passkey_prompt_structure(length, depth):
    tok = CharTokenizer()
    ids = pk.passkey_prompt(tok, length, depth, 12345)
    text = tok.decode(ids)
    assert len(ids) <= length and len(ids) > length - len(pk.FILLER) - 2
    lines = text.split("\n")
    assert lines[0] == pk.TASK and lines[2] == pk.KEY_LINE.format(key=12345) and lines[4] == pk.QUESTION
    before, after = lines[1].count(pk.FILLER), lines[3].count(pk.FILLER)
    assert before == round(depth * (before + after))


def test_passkey_prompt_too_short():
    with pytest.raises(ValueError):
        pk.passkey_prompt(CharTokenizer(), 100, 0.5, 12345)


def test_trial_keys_are_seeded_five_digit_and_method_independent():
    keys = pk.trial_keys(0, 6000, 0.5, 20)
    assert keys == pk.trial_keys(0, 6000, 0.5, 20) and keys != pk.trial_keys(1, 6000, 0.5, 20)
    assert all(10000 <= k <= 99999 for k in keys)


@pytest.mark.parametrize("answer,ok", [(" 12345. Remember", True), ("12345", True), (" is 1234", False),
                                       (" 99 then 12345", False), (" none", False)])
def test_passkey_scoring_first_integer(monkeypatch, answer, ok):
    tok = CharTokenizer()
    monkeypatch.setattr(pk, "greedy", lambda model, ids, **options: tok.encode(answer))
    assert pk.run_trial(None, tok, 700, 0.5, 12345)["correct"] is ok


def test_greedy_matches_argmax_of_full_recompute(model):
    ids = tokens(20, seed=4).tolist()
    out = pk.greedy(model, ids, max_new_tokens=5)
    seq = list(ids)
    for _ in range(5):
        with torch.no_grad():
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert out == seq[20:]


def test_result_store_atomic_and_resumes(tmp_path):
    path = tmp_path / "results.json"
    store = ResultStore(path)
    cell = {"task": "passkey", "model": "m", "method": "none", "length": 10, "depth": 0.5, "trials": 1,
            "seed": 0}
    assert store.find(cell) is None
    store.add({**cell, "accuracy": 1.0})
    store.add({**cell, "accuracy": 0.0})  # same cell replaces
    assert json.loads(path.read_text()) == [{**cell, "accuracy": 0.0}]
    assert ResultStore(path).find(cell)["accuracy"] == 0.0
    assert not list(tmp_path.glob(".*tmp"))
    path.write_text("[{broken")
    with pytest.raises(ValueError):
        ResultStore(path)


METHODS = ["none", "yarn:factor=2", "self-extend:group=2,window=8", "leaky-rerope:window=8,k=4"]


def test_interrupted_sweep_resumes_without_recomputing(tmp_path, monkeypatch):
    model = tiny_model(max_position_embeddings=32)
    ids = tokens(200, seed=5)
    clean = sw.Sweeper(model, None, ResultStore(tmp_path / "clean.json"), model_name="tiny",
                       show_progress=False, log=lambda s: None)
    expected = clean.perplexity(ids, METHODS, [48, 64], text="t")

    real, calls = pp.evaluate_perplexity, []

    def flaky(*args, **kwargs):
        calls.append(args[2])
        if len(calls) == 5:
            raise KeyboardInterrupt  # interrupt in the middle of the 5th cell
        return real(*args, **kwargs)

    monkeypatch.setattr(sw, "evaluate_perplexity", flaky)
    path = tmp_path / "results.json"
    with pytest.raises(KeyboardInterrupt):
        sw.Sweeper(model, None, ResultStore(path), model_name="tiny", show_progress=False,
                   log=lambda s: None).perplexity(ids, METHODS, [48, 64], text="t")
    assert len(json.loads(path.read_text())) == 4  # four finished cells, valid JSON
    calls.clear()
    resumed = sw.Sweeper(model, None, ResultStore(path), model_name="tiny", show_progress=False,
                         log=lambda s: None).perplexity(ids, METHODS, [48, 64], text="t")
    assert len(calls) == 4  # only the unfinished cells ran
    assert [(r["method"], r["length"], r["ppl"]) for r in resumed] == \
        [(r["method"], r["length"], pytest.approx(r["ppl"], rel=1e-6)) for r in expected]
    assert len(json.loads(path.read_text())) == 8


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return write_hf_folder(tmp_path_factory.mktemp("tiny"), tiny_model(max_position_embeddings=64))


def test_cli_eval_perplexity_contract(tiny_folder, tmp_path):
    from ropekit.cli import main

    text = tmp_path / "text.txt"
    text.write_text("It is a truth universally acknowledged. " * 20)
    out = tmp_path / "out"
    argv = ["eval", "perplexity", "--model", str(tiny_folder), "--text", str(text), "--lengths", "48,96",
            "--method", "none", "--method", "yarn:factor=2+self-extend:group=2,window=16", "--out", str(out),
            "--no-progress"]
    assert main(argv) == 0
    records = json.loads((out / "results.json").read_text())
    assert len(records) == 4
    for r in records:
        for field in ("method", "length", "ppl", "ppl_in_window", "ppl_beyond", "tokens_scored", "seconds",
                      "peak_mem_mb"):
            assert field in r
        assert (r["ppl_beyond"] is None) == (r["length"] <= 64)
    assert {r["method"] for r in records} == {"none", "yarn:factor=2+self-extend:group=2,window=16"}
    for name in ("results.csv", "perplexity.png", "report.md"):
        assert (out / name).stat().st_size > 0
    assert main(argv) == 0  # everything cached: resumes instantly, same records
    assert len(json.loads((out / "results.json").read_text())) == 4
    # the trained-window reference: sliding windows of the trained length over the first 96 tokens
    assert main(["eval", "perplexity", "--model", str(tiny_folder), "--text", str(text), "--lengths", "64",
                 "--protocol", "sliding", "--stride", "32", "--max-tokens", "96", "--out", str(out),
                 "--no-progress"]) == 0
    (ref,) = [r for r in json.loads((out / "results.json").read_text()) if r.get("max_tokens") == 96]
    assert ref["tokens_scored"] == 95 and ref["ppl_beyond"] is None and ref["ppl_text_beyond"] > 1


def test_cli_eval_passkey_contract(tiny_folder, tmp_path):
    from ropekit.cli import main

    out = tmp_path / "keys"
    argv = ["eval", "passkey", "--model", str(tiny_folder), "--lengths", "300,400", "--depths", "0.1,0.9",
            "--trials", "2", "--seed", "3", "--method", "none", "--method", "rerope:window=64",
            "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    records = json.loads((out / "results.json").read_text())
    assert len(records) == 8
    for r in records:
        assert {"method", "length", "depth", "trials", "accuracy"} <= set(r) and r["trials"] == 2
        assert 0.0 <= r["accuracy"] <= 1.0
    assert (out / "passkey.png").stat().st_size > 0


@pytest.mark.parametrize("flags, passkey_cells", [([], 0), (["--passkey"], 3), (["--passkey", "--no-passkey"], 0)])
def test_cli_compare_runs_end_to_end(tiny_folder, tmp_path, monkeypatch, flags, passkey_cells):
    """The quick default is perplexity only (about 5 minutes on SmolLM2); --passkey adds one cell per method."""
    import ropekit.cli.compare
    from ropekit.cli import main

    monkeypatch.setattr(ropekit.cli.compare, "QUICK_PASSKEY_RATIO", 5.0)  # 320 tokens: the tiny model's prompt

    text = tmp_path / "text.txt"
    text.write_text("It is a truth universally acknowledged. " * 20)
    out = tmp_path / "cmp"
    assert main(["compare", "--model", str(tiny_folder), "--text", str(text), "--out", str(out),
                 "--no-progress", *flags]) == 0
    records = json.loads((out / "results.json").read_text())
    ppl = [r for r in records if "ppl" in r]
    keys = [r for r in records if "accuracy" in r]
    assert [r["length"] for r in ppl] == [128] * 3
    assert len(keys) == passkey_cells and all(r["length"] == 320 for r in keys)
    assert "| method |" in (out / "report.md").read_text()
    assert (out / "passkey.png").exists() == (passkey_cells > 0)


def test_cli_backends_agree_and_records_say_which_ran(tiny_folder, tmp_path):
    """The same folder on ropekit's engine and in transformers (patched by ropekit.hf): the same perplexity
    for plain RoPE, YaRN and Self-Extend; the records differ only by backend, so both are kept."""
    from ropekit.cli import main

    text = tmp_path / "text.txt"
    text.write_text("It is a truth universally acknowledged. " * 20)
    out = tmp_path / "both"
    methods = ["none", "yarn:factor=2", "self-extend:group=2,window=16"]
    for backend in ("ropekit", "transformers"):
        argv = ["eval", "perplexity", "--model", str(tiny_folder), "--text", str(text), "--lengths", "96",
                "--out", str(out), "--no-progress", "--backend", backend]
        assert main(argv + [arg for m in methods for arg in ("--method", m)]) == 0
    records = json.loads((out / "results.json").read_text())
    assert len(records) == 6
    by = {(r["backend"], r["method"]): r for r in records}
    for method in methods:
        ours, theirs = by["ropekit", method], by["transformers", method]
        assert (ours["dtype"], ours["device"]) == (theirs["dtype"], theirs["device"]) == ("float32", "cpu")
        assert ours["model_id"] == theirs["model_id"] and ours["model_id"].startswith("sha256:")
        assert theirs["ppl"] == pytest.approx(ours["ppl"], rel=1e-5)
        assert theirs["ppl_beyond"] == pytest.approx(ours["ppl_beyond"], rel=1e-5)
    assert main(["eval", "passkey", "--model", str(tiny_folder), "--lengths", "300", "--depths", "0.5",
                 "--trials", "1", "--method", "self-extend:group=2,window=16", "--backend", "transformers",
                 "--out", str(tmp_path / "keys"), "--no-progress"]) == 0


def test_cli_generate_is_the_same_on_both_backends(tiny_folder, capsys):
    from ropekit.cli import main

    outputs = []
    for backend in ("ropekit", "transformers"):
        assert main(["generate", "It is a truth", "--model", str(tiny_folder), "--max-new-tokens", "12",
                     "--method", "self-extend:group=2,window=4", "--backend", backend]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and len(outputs[0]) > 1


@pytest.mark.parametrize("argv", [
    ["eval", "perplexity", "--device", "cuda:7"],
    ["eval", "perplexity", "--device", "tpu"],
    ["eval", "perplexity", "--method", "bogus"],
    ["eval", "perplexity", "--lengths", "abc"],
    ["eval", "perplexity", "--max-tokens", "1"],
    ["eval", "passkey", "--depths", "1.5"],
    ["eval", "passkey", "--trials", "0"],
    ["compare", "--method", "self-extend:group=0"],
])
def test_cli_bad_input_exits_2_before_loading(argv, monkeypatch, tmp_path):
    import ropekit.loading
    from ropekit.cli import main

    monkeypatch.setattr(ropekit.loading, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    assert main([*argv, "--out", str(tmp_path / "x")]) == 2


def test_compare_plan_scales_self_extend_group():
    from ropekit.cli.compare import methods_at, self_extend_group

    assert self_extend_group(16384, 8192) == 4 and self_extend_group(32768, 8192) == 8
    assert "self-extend:group=16,window=1024" in methods_at(["self-extend:group={g},window={w}"], 8, 8192)
    assert self_extend_group(128, 64) == 4  # small model: window 16


@pytest.mark.slow
def test_seed_claim_plain_rope_breaks_past_trained_length_yarn_does_not(smollm2_path):
    """SmolLM2 (trained 8192) on one 16,384-token window of Pride and Prejudice: without scaling
    the perplexity of tokens 8192-16383 is far above the in-window one; with YaRN x2 it is not
    (transformers measured 102.5 vs 23.8)."""
    from ropekit.eval.text import load_tokens
    from ropekit.loading import load_model

    model, tokenizer = load_model(smollm2_path)
    ids = load_tokens(tokenizer)
    base = model.config.rope
    patch(model, "none", base)
    plain = pp.evaluate_perplexity(model, ids, 16384, trained=8192)
    patch(model, "yarn:factor=2", base)
    yarn = pp.evaluate_perplexity(model, ids, 16384, trained=8192)
    assert plain["ppl_beyond"] > 2.5 * plain["ppl_in_window"]
    assert yarn["ppl_beyond"] < 1.3 * plain["ppl_in_window"]
    assert yarn["ppl_beyond"] < 0.4 * plain["ppl_beyond"]


def test_table_marks_sliding_runs_and_reports_text_beyond():
    from ropekit.eval.tables import perplexity_table

    base = {"method": "none", "ppl": 2.0, "ppl_in_window": 1.5, "tokens_scored": 63, "seconds": 1.0,
            "peak_mem_mb": 10.0}
    single = {**base, "length": 64, "ppl_beyond": 3.0, "ppl_text_beyond": 3.0, "protocol": "single", "windows": 1}
    sliding = {**base, "length": 32, "ppl_beyond": None, "ppl_text_beyond": 2.5, "protocol": "sliding", "stride": 16}
    rows = perplexity_table([single, sliding]).splitlines()[2:]
    assert rows[0].startswith("| `none` | 64 | 2.00 | 1.50 | 3.00 | 3.00 |")
    assert rows[1].startswith("| `none (sliding 32/16)` | 32 | 2.00 | 1.50 | - | 2.50 |")
