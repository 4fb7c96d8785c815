"""``ropekit tune``: the candidate grids (``tune_grids``) and the LongRoPE search (``longrope_search``) as pure
functions, checked against formulas
written here (isotonic regression by its min-max formula, NTK/PI curves, transformers' YaRN and LongRoPE
frequencies); end-to-end runs of every family on a tiny model, whose numbers are recomputed from full
logits; resuming; the held-out window; argument errors."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
import torch.nn.functional as F
from rope_reference import transformers_inv_freq
from tiny_llama import tiny_model, write_gguf

import ropekit.eval.longrope_search as search
import ropekit.eval.tune as tune
import ropekit.eval.tune_grids as grids
from ropekit.cli import main
from ropekit.convert.plan import plan_extension
from ropekit.eval.passkey import first_integer, trial_keys
from ropekit.method import parse_method
from ropekit.rope import RopeConfig

TRAINED = 32
BASE = RopeConfig.from_hf({"head_dim": 16, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
                           "max_position_embeddings": TRAINED})
WORDS = ("the of and to a in that is was he for it with as his on be at by had not are but from or have an they "
         "which one you were her all she there would their we him been has when who will more no if out so").split()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return write_gguf(tmp_path_factory.mktemp("tune") / "tiny.gguf", tiny_model(max_position_embeddings=TRAINED))


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """Seeded random words (about 1,300 byte tokens): no period, so the two windows hold different text."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(" ".join(rng.choice(WORDS) for _ in range(400)))
    return path


def run_json(capsys, *argv) -> dict:
    assert main(["tune", *map(str, argv), "--json", "--no-progress", "--threads", "1"]) == 0
    return json.loads(capsys.readouterr().out)


def ppl_beyond_from_logits(model, ids: torch.Tensor, trained: int) -> float:
    """exp(mean NLL) of the tokens at window positions >= trained, from one full forward's logits."""
    with torch.no_grad():
        logits = model(ids[None])[0]  # [T, V]
    nll = F.cross_entropy(logits[:-1].double(), ids[1:], reduction="none")  # entry t-1: token at position t
    return math.exp(float(nll[trained - 1:].mean()))


# ---- pure functions ----------------------------------------------------------------------------------------------


def isotonic_min_max(x: list[float]) -> list[float]:
    """The isotonic regression by its closed form: r_i = max over j <= i of min over k >= i of mean(x[j..k])."""
    n = len(x)
    return [max(min(sum(x[j:k + 1]) / (k + 1 - j) for k in range(i, n)) for j in range(i + 1)) for i in range(n)]


@pytest.mark.parametrize("seed", range(6))
def test_project_monotone_is_the_isotonic_regression(seed):
    rng = random.Random(seed)
    x = [rng.uniform(0, 5) for _ in range(rng.randint(1, 12))]
    got = search.project_monotone(x)
    assert got == pytest.approx(isotonic_min_max(x), abs=1e-12)
    assert all(a <= b for a, b in zip(got, got[1:], strict=False))


def test_project_factors_is_monotone_on_the_grid_and_bounded():
    got = search.project_factors([0.3, 5.0, 2.004, 2.0, 9.0], 1.0, 4.0)
    assert got == (1.0, 3.0, 3.0, 3.0, 4.0)  # isotonic: [0.3, 3.0013, 3.0013, 3.0013, 9] -> grid -> [1, 4]


def test_initial_curves_follow_the_formulas():
    s, pairs = 2.0, 8
    curves = search.initial_curves(BASE, 64)
    assert curves["pi"] == (2.0,) * pairs
    assert curves["ntk"] == pytest.approx([round(s ** (i / (pairs - 1)), 2) for i in range(pairs)], abs=1e-12)
    # NTK's curve is the frequency ratio of the NTK base b * s^(d/(d-2)) (rope type ntk) to the own base
    ntk = parse_method("ntk:factor=2").rope_config(BASE).frequencies()[0].double()
    own = BASE.frequencies()[0].double()
    assert curves["ntk"] == pytest.approx((own / ntk).tolist(), abs=0.005 + 1e-6)
    # YaRN's: the ratio to transformers' own YaRN frequencies, rounded to 0.01
    hf_yarn, _ = transformers_inv_freq({"head_dim": 16, "max_position_embeddings": TRAINED, "rope_parameters": {
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0, "original_max_position_embeddings": TRAINED}})
    assert curves["yarn"] == pytest.approx((own / hf_yarn.double()).tolist(), abs=0.005 + 1e-6)


