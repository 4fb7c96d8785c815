"""The passkey protocol's tasks and the shared-prefix speed-up: one-key prompts and keys as earlier versions
wrote them (the formula written out here), the multi-key task and depth jitter, the Wilson interval against
its defining inequality, records that resume, and a prefix run once giving the same logits and answers as
every prompt run whole (plain RoPE, an attention variant, a static rope type), with the per-pass counts."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tiny_llama import tiny_model, write_hf_folder

from ropekit.eval import passkey as pk
from ropekit.eval import sweep as sw
from ropekit.eval.results import ResultStore
from ropekit.eval.runners import EngineRunner, common_prefix_length
from ropekit.eval.stats import wilson_interval
from ropekit.model import KVCache, patch
from ropekit.model.generate import prefill
from ropekit.progress import Progress


class CharTokenizer:
    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join(chr(i) for i in ids)


class ByteTokenizer(CharTokenizer):
    """Byte ids below the tiny model's 259-token vocabulary."""

    def encode(self, text, add_special_tokens=False):
        return list(text.encode("ascii"))

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return bytes(i for i in ids if i < 128).decode("ascii")


def earlier_text(num_fillers: int, depth: float, key: int) -> str:
    """The one-key prompt as ropekit wrote it before the multi-key task (kept here as the reference)."""
    before = round(depth * num_fillers)
    return "\n".join([pk.TASK, " ".join([pk.FILLER] * before), pk.KEY_LINE.format(key=key),
                      " ".join([pk.FILLER] * (num_fillers - before)), pk.QUESTION])


# ---- the tasks --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_one_key_prompts_and_keys_are_those_of_earlier_versions(depth):
    keys = pk.trial_keys(3, 2000, depth, 4)
    trials = pk.plan_trials(3, 2000, depth, 4)
    assert [t.key for t in trials] == keys and all(t.asked.depth == depth and not t.jittered for t in trials)
    for n in (0, 1, 7, 30):
        assert pk.trial_text(n, trials[0]) == earlier_text(n, depth, keys[0]) == pk.passkey_text(n, depth, keys[0])


def filler_before(text: str, line: str) -> int:
    return text[:text.index(line)].count(pk.FILLER)


@pytest.mark.parametrize("depth", [0.1, 0.5, 0.9])
def test_multikey_prompts_place_tagged_keys_and_ask_for_one(depth):
    tok = CharTokenizer()
    trials = pk.plan_trials(1, 3000, depth, 5, keys=4)
    assert trials == pk.plan_trials(1, 3000, depth, 5, keys=4) != pk.plan_trials(2, 3000, depth, 5, keys=4)
    for trial in trials:
        ids = pk.trial_prompt(tok, 3000, trial)
        text = tok.decode(ids)
        assert 3000 - len(pk.FILLER) - 2 < len(ids) <= 3000
        n = text.count(pk.FILLER)
        assert len({x.key for x in trial.needles}) == 4 and len({x.name for x in trial.needles}) == 4
        assert all(10000 <= x.key <= 99999 for x in trial.needles)
        for needle in trial.needles:
            line = pk.NAMED_KEY_LINE.format(key=needle.key, name=needle.name)
            assert text.count(line) == 1 and filler_before(text, line) == round(needle.depth * n)
        assert trial.asked.depth == depth
        assert text.endswith(pk.NAMED_QUESTION.format(name=trial.asked.name))


def test_key_lines_at_one_place_follow_each_other():
    a, b = pk.Needle(11111, 0.5, "river"), pk.Needle(22222, 0.5, "apple")
    text = pk.trial_text(4, pk.Trial((a, b)))
    assert f"{pk.FILLER} {pk.FILLER}\n{a.line()}\n{b.line()}\n{pk.FILLER}" in text


def test_jitter_moves_each_trial_and_keeps_the_keys():
    plain = pk.plan_trials(0, 5000, 0.5, 20)
    moved = pk.plan_trials(0, 5000, 0.5, 20, jitter=0.1)
    assert [t.key for t in moved] == [t.key for t in plain]
    depths = [t.asked.depth for t in moved]
    assert all(0.4 <= d <= 0.6 for d in depths) and len(set(depths)) == 20 and moved[0].jittered
    assert pk.plan_trials(0, 5000, 0.95, 50, jitter=0.1)[0].asked.depth <= 1.0
    assert all(0.0 <= t.asked.depth <= 1.0 for t in pk.plan_trials(0, 5000, 0.95, 50, jitter=0.1))


