"""``--time-budget``: a run stops after the cell that crosses its budget, keeps every finished record, prints the
cells left and the command that resumes, and exits 3; slices resumed with that command end with exactly the
records of one uninterrupted run. The clock is injected (each reading one minute later than the one before), so
every test is deterministic and sleeps never."""

from __future__ import annotations

import itertools
import json
import re
import shlex
import sys
from pathlib import Path

import pytest
import torch
from tiny_llama import tiny_model, write_gguf

from ropekit.cli import build_parser, main
from ropekit.cli.common import EXIT_TIME_BUDGET
from ropekit.eval import sweep as sw
from ropekit.eval.budget import BudgetSpent, TimeBudget, budget_spent, parse_time_budget
from ropekit.eval.results import ResultStore

ROOT = Path(__file__).resolve().parents[2]
VOLATILE = {"seconds", "finished", "peak_mem_mb", "peak_mem_delta_mb"}  # measurements of the run itself
BAD_BUDGET = "--time-budget must be minutes in (0, 1000000]"


def minute_clock():
    """A fake clock in seconds: 0 at its first reading, one minute more at each reading after it."""
    return itertools.count(0.0, 60.0).__next__


def without_timings(value):
    """``value`` (JSON data) without the VOLATILE fields at any depth."""
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def stable(records: list[dict]) -> list[dict]:
    """The records without the fields that measure the run itself, in a fixed order."""
    cleaned = [{k: v for k, v in r.items() if k not in VOLATILE} for r in records]
    return sorted(cleaned, key=lambda r: json.dumps(r, sort_keys=True))


# ---- the budget itself ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "minutes"), [(None, None), ("45", 45.0), ("2.5", 2.5), (" 1e1 ", 10.0),
                                               ("1_000", 1000.0), ("1000000", 1e6), ("0.001", 0.001)])
def test_parse_time_budget_accepts_positive_minutes(text, minutes):
    assert parse_time_budget(text) == minutes


@pytest.mark.parametrize("text", ["0", "-1", "-0", "nan", "inf", "-inf", "1e400", "1000001", "x", "", "5m", "1,2"])
def test_parse_time_budget_refuses_with_the_flag_and_range(text):
    with pytest.raises(ValueError, match=re.escape(BAD_BUDGET)):
        parse_time_budget(text)


def test_budget_spent_needs_a_budget_a_finished_cell_and_the_time():
    budget = TimeBudget.from_now(2, minute_clock())  # start: reading 0 s
    assert not budget_spent(None, 5)
    assert not budget_spent(budget, 0)  # no cell has run yet: the clock is not even read
    assert not budget_spent(budget, 1)  # 60 s of 120
    assert budget_spent(budget, 1)  # 120 s: spent
    assert budget.elapsed() == 180.0


# ---- sweeps --------------------------------------------------------------------------------------------------

METHODS = ["none", "yarn:factor=2", "self-extend:group=2,window=8"]
LENGTHS = [48, 64]


def test_a_budgeted_sweep_stops_after_the_crossing_cell_and_resumes_to_the_uninterrupted_records(tmp_path):
    model = tiny_model(max_position_embeddings=32)
    ids = torch.randint(0, 259, (200,), generator=torch.Generator().manual_seed(5))
    quiet = {"model_name": "tiny", "show_progress": False, "log": lambda line: None}
    clean = sw.Sweeper(model, None, ResultStore(tmp_path / "clean.json"), **quiet).perplexity(ids, METHODS, LENGTHS,
                                                                                           text="t")
    path, slices = tmp_path / "results.json", []
    while True:  # slices of 2 minutes, each reading of the clock one minute: 2 new cells per slice
        sweeper = sw.Sweeper(tiny_model(max_position_embeddings=32), None, ResultStore(path),  # a fresh process's
                             budget=TimeBudget.from_now(2, minute_clock()), **quiet)
        try:
            records = sweeper.perplexity(ids, METHODS, LENGTHS, text="t")
        except BudgetSpent as stop:
            slices.append(stop)
            assert len(json.loads(path.read_text())) == len(stop.finished)  # every finished cell is stored
            continue
        break
    assert [len(s.finished) for s in slices] == [2, 4]
    assert slices[0].left == [f"{m} @ {n}" for m in METHODS for n in LENGTHS][2:]
    assert slices[1].left == ["self-extend:group=2,window=8 @ 48", "self-extend:group=2,window=8 @ 64"]
    assert stable(records) == stable(clean)
    assert stable(json.loads(path.read_text())) == stable(json.loads((tmp_path / "clean.json").read_text()))


# ---- the command line ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_gguf(tmp_path_factory.mktemp("budget") / "tiny.gguf", tiny_model(max_position_embeddings=32))


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
                    "must be in want of a wife. " * 12)
    return path