def test_longrope_spec_is_what_transformers_runs():
    """The searched factors as a spec: past the trained length, theta_i / long_factor_i and the attention
    factor sqrt(1 + ln s / ln L), as transformers' longrope computes them."""
    factors = (1.0, 1.1, 1.3, 1.5, 1.9, 2.0, 2.0, 3.25)
    spec = search.longrope_spec(factors, BASE, 64)
    rope = parse_method(spec).rope_config(BASE)
    assert search.long_factors(spec) == factors
    ours, attention = rope.frequencies(64)
    hf = {"head_dim": 16, "max_position_embeddings": TRAINED, "rope_parameters": {
        "rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 8, "long_factor": list(factors),
        "original_max_position_embeddings": TRAINED, "factor": 2.0}}
    theirs, their_attention = transformers_inv_freq(hf, seq_len=64)
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-6, atol=0)  # one float32 rounding each
    assert attention == pytest.approx(math.sqrt(1 + math.log(2) / math.log(TRAINED)), rel=1e-12)
    assert attention == pytest.approx(their_attention, rel=1e-6)
    # up to the trained length: the short factors, i.e. the model's own rope
    torch.testing.assert_close(rope.frequencies(TRAINED)[0], BASE.frequencies()[0], rtol=0, atol=0)


def scored_population(seed: int) -> list[tuple[tuple[float, ...], float]]:
    rng = random.Random(seed)
    return [(search.project_factors([rng.uniform(1, 4) for _ in range(8)], 1.0, 4.0), rng.random())
            for _ in range(6)]


@pytest.mark.parametrize("seed", range(5))
def test_next_generation_is_monotone_bounded_new_and_deterministic(seed):
    scored = scored_population(seed)
    children = search.next_generation(scored, 8, random.Random(seed), 1.0, 4.0)
    assert children == search.next_generation(scored, 8, random.Random(seed), 1.0, 4.0)
    assert children != search.next_generation(scored, 8, random.Random(seed + 100), 1.0, 4.0)
    assert len(children) == 8 and len(set(children)) == 8
    parents = {f for f, _ in scored}
    for child in children:
        assert child not in parents
        assert all(a <= b for a, b in zip(child, child[1:], strict=False))
        assert all(1.0 <= f <= 4.0 and abs(f * 100 - round(f * 100)) < 1e-6 for f in child)


def test_next_generation_breeds_from_the_best():
    """Children come from the PARENTS best: with the others far away (all factors 4), no child is near them."""
    good = [(tuple(1.0 + 0.1 * i for i in range(8)), 0.1 * j) for j in range(search.PARENTS)]
    good = [(search.project_factors([f + 0.05 * j for f in g], 1.0, 4.0), key) for j, (g, key) in enumerate(good)]
    bad = [((4.0,) * 8, 10.0 + j) for j in range(4)]
    for child in search.next_generation(bad + good, 8, random.Random(1), 1.0, 4.0):
        assert max(child) < 3.0


def test_grids_start_with_the_plan_and_reach_the_target():
    n = 100
    plan = {c.family: c.method for c in plan_extension(BASE, n)}
    for family in ("yarn", "self-extend", "leaky-rerope"):
        grid = grids.GRIDS[family](BASE, n)
        assert grid[0] == plan[family] and len(grid) == len(set(grid)) > 5
        for spec in grid:
            p = parse_method(spec)
            p.rope_config(BASE)  # valid on the model's geometry
            if family == "self-extend":
                g, w = p.attention_params.group, p.attention_params.window
                assert (TRAINED - w) * g + w >= n
            if family == "leaky-rerope":
                w, k = p.attention_params.window, p.attention_params.k
                assert w + (n - 1 - w) / k <= TRAINED - 1  # the longest distance maps inside the trained length
            if family == "yarn":
                assert p.rope["factor"] >= n / TRAINED