@pytest.mark.parametrize("keys,jitter", [(0, 0.0), (33, 0.0), (2, -0.1), (2, 0.6), (1, float("nan"))])
def test_bad_task_settings_raise(keys, jitter):
    with pytest.raises(ValueError):
        pk.plan_trials(0, 1000, 0.5, 1, keys=keys, jitter=jitter)


class FakeRunner:
    """Answers every prompt with the asked key of another trial: distractor or wrong."""

    num_layers = 1

    def __init__(self, answers):
        self.answers = answers

    def use(self, spec):
        return {}

    def window_nll(self, ids, on_layer=None):
        raise AssertionError

    def shared_prefix_length(self, prompts):
        return 0

    def greedy_many(self, prompts, max_new_tokens, on_prefill_layer=None, *, shared=0):
        return [list(a.encode()) for a in self.answers]


def test_multikey_scores_the_asked_key_and_flags_distractors():
    tok = CharTokenizer()
    trials = pk.plan_trials(0, 2000, 0.5, 3, keys=3)
    answers = [f" {trials[0].key}.", f" {trials[1].needles[2].key} is it", " 12"]
    r = pk.evaluate_passkey(FakeRunner(answers), tok, 2000, 0.5, 3, 0, keys=3)
    assert [d["correct"] for d in r["details"]] == [True, False, False]
    assert [d["answered_distractor"] for d in r["details"]] == [False, True, False]
    assert r["details"][1]["asked"] == trials[1].asked.name and len(r["details"][1]["distractors"]) == 2
    assert r["accuracy"] == pytest.approx(1 / 3) and r["accuracy_ci95"] == [round(v, 4) for v in wilson_interval(1, 3)]