def run_slice(argv: list[str], monkeypatch) -> int:
    """One budgeted run of ``argv`` on the one-minute clock, as ``ropekit`` would run it (sys.argv included)."""
    monkeypatch.setattr(sys, "argv", ["ropekit", *argv])
    args = build_parser().parse_args(argv)
    return args.func(args, clock=minute_clock())


def stop_message(err: str) -> list[str]:
    """The lines of the stop message, from its first ("stopped by --time-budget ...")."""
    lines = err.splitlines()
    return lines[next(i for i, line in enumerate(lines) if line.startswith("stopped by --time-budget")):]


def resume_command(err: str) -> list[str]:
    """The argv of the command the stop message says resumes the run."""
    lines = err.splitlines()
    line = lines[lines.index("resume with the same command (finished ones are kept and skipped), from the same "
                             "folder:") + 1]
    words = shlex.split(line)
    assert words[0] == "ropekit"
    return words[1:]


def slices_until_done(argv: list[str], monkeypatch, capsys) -> list[tuple[int, str]]:
    """Run ``argv`` in budgeted slices, each with the command the slice before printed, until one exits 0."""
    runs = []
    for _ in range(20):
        code = run_slice(argv, monkeypatch)
        err = capsys.readouterr().err
        runs.append((code, err))
        if code == 0:
            return runs
        assert code == EXIT_TIME_BUDGET, err
        assert resume_command(err) == argv
        argv = resume_command(err)
    pytest.fail("the budgeted slices never finished")


EVAL_TASKS = {
    "perplexity": (["--lengths", "32,48", "--method", "none", "--method", "yarn:factor=2"],
                   ["none @ 48", "yarn:factor=2 @ 32", "yarn:factor=2 @ 48"]),
    "passkey": (["--lengths", "300", "--depths", "0.2,0.8", "--trials", "2", "--method", "none",
                 "--method", "self-extend:group=4,window=16"],
                ["none @ 300, depth 0.8", "self-extend:group=4,window=16 @ 300, depth 0.2",
                 "self-extend:group=4,window=16 @ 300, depth 0.8"]),
    "multi-key": (["--lengths", "600", "--depths", "0.2,0.8", "--trials", "1", "--keys", "2", "--method", "none",
                   "--method", "yarn:factor=4"],
                  ["none @ 600, depth 0.8", "yarn:factor=4 @ 600, depth 0.2", "yarn:factor=4 @ 600, depth 0.8"]),
}


@pytest.mark.parametrize("task", EVAL_TASKS)
def test_cli_eval_in_budgeted_slices_equals_one_uninterrupted_run(task, tiny_gguf, text_file, tmp_path, monkeypatch,
                                                                    capsys):
    flags, left_after_one = EVAL_TASKS[task]
    command = "perplexity" if task == "perplexity" else "passkey"
    base = ["eval", command, "--model", str(tiny_gguf), *flags, "--no-progress", "--threads", "1",
            *(["--text", str(text_file)] if command == "perplexity" else [])]
    assert main([*base, "--out", str(tmp_path / "whole")]) == 0
    capsys.readouterr()

    # a 1-minute budget on the one-minute clock: one cell per slice
    runs = slices_until_done([*base, "--out", str(tmp_path / "sliced"), "--time-budget", "1"], monkeypatch, capsys)
    assert [code for code, _ in runs] == [EXIT_TIME_BUDGET] * 3 + [0]
    first = stop_message(runs[0][1])
    assert re.fullmatch(r"stopped by --time-budget 1 after [0-9.]+ minutes: 1 cells finished, 3 left:", first[0])
    assert first[1:4] == [f"  {label}" for label in left_after_one]
    assert first[-1] == "exit status 3: stopped by the time budget"
    assert stable(json.loads((tmp_path / "sliced" / "results.json").read_text())) == \
        stable(json.loads((tmp_path / "whole" / "results.json").read_text()))
    plot = "perplexity.png" if command == "perplexity" else "passkey.png"
    assert (tmp_path / "sliced" / plot).stat().st_size > 0  # the outputs are redrawn after every slice


def test_a_budget_larger_than_the_run_changes_nothing(tiny_gguf, text_file, tmp_path, monkeypatch, capsys):
    flags, _ = EVAL_TASKS["perplexity"]
    argv = ["eval", "perplexity", "--model", str(tiny_gguf), *flags, "--text", str(text_file), "--no-progress",
            "--out", str(tmp_path), "--time-budget", "45"]
    assert run_slice(argv, monkeypatch) == 0
    assert "time-budget" not in capsys.readouterr().err
    assert len(json.loads((tmp_path / "results.json").read_text())) == 4