def test_reach_rules_are_the_least_that_reach():
    """least_group: (L - W) * G + W >= N and G - 1 falls short; least_leak maps distance N onto L - 1 exactly."""
    from ropekit.convert.plan import least_group, least_leak

    for n in (33, 64, 100, 1000):
        for window in (1, 4, TRAINED // 2, TRAINED - 1):
            group = least_group(TRAINED, n, window)
            assert (TRAINED - window) * group + window >= n
            assert group == 1 or (TRAINED - window) * (group - 1) + window < n
            if window < TRAINED - 1:
                k = least_leak(TRAINED, n, window)
                assert window + (n - window) / k == pytest.approx(TRAINED - 1, rel=1e-12)


def test_yarn_grid_scales_the_plan_factor():
    plan_factor = parse_method(grids.plan_spec("yarn", BASE, 100)).rope["factor"]
    factors = {parse_method(spec).rope["factor"] for spec in grids.yarn_grid(BASE, 100)}
    assert factors == {math.ceil(plan_factor * scale * 1000 - 1e-9) / 1000 for scale in grids.YARN_SCALES}


def test_evolve_scores_the_budget_once_each_from_the_plan_seed():
    calls = []

    def score(factors):
        calls.append(factors)
        return sum(factors)

    scored = search.evolve(BASE, 64, 13, 0, score)
    assert [f for f, _ in scored] == calls and len(calls) == 13 == len(set(calls))
    assert calls[0] == search.initial_curves(BASE, 64)["yarn"]
    assert search.longrope_spec(calls[0], BASE, 64) == grids.plan_spec("longrope", BASE, 64)
    assert search.evolve(BASE, 64, 13, 0, sum) == scored and search.evolve(BASE, 64, 13, 1, sum) != scored
    assert search.evolve(BASE, 64, 3, 0, sum) == scored[:3]


@pytest.mark.parametrize("same", [True, False])
def test_held_out_check_gives_best_and_default_their_own_dicts(same):
    class Stub:
        log = staticmethod(lambda line: None)

        def measure(self, spec, split):
            return {"ppl": 2.0, "ppl_in_window": 1.5, "ppl_beyond": 2.5, "method": spec, "split": split}

    best = {"method": "a", "calibration": {}}
    default = {"method": "a" if same else "b", "calibration": {}}
    tune.Tuner.held_out_check(Stub(), best, default)
    assert best["held_out"]["split"] == default["held_out"]["split"] == "held-out"
    assert default["held_out"]["method"] == default["method"] and best["held_out"] is not default["held_out"]


def test_order_candidates_is_seeded_and_keeps_the_default_first():
    grid = [f"s{i}" for i in range(10)]
    a = grids.order_candidates(grid, 4, 0)
    assert a == grids.order_candidates(grid, 4, 0) and a[0] == "s0" and len(a) == 4
    every = grids.order_candidates(grid, 100, 0)
    assert every[:4] == a and sorted(every) == sorted(grid)
    assert any(grids.order_candidates(grid, 10, s) != grids.order_candidates(grid, 10, 0) for s in range(1, 4))


def test_split_windows_are_disjoint_halves():
    w = tune.split_windows(1001, 300)
    assert w.calibration == (0, 300) and w.held_out == (500, 800)
    assert w.calibration[1] <= w.held_out[0]
    with pytest.raises(ValueError, match="needs 1002"):
        tune.split_windows(1001, 501)


def test_rank_key_orders_each_objective():
    a = {"ppl_beyond": 20.0, "accuracy": 0.5}
    b = {"ppl_beyond": 25.0, "accuracy": 1.0}
    c = {"ppl_beyond": float("nan"), "accuracy": 1.0}
    assert sorted([b, a], key=lambda m: tune.rank_key("ppl", m))[0] is a
    assert sorted([a, b], key=lambda m: tune.rank_key("passkey", m))[0] is b
    assert sorted([c, a, b], key=lambda m: tune.rank_key("both", m)) == [b, c, a]  # NaN ppl counts as +inf


def test_dca_grid_holds_chunk_and_local_pairs_with_the_plan_first():
    L = BASE.original_max_position_embeddings
    grid = grids.dca_grid(BASE, 4 * L)
    assert grid[0] == f"dca:chunk={3 * L // 4},local={L // 8}"  # ChunkLlama's defaults
    pairs = [vars(parse_method(spec).attention_params) for spec in grid]
    assert len(set(grid)) == len(grid) == 12
    assert all(p["chunk"] > p["local"] >= 1 for p in pairs)
    assert {p["chunk"] for p in pairs} == {L // 2, 5 * L // 8, 3 * L // 4, 7 * L // 8}
    assert {p["local"] for p in pairs} == {L // 16, L // 8, L // 4}


def test_cli_family_list_is_the_eval_layers():
    from ropekit.cli import tune as cli_tune

    assert cli_tune.FAMILIES == grids.FAMILIES


# ---- end to end on a tiny model ------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", grids.FAMILIES)
def test_cli_tune_runs_each_family_and_reports_true_numbers(family, tiny_gguf, text_file, tmp_path, capsys):
    from ropekit.eval.text import encode_text, load_text
    from ropekit.loading import load_model
    from ropekit.model import patch

    n, budget = 64, 4
    out = run_json(capsys, "--model", tiny_gguf, "--target-length", n, "--family", family, "--budget-evals", budget,
                   "--text", text_file, "--out", tmp_path / "out")
    candidates, best, default = out["candidates"], out["best"], out["default"]
    assert len(candidates) == budget and len({c["method"] for c in candidates}) == budget
    assert [c["rank"] for c in candidates] == [1, 2, 3, 4] and candidates[0]["method"] == best["method"]
    beyond = [c["calibration"]["ppl_beyond"] for c in candidates]
    assert beyond == sorted(beyond)
    assert default["method"] == grids.plan_spec(family, BASE, n)
    assert all(parse_method(c["method"]).rope_config(BASE) for c in candidates)

    # the numbers, recomputed from full logits of the windows the summary names
    model, tokenizer = load_model(tiny_gguf)
    tokens = encode_text(tokenizer, load_text(text_file))
    middle = tokens.numel() // 2
    assert out["calibration"]["tokens"] == [0, n] and out["held_out"]["tokens"] == [middle, middle + n]
    base = model.config.rope
    for entry in (best, default):
        patch(model, entry["method"], base)
        for split, ids in (("calibration", tokens[:n]), ("held_out", tokens[middle:middle + n])):
            expected = ppl_beyond_from_logits(model, ids, TRAINED)
            assert entry[split]["ppl_beyond"] == pytest.approx(expected, rel=1e-5), (split, entry["method"])
    assert best["held_out"]["ppl_beyond"] != best["calibration"]["ppl_beyond"]  # a different window

    settings = best["settings"]
    assert set(settings) == {"hf", "hf-legacy", "gguf", "llama.cpp", "vllm"}
    if family == "self-extend":
        assert "--grp-attn-n" in settings["llama.cpp"] and settings["vllm"].startswith("cannot:")
    if family in ("leaky-rerope", "dca"):
        assert all(v.startswith("cannot:") for v in settings.values())
    if family == "yarn":
        assert '"rope_type": "yarn"' in settings["vllm"]
    if family == "longrope":
        assert f"--max-model-len {n}" in settings["vllm"] and settings["llama.cpp"].startswith("cannot:")
    assert json.loads((tmp_path / "out" / "tune.json").read_text())["best"]["method"] == best["method"]


def counting(monkeypatch) -> list[torch.Tensor]:
    """Record the token window of every perplexity evaluation tune runs."""
    seen, real = [], tune.evaluate_perplexity

    def counted(runner, tokens, *args, **kwargs):
        seen.append(tokens.clone())
        return real(runner, tokens, *args, **kwargs)

    monkeypatch.setattr(tune, "evaluate_perplexity", counted)
    return seen


def test_rerun_skips_every_done_candidate(tiny_gguf, text_file, tmp_path, capsys, monkeypatch):
    from ropekit.eval.text import encode_text, load_text
    from ropekit.loading import load_tokenizer

    calibration = encode_text(load_tokenizer(tiny_gguf), load_text(text_file))[:64]
    seen = counting(monkeypatch)
    argv = ["--model", tiny_gguf, "--target-length", 64, "--family", "yarn", "--text", text_file, "--out", tmp_path]
    first = run_json(capsys, *argv, "--budget-evals", 4)
    held_out = 1 if first["best"]["method"] == first["default"]["method"] else 2
    assert len(seen) == 4 + held_out and first["evaluations"] == {"run": 4 + held_out, "reused": 0}
    seen.clear()
    again = run_json(capsys, *argv, "--budget-evals", 4)
    assert seen == [] and again["evaluations"] == {"run": 0, "reused": 4 + held_out}
    assert again["candidates"] == first["candidates"] and again["best"] == first["best"]
    seen.clear()
    more = run_json(capsys, *argv, "--budget-evals", 6)  # the same order, cut later: two more candidates
    assert sum(torch.equal(t, calibration) for t in seen) == 2
    assert {c["method"] for c in first["candidates"]} < {c["method"] for c in more["candidates"]}


def test_the_search_sees_only_the_calibration_window(tiny_gguf, text_file, tmp_path, capsys, monkeypatch):
    from ropekit.eval.text import encode_text, load_text
    from ropekit.loading import load_tokenizer

    seen = counting(monkeypatch)
    out = run_json(capsys, "--model", tiny_gguf, "--target-length", 64, "--family", "longrope", "--budget-evals", 6,
                   "--text", text_file, "--out", tmp_path)
    tokens = encode_text(load_tokenizer(tiny_gguf), load_text(text_file))
    calibration, held_out = tokens[:64], tokens[tokens.numel() // 2:][:64]
    checks = 1 if out["best"]["method"] == out["default"]["method"] else 2
    assert len(seen) == 6 + checks
    assert all(torch.equal(t, calibration) for t in seen[:6])
    assert all(torch.equal(t, held_out) for t in seen[6:])
    assert not set(range(0, 64)) & set(range(*out["held_out"]["tokens"]))


def test_cli_tune_passkey_objective(tmp_path, text_file, capsys):
    """Passkey at 320 tokens on a model trained on 128: accuracies recomputed from the stored answers, and the
    held-out set's keys are not the calibration set's."""
    model = write_gguf(tmp_path / "tiny128.gguf", tiny_model(max_position_embeddings=128))
    out = run_json(capsys, "--model", model, "--target-length", 320, "--family", "self-extend", "--objective", "both",
                   "--budget-evals", 3, "--passkey-depths", "0.2,0.8", "--passkey-trials", 2, "--text", text_file,
                   "--out", tmp_path / "out")
    keys = [c["calibration"] for c in out["candidates"]]
    assert all(k["prompts"] == 4 and 0 <= k["accuracy"] <= 1 for k in keys)
    ranks = [tune.rank_key("both", k) for k in keys]
    assert ranks == sorted(ranks)
    records = json.loads((tmp_path / "out" / "results.json").read_text())
    passkey = [r for r in records if r["measure"] == "passkey"]
    for r in passkey:
        correct = sum(first_integer(a) == k for d in r["per_depth"] for k, a in zip(d["keys"], d["answers"],
                                                                                   strict=True))
        assert r["correct"] == correct and r["accuracy"] == correct / 4
        seed = 0 if r["split"] == "calibration" else 2**32
        assert [d["keys"] for d in r["per_depth"]] == [trial_keys(seed, 320, d, 2) for d in (0.2, 0.8)]
    assert {r["split"] for r in passkey} == {"calibration", "held-out"}


@pytest.mark.parametrize(("argv", "message"), [
    (["--target-length", "32", "--family", "yarn"], "--target-length must be above the trained length 32"),
    (["--target-length", "abc", "--family", "yarn"], "--target-length must be comma-separated whole numbers"),
    (["--target-length", "64,128", "--family", "yarn"], "--target-length takes one length"),
    (["--target-length", "64", "--family", "bogus"], "--family must be one of yarn, self-extend, leaky-rerope"),
    (["--target-length", "64", "--family", "yarn", "--objective", "speed"], "--objective must be one of ppl"),
    (["--target-length", "64", "--family", "yarn", "--budget-evals", "0"], "--budget-evals must be in [1, 10000]"),
    (["--target-length", "64", "--family", "yarn", "--budget-evals", "2.5"], "--budget-evals must be a whole"),
    (["--target-length", "64", "--family", "yarn", "--seed", "-1"], "--seed must be in [0, 2**32)"),
    (["--target-length", "64", "--family", "yarn", "--passkey-trials", "0"], "--passkey-trials must be in [1, 100]"),
    (["--target-length", "64", "--family", "yarn", "--passkey-depths", "2"], "--passkey-depths must be numbers"),
    (["--target-length", "64", "--family", "yarn", "--threads", "0"], "--threads must be in [1, 1024]"),
])
def test_bad_arguments_exit_2_with_one_line_before_loading(argv, message, tiny_gguf, tmp_path, capsys, monkeypatch):
    import ropekit.loading

    monkeypatch.setattr(ropekit.loading, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    assert main(["tune", "--model", str(tiny_gguf), "--out", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ropekit tune: error: ") and message in err and "\n" not in err


def test_a_text_too_short_for_two_windows_is_one_line(tiny_gguf, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("word " * 20)  # 100 byte tokens
    assert main(["tune", "--model", str(tiny_gguf), "--target-length", "64", "--family", "yarn", "--text", str(short),
                 "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "tuning at 64 needs 128" in err[-1] and err[-1].startswith("ropekit tune: error: ")


def test_shards_measure_their_candidates_once_and_the_last_completes_the_run(tiny_gguf, text_file, tmp_path, capsys,
                                                                              monkeypatch):
    from ropekit.eval.text import encode_text, load_text
    from ropekit.loading import load_tokenizer

    calibration = encode_text(load_tokenizer(tiny_gguf), load_text(text_file))[:64]
    argv = ["--model", tiny_gguf, "--target-length", 64, "--family", "yarn", "--text", text_file,
            "--budget-evals", 4, "--threads", "1", "--no-progress"]
    whole = run_json(capsys, *argv, "--out", tmp_path / "one")
    seen = counting(monkeypatch)
    assert main(["tune", *map(str, argv), "--out", str(tmp_path / "shared"), "--shard", "1/2"]) == 0
    assert "shard 1/2: its candidates are measured" in capsys.readouterr().err  # the other shard's are not yet
    first = sum(torch.equal(t, calibration) for t in seen)
    seen.clear()
    last = run_json(capsys, *argv, "--out", tmp_path / "shared", "--shard", "2/2")
    assert first + sum(torch.equal(t, calibration) for t in seen) == 4  # every candidate measured once in all
    assert 0 < first < 4
    assert [(c["method"], c["rank"]) for c in last["candidates"]] == [(c["method"], c["rank"])
                                                                       for c in whole["candidates"]]
    assert [c["calibration"]["ppl_beyond"] for c in last["candidates"]] == \
        pytest.approx([c["calibration"]["ppl_beyond"] for c in whole["candidates"]], rel=1e-6)
    assert last["best"]["method"] == whole["best"]["method"]


def test_longrope_refuses_a_shard(tiny_gguf, text_file, tmp_path, capsys):
    assert main(["tune", "--model", str(tiny_gguf), "--target-length", "64", "--family", "longrope", "--text",
                 str(text_file), "--out", str(tmp_path), "--shard", "1/2"]) == 2
    assert "sequential" in capsys.readouterr().err