def wilson_by_bisection(correct: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The interval's defining inequality |p_hat - p| <= z sqrt(p (1 - p) / n), solved on each side of p_hat."""
    p_hat = correct / n

    def outside(p):
        return abs(p_hat - p) - z * math.sqrt(p * (1 - p) / n)

    def root(a, b):  # outside(a) <= 0 < outside(b), or the reverse
        for _ in range(200):
            m = (a + b) / 2
            if (outside(m) <= 0) == (outside(a) <= 0):
                a = m
            else:
                b = m
        return (a + b) / 2

    low = 0.0 if correct == 0 else root(p_hat, 0.0)
    high = 1.0 if correct == n else root(p_hat, 1.0)
    return low, high


@pytest.mark.parametrize("correct,n", [(0, 1), (1, 1), (0, 10), (3, 5), (5, 10), (12, 15), (99, 100), (1, 2)])
def test_wilson_interval_solves_its_inequality(correct, n):
    assert wilson_interval(correct, n) == pytest.approx(wilson_by_bisection(correct, n), abs=1e-9)


def test_wilson_interval_known_values_and_bounds():
    assert wilson_interval(0, 10)[1] == pytest.approx(0.2775, abs=1e-4)  # the textbook 0/10 upper bound
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


# ---- records ----------------------------------------------------------------------------------------------------


def test_records_of_before_resume_and_new_tasks_get_their_own_cells(tmp_path, monkeypatch):
    model = tiny_model(max_position_embeddings=32)
    path = tmp_path / "results.json"
    old = {"task": "passkey", "model": "tiny", "model_id": None, "dtype": "float32", "device": "cpu",
           "backend": "ropekit", "method": "none", "length": 700, "depth": 0.5, "trials": 2, "seed": 0,
           "accuracy": 0.5, "correct": 1}  # a record of before: no keys, no jitter, no interval
    path.write_text(json.dumps([old]))
    calls = []
    real = sw.evaluate_passkey
    monkeypatch.setattr(sw, "evaluate_passkey", lambda *a, **k: calls.append(k) or real(*a, **k))
    sweeper = sw.Sweeper(model, ByteTokenizer(), ResultStore(path), model_name="tiny", show_progress=False,
                         log=lambda s: None)
    assert sweeper.passkey(["none"], [700], [0.5], trials=2, seed=0) == [old] and calls == []
    multi = sweeper.passkey(["none"], [700], [0.5], trials=2, seed=0, keys=3)
    jitter = sweeper.passkey(["none"], [700], [0.5], trials=2, seed=0, jitter=0.05)
    assert len(calls) == 2 and multi[0]["keys"] == 3 and jitter[0]["jitter"] == 0.05
    assert len(json.loads(path.read_text())) == 3
    new_one_key = sweeper.passkey(["none"], [700], [0.1], trials=2, seed=0)[0]
    assert "keys" not in new_one_key and "jitter" not in new_one_key  # the cell of before, as it was


def test_one_key_details_equal_each_trial_run_alone():
    """The sweep's one-key trials (prefix shared) and the earlier per-trial path (``run_trial``: each prompt
    whole): the same keys, prompts and answers."""
    model, tok = tiny_model(max_position_embeddings=32), ByteTokenizer()
    got = pk.evaluate_passkey(model, tok, 400, 0.6, 3, 5)
    alone = [pk.run_trial(model, tok, 400, 0.6, key) for key in pk.trial_keys(5, 400, 0.6, 3)]
    assert got["details"] == alone and got["shared_prefix_tokens"] > 200


# ---- the shared prefix ------------------------------------------------------------------------------------------


def logits_after(model, prompt: list[int], cache: KVCache, steps: int = 3) -> torch.Tensor:
    """``[len(prompt) + steps, V]``: the logits of ``prompt``'s tokens (continuing ``cache``), then of ``steps``
    greedy tokens fed one at a time."""
    with torch.no_grad():
        rows = [model(torch.tensor([prompt]), cache=cache)[0]]
        for _ in range(steps):
            rows.append(model(rows[-1][-1].argmax().view(1, 1), cache=cache)[0])
    return torch.cat(rows)


def prompts_with_a_prefix(prefix: int = 70) -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    head = torch.randint(3, 250, (prefix,), generator=gen).tolist()
    return [head + [10 + i] + torch.randint(3, 250, (9 + 4 * i,), generator=gen).tolist() for i in range(3)]


SHARED_SPECS = ["none", "self-extend:group=2,window=8", "leaky-rerope:window=8,k=4", "yarn:factor=2"]


@pytest.mark.filterwarnings("ignore::ropekit.model.generate.LongPromptWarning")
@pytest.mark.parametrize("spec", SHARED_SPECS)
def test_a_shared_prefix_gives_the_logits_of_the_whole_prompt(spec):
    """The prefix run once, then a fork of its cache continued: the logits of every later token and of three
    decode steps equal those of the whole prompt run at once, to 1e-5 (float32; the suffix runs as a masked
    attention over prefix + suffix keys instead of one causal attention over all, so sums run in another order;
    measured here up to ~2e-6). The attention variants cache keys unrotated with their positions, so this
    holds for them too."""
    model = tiny_model(max_position_embeddings=32)
    patch(model, spec, model.config.rope)
    prompts, steps = prompts_with_a_prefix(), 3
    shared = common_prefix_length(prompts)
    assert shared == 70
    prefix = prefill(model, prompts[0][:shared])
    for prompt in prompts:
        whole = logits_after(model, prompt, KVCache.for_model(model, 1, len(prompt) + steps), steps)
        fork = prefix.fork(len(prompt) + steps)
        continued = logits_after(model, prompt[shared:], fork, steps)
        torch.testing.assert_close(continued, whole[shared:], rtol=1e-5, atol=1e-5)
        assert torch.equal(fork.key_positions[0, :len(prompt) + steps], torch.arange(len(prompt) + steps))
    assert prefix.length == shared  # forks leave the prefix cache alone


@pytest.mark.parametrize("spec", SHARED_SPECS)
def test_greedy_many_shares_the_prefix_once_and_answers_the_same(spec):
    model = tiny_model(max_position_embeddings=32)
    runner = EngineRunner(model)
    runner.use(spec)
    prompts = prompts_with_a_prefix()
    shared = runner.shared_prefix_length(prompts)
    assert shared == 70
    passes, layers = [], []
    real = model.forward

    def counted(input_ids, *args, **kwargs):
        passes.append(input_ids.shape[1])
        return real(input_ids, *args, **kwargs)

    model.forward = counted
    alone = runner.greedy_many(prompts, 6, on_prefill_layer=layers.append)
    assert sum(t for t in passes if t > 1) == sum(map(len, prompts)) and len(layers) == 2 * 3
    passes.clear()
    layers.clear()
    together = runner.greedy_many(prompts, 6, on_prefill_layer=layers.append, shared=shared)
    assert together == alone
    assert sum(t for t in passes if t > 1) == shared + sum(len(p) - shared for p in prompts)  # the prefix once
    assert len(layers) == 2 * (3 + 1)
    with pytest.raises(ValueError):
        runner.greedy_many(prompts, 6, shared=shared + 1)


@pytest.mark.parametrize("spec", ["dynamic:factor=2", "dynamic:factor=2+consistent", "dynamic_yarn",
                                  "longrope:short_factor=[1,1,1,1,1,1,1,1],long_factor=[1,1,2,2,2,2,3,3]"])
def test_length_dependent_rope_types_run_each_prompt_whole(spec):
    """Their frequencies follow the pass's length: a prefix run alone would be rotated for a shorter one."""
    runner = EngineRunner(tiny_model(max_position_embeddings=32))
    runner.use(spec)
    assert runner.shared_prefix_length(prompts_with_a_prefix()) == 0


def test_common_prefix_length_and_edge_cases():
    assert common_prefix_length([[1, 2, 3], [1, 2, 4], [1, 2]]) == 2
    assert common_prefix_length([[5, 6]]) == 2 and common_prefix_length([]) == 0
    runner = EngineRunner(tiny_model(max_position_embeddings=32))
    assert runner.shared_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2  # each prompt keeps one token to run
    assert runner.shared_prefix_length([[1, 2, 3]]) == 0


def test_fork_copies_and_refuses_a_short_capacity():
    model = tiny_model(max_position_embeddings=32)
    cache = prefill(model, list(range(3, 23)))
    fork = cache.fork(30)
    assert fork.length == 20 and fork.max_len == 30 and fork.next_position() == 20
    assert torch.equal(fork.keys[:, :, :, :20], cache.keys[:, :, :, :20])
    assert fork.keys.data_ptr() != cache.keys.data_ptr()
    with pytest.raises(ValueError, match="at least 20 slots"):
        cache.fork(10)


def test_progress_counts_the_shared_pass():
    model, tok = tiny_model(max_position_embeddings=32), ByteTokenizer()
    bar = Progress(3 * 2, "p", enabled=False)
    r = pk.evaluate_passkey(model, tok, 400, 0.5, 3, 0, progress=bar)
    assert r["shared_prefix_tokens"] > 0 and bar.total == 4 * 2 and bar.done == bar.total


# ---- the command line ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return write_hf_folder(tmp_path_factory.mktemp("tiny"), tiny_model(max_position_embeddings=64))


def test_cli_multikey_passkey_records_report_and_resume(tiny_folder, tmp_path):
    from ropekit.cli import main

    out = tmp_path / "keys"
    base = ["eval", "passkey", "--model", str(tiny_folder), "--lengths", "500", "--depths", "0.2,0.8", "--trials", "3",
            "--method", "none", "--method", "self-extend:group=2,window=16", "--out", str(out), "--no-progress"]
    assert main([*base, "--keys", "3", "--jitter", "0.05"]) == 0
    assert main(base) == 0  # the one-key cells beside them
    records = json.loads((out / "results.json").read_text())
    assert len(records) == 8
    multi = [r for r in records if r.get("keys") == 3]
    assert len(multi) == 4 and all(r["jitter"] == 0.05 and len(r["details"][0]["distractors"]) == 2 for r in multi)
    for r in records:
        assert r["accuracy_ci95"] == [round(v, 4) for v in wilson_interval(r["correct"], 3)]
    report = (out / "report.md").read_text()
    assert "`none (3 keys, jitter 0.05)`" in report and "`none` |" in report and "95% CI" in report
    assert (out / "passkey.png").stat().st_size > 0
    assert main([*base, "--keys", "3", "--jitter", "0.05"]) == 0  # resumes: nothing new
    assert json.loads((out / "results.json").read_text()) == records
    unshared = tmp_path / "unshared"
    assert main([*base[:-3], "--out", str(unshared), "--no-progress", "--no-share-prefix"]) == 0
    alone = json.loads((unshared / "results.json").read_text())
    assert [r["details"] for r in alone] == [r["details"] for r in records if "keys" not in r]
    assert all(r["shared_prefix_tokens"] == 0 for r in alone)


@pytest.mark.parametrize("argv,message", [
    (["--keys", "0"], "--keys must be an integer in [1, 32], got 0"),
    (["--keys", "33"], "--keys must be an integer in [1, 32], got 33"),
    (["--jitter", "0.6"], "--jitter must be a number in [0, 0.5], got 0.6"),
    (["--jitter", "nan"], "--jitter must be a number in [0, 0.5], got nan"),
])
def test_cli_bad_task_exits_2_with_one_line_before_loading(argv, message, monkeypatch, tmp_path, capsys):
    import ropekit.loading
    from ropekit.cli import main

    monkeypatch.setattr(ropekit.loading, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    assert main(["eval", "passkey", "--out", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