def test_main_exits_3_on_the_real_clock(tiny_gguf, text_file, tmp_path, capsys):
    """A budget of 1e-9 minutes (60 ns) is spent by any cell: the first cell runs, then the run stops."""
    flags, _ = EVAL_TASKS["perplexity"]
    argv = ["eval", "perplexity", "--model", str(tiny_gguf), *flags, "--text", str(text_file), "--no-progress",
            "--out", str(tmp_path), "--time-budget", "1e-9"]
    assert main(argv) == EXIT_TIME_BUDGET
    assert "1 cells finished, 3 left" in capsys.readouterr().err
    assert len(json.loads((tmp_path / "results.json").read_text())) == 1


TUNE = ["--target-length", "64", "--family", "yarn", "--budget-evals", "3", "--no-progress", "--threads", "1"]


def test_cli_tune_in_budgeted_slices_equals_one_uninterrupted_run(tiny_gguf, text_file, tmp_path, monkeypatch,
                                                                   capsys):
    base = ["tune", "--model", str(tiny_gguf), "--text", str(text_file), *TUNE]
    assert main([*base, "--out", str(tmp_path / "whole")]) == 0
    capsys.readouterr()
    # a 2-minute budget: two measurements per slice (three calibration candidates, then one or two held-out)
    runs = slices_until_done([*base, "--out", str(tmp_path / "sliced"), "--time-budget", "2"], monkeypatch, capsys)
    codes = [code for code, _ in runs]
    assert codes in ([EXIT_TIME_BUDGET, 0], [EXIT_TIME_BUDGET, EXIT_TIME_BUDGET, 0])  # the held-out check: 1 or 2
    first = stop_message(runs[0][1])
    assert first[0].endswith("2 measurements finished, 3 left:")
    assert first[1].startswith("  ppl yarn:") and first[1].endswith("(calibration)")
    assert first[2] == "  held-out check of the best candidate (after the search)"
    assert first[3].startswith("  held-out check of the default yarn:") and first[3].endswith("(unless it ranks best)")
    if len(runs) == 3:  # stopped between the held-out checks of the best and the default
        assert stop_message(runs[1][1])[1].endswith("(held-out)")
    whole = json.loads((tmp_path / "whole" / "tune.json").read_text())
    sliced = json.loads((tmp_path / "sliced" / "tune.json").read_text())
    for summary in (whole, sliced):
        del summary["command"], summary["evaluations"]
    assert without_timings(sliced) == without_timings(whole)
    assert stable(json.loads((tmp_path / "sliced" / "results.json").read_text())) == \
        stable(json.loads((tmp_path / "whole" / "results.json").read_text()))


def test_cli_tune_json_says_what_is_left(tiny_gguf, text_file, tmp_path, monkeypatch, capsys):
    argv = ["tune", "--model", str(tiny_gguf), "--text", str(text_file), *TUNE, "--out", str(tmp_path), "--json",
            "--time-budget", "1"]
    assert run_slice(argv, monkeypatch) == EXIT_TIME_BUDGET
    out = json.loads(capsys.readouterr().out)
    assert out["stopped_by"] == "time-budget" and out["exit_status"] == 3 and out["finished"] == 1
    assert len(out["left"]) == 4 and shlex.split(out["resume"])[1:] == argv
    assert not (tmp_path / "tune.json").exists()


@pytest.mark.parametrize("value", ["0", "-5", "nan", "x", "inf", ""])
@pytest.mark.parametrize("command", [["eval", "perplexity"], ["eval", "passkey"],
                                     ["tune", "--target-length", "64", "--family", "yarn"]])
def test_a_bad_time_budget_is_one_line_and_exit_2_before_loading(command, value, tiny_gguf, tmp_path, monkeypatch,
                                                                 capsys):
    import ropekit.loading

    monkeypatch.setattr(ropekit.loading, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    assert main([*command, "--model", str(tiny_gguf), "--out", str(tmp_path), "--time-budget", value]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"ropekit {command[0]}: error: {BAD_BUDGET}, got {value!r}"


# ---- the documented commands ------------------------------------------------------------------------------------


def documented_slices() -> list[list[str]]:
    """The ``ropekit`` commands of docs/lab.md's section on slices (continuation lines joined)."""
    text = (ROOT / "docs" / "lab.md").read_text()
    section = text.split("## Long grids in slices", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)  # the commands; the loop is a ```sh block
    joined = "\n".join(blocks).replace("\\\n", " ")
    commands = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        if "ropekit" in words:
            commands.append(words[words.index("ropekit") + 1:])
    return commands


def test_the_documented_slice_commands_parse_and_validate():
    """Every command of the worked example: parsed, and every value checked as a run checks it before loading."""
    from ropekit.eval.passkey import check_task
    from ropekit.eval.sweep import check_methods, parse_float_list, parse_int_list

    commands = documented_slices()
    assert len(commands) == 3
    for argv in commands:
        args = build_parser().parse_args(argv)
        assert args.command == "eval" and parse_time_budget(args.time_budget) <= 45
        check_methods(args.method)
        parse_int_list(args.lengths, "--lengths")
        if args.eval_command == "passkey":
            parse_float_list(args.depths, "--depths")
            check_task(args.keys, args.jitter)


# ---- a budget on a shard ---------------------------------------------------------------------------------------


def test_a_budgeted_shard_stops_before_its_own_cells_only_and_the_shards_end_with_the_whole_grid(tmp_path):
    from ropekit.eval.shard import Shard, mine

    ids = torch.randint(0, 259, (200,), generator=torch.Generator().manual_seed(5))
    quiet = {"model_name": "tiny", "show_progress": False, "log": lambda line: None}
    clean = sw.Sweeper(tiny_model(max_position_embeddings=32), None, ResultStore(tmp_path / "clean.json"),
                       **quiet).perplexity(ids, METHODS, LENGTHS, text="t")
    labels = [f"{m} @ {n}" for m in METHODS for n in LENGTHS]
    path = tmp_path / "results.json"
    for index in range(2):  # shard 1/2 in one-cell slices until its share is done, then shard 2/2
        shard = Shard(index, 2)
        sweeper = sw.Sweeper(tiny_model(max_position_embeddings=32), None, ResultStore(path), **quiet)
        own = [label for label, ours in zip(labels, mine(sweeper.perplexity_cells(METHODS, LENGTHS, text="t"), shard),
                                            strict=True) if ours]
        lefts = []
        for _ in range(len(labels)):
            sweeper = sw.Sweeper(tiny_model(max_position_embeddings=32), None, ResultStore(path), shard=shard,
                                 budget=TimeBudget.from_now(1, minute_clock()), **quiet)
            try:
                records = sweeper.perplexity(ids, METHODS, LENGTHS, text="t")
            except BudgetSpent as stop:
                lefts.append(stop.left)
                continue
            break
        assert lefts == [own[i:] for i in range(1, len(own))]  # one of its own cells per slice, never another's
    assert stable(records) == stable(clean)
    assert stable(json.loads(path.read_text())) == stable(json.loads((tmp_path / "clean.json").read_text()))


def test_cli_eval_shards_in_budgeted_slices_resume_with_their_shard(tiny_gguf, text_file, tmp_path, monkeypatch,
                                                                     capsys):
    flags, _ = EVAL_TASKS["perplexity"]
    base = ["eval", "perplexity", "--model", str(tiny_gguf), *flags, "--text", str(text_file), "--no-progress",
            "--threads", "1"]
    assert main([*base, "--out", str(tmp_path / "whole")]) == 0
    capsys.readouterr()
    for k in (1, 2):  # each shard has 2 of the 4 cells: one slice stopped by the budget, then one that finishes
        argv = [*base, "--out", str(tmp_path / "sliced"), "--shard", f"{k}/2", "--time-budget", "1"]
        runs = slices_until_done(argv, monkeypatch, capsys)  # each resume command is the argv, --shard included
        assert [code for code, _ in runs] == [EXIT_TIME_BUDGET, 0]
        assert stop_message(runs[0][1])[0].endswith("1 left:")
    assert stable(json.loads((tmp_path / "sliced" / "results.json").read_text())) == \
        stable(json.loads((tmp_path / "whole" / "results.json").read_text()))


def test_cli_tune_shards_with_a_budget_end_with_the_summary_of_one_run(tiny_gguf, text_file, tmp_path, monkeypatch,
                                                                       capsys):
    base = ["tune", "--model", str(tiny_gguf), "--text", str(text_file), *TUNE]
    assert main([*base, "--out", str(tmp_path / "whole")]) == 0
    capsys.readouterr()
    for k in (1, 2):
        argv = [*base, "--out", str(tmp_path / "sliced"), "--shard", f"{k}/2", "--time-budget", "1"]
        runs = slices_until_done(argv, monkeypatch, capsys)
        for _, err in runs[:-1]:
            left = stop_message(err)[1:-3]
            assert all(line.endswith(("(calibration)", "(held-out)")) or line.startswith("  held-out check")
                       for line in left), err
    whole = json.loads((tmp_path / "whole" / "tune.json").read_text())
    sliced = json.loads((tmp_path / "sliced" / "tune.json").read_text())  # written by the last shard to finish
    for summary in (whole, sliced):
        del summary["command"], summary["evaluations"]
    assert without_timings(sliced) == without_timings(whole)
