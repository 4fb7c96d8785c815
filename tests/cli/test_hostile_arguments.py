"""Hostile command-line arguments and interrupted sweeps.

- Size-like arguments are refused before anything is allocated, with the estimate and the limit
  in a one-line message (``ROPEKIT_MEMORY_BYTES`` fixes the limit, so the tests do not depend on
  the machine);
- a hypothesis fuzz of ``generate`` and ``eval`` argument vectors, each run by ``ropekit.cli.main``
  in a forked child under an alarm and an address-space cap: exit 0, or exit 2 with one error
  line; never a hang, a crash or a traceback (``ROPEKIT_FUZZ_EXAMPLES`` sets the count);
- a sweep killed at random moments (SIGKILL, SIGINT, SIGTERM) and restarted until it finishes
  ends with the records of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given
from hypothesis import strategies as st
from sandbox import EXTRA_AS_MB, Sandbox, hypothesis_settings, show_summary
from tiny_llama import tiny_model, write_gguf

from ropekit.cli import main
from ropekit.memory import MEMORY_ENV, available_memory, check_fits, format_bytes
from ropekit.model.generate import LongPromptWarning, generate_ids

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = int(os.environ.get("ROPEKIT_FUZZ_TIMEOUT", "60"))
LIMIT = 512 * 2**20  # ROPEKIT_MEMORY_BYTES in these tests


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_gguf(tmp_path_factory.mktemp("args") / "tiny.gguf", tiny_model())  # trained length 128


@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
                    "must be in want of a wife. " * 20)
    return path


@pytest.fixture
def memory_limit(monkeypatch):
    monkeypatch.setenv(MEMORY_ENV, str(LIMIT))


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def one_error_line(err: str, command: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith(f"ropekit {command}: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ---- the resource check ----------------------------------------------------------------------------


def test_memory_limit_override_and_message(monkeypatch):
    monkeypatch.setenv(MEMORY_ENV, "1000")
    assert available_memory() == 1000
    check_fits("a thing", 1000)
    with pytest.raises(ValueError, match=r"^a thing needs about 1.0 KiB, more than the 1000 B of memory available; "
                                         r"try less$"):
        check_fits("a thing", 1024, "try less")
    monkeypatch.setenv(MEMORY_ENV, "-5")
    with pytest.raises(ValueError, match=f"{MEMORY_ENV} must be > 0"):
        available_memory()
    assert format_bytes(3 * 2**40) == "3.0 TiB"


def test_available_memory_is_bounded_by_the_machine(monkeypatch):
    monkeypatch.delenv(MEMORY_ENV, raising=False)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    available = available_memory()
    assert available is not None and 0 < available <= total


# ---- bounded arguments: the failures of the report, each refused before allocating ---------------------


@pytest.mark.parametrize(("new_tokens", "message"), [
    (2_000_000, r"max_new_tokens=2000000 with a \d+-token prompt \(batch 1\): a KV cache of \d+ tokens needs about "
                r"[\d.]+ GiB, more than the 512.0 MiB of memory available; at most about \d+ new tokens fit"),
    (10**9, r"max_new_tokens=1000000000 .* needs about [\d.]+ TiB"),
    (2**31, r"max_new_tokens must be an integer in \[0, 2\*\*31\), got 2147483648"),
    (-1, r"--max-new-tokens must be >= 0, got -1"),
])
def test_generate_refuses_a_cache_that_cannot_fit(capsys, tiny_gguf, memory_limit, new_tokens, message):
    code, err = run_cli(capsys, "generate", "hello", "--model", tiny_gguf, "--max-new-tokens", new_tokens)
    assert code == 2
    assert re.search(message, one_error_line(err, "generate")), err


def test_the_refused_size_is_the_one_that_does_not_fit(tiny_gguf, memory_limit):
    """The advice is right: the largest count it says fits runs, twice it is refused."""
    from ropekit.loading import load_model

    model, _ = load_model(tiny_gguf)
    with pytest.raises(ValueError, match=r"at most about (\d+) new tokens fit") as info:
        next(generate_ids(model, [[1, 2]], max_new_tokens=10**7))
    fit = int(info.value.args[0].rsplit("at most about ", 1)[1].split()[0])
    assert 10**5 < fit < 10**7
    from ropekit.model.generate import check_generation_fits

    check_generation_fits(model.config, 2, fit, torch.float32)
    with pytest.raises(ValueError, match="needs about"):
        check_generation_fits(model.config, 2, 2 * fit, torch.float32)


@pytest.mark.parametrize(("task", "lengths", "message"), [
    ("passkey", "999999999", r"--lengths 999999999: one pass over 999999999 tokens with its KV cache needs about "
                             r"[\d.]+ TiB, more than the 512.0 MiB of memory available"),
    ("perplexity", "64,999999999", r"--lengths 999999999: one pass over 999999999 tokens needs about"),
    ("perplexity", "1e400",
     r"--lengths must be comma-separated whole numbers of tokens in \[2, 2\*\*31\), got '1e400'"),
    ("perplexity", "nan", r"got 'nan'"), ("perplexity", "inf", r"got 'inf'"), ("perplexity", "16.5", r"got '16.5'"),
    ("perplexity", "1", r"whole numbers of tokens in \[2, 2\*\*31\), got '1'"), ("perplexity", "3e9", r"got '3e9'"),
    ("perplexity", ",", r"got ','"),
])
def test_eval_lengths_are_checked_before_any_cell_runs(capsys, tmp_path, tiny_gguf, tiny_text, memory_limit, task,
                                                       lengths, message):
    extra = ["--text", tiny_text] if task == "perplexity" else ["--depths", "0.5", "--trials", "1"]
    code, err = run_cli(capsys, "eval", task, "--model", tiny_gguf, "--lengths", lengths, "--out", tmp_path / "o",
                        "--no-progress", *extra)
    assert code == 2
    assert re.search(message, one_error_line(err, "eval")), err
    assert not (tmp_path / "o" / "results.json").exists() or json.loads((tmp_path / "o" / "results.json")
                                                                        .read_text()) == []


def test_lengths_accept_the_usual_spellings():
    from ropekit.eval.sweep import parse_int_list

    assert parse_int_list("16384, 16k,1.6384e4,16_384", "--lengths") == [16384] * 4


@pytest.mark.parametrize(("argv", "message"), [
    (["--temperature", "nan"], "temperature must be a finite number >= 0, got nan"),
    (["--temperature", "inf"], "temperature must be a finite number >= 0, got inf"),
    (["--temperature", "0.5", "--top-p", "nan"], "top_p must lie in (0, 1], got nan"),
    (["--temperature", "0.5", "--seed", str(2**64)], "seed must be an integer in [0, 2**64)"),
    (["--threads", "100000"], None),  # generate has no --threads: argparse's own usage error (exit 2)
])
def test_generate_sampling_arguments(capsys, tiny_gguf, argv, message):
    try:
        code, err = run_cli(capsys, "generate", "hello", "--model", tiny_gguf, "--max-new-tokens", 2, *argv)
    except SystemExit as exit_:
        code, err = exit_.code, capsys.readouterr().err
    assert code == 2
    if message is not None:
        assert message in one_error_line(err, "generate")


@pytest.mark.parametrize(("argv", "message"), [
    (["--trials", "1000000000"], "--trials must be in [1, 10000], got 1000000000"),
    (["--trials", "0"], "--trials must be in [1, 10000], got 0"),
    (["--threads", "100000"], "--threads must be in [1, 1024], got 100000"),
    (["--depths", "nan"], "--depths must be numbers in [0.0, 1.0], got 'nan'"),
])
def test_passkey_counts_are_bounded(capsys, tmp_path, tiny_gguf, argv, message):
    code, err = run_cli(capsys, "eval", "passkey", "--model", tiny_gguf, "--lengths", "64", "--out", tmp_path,
                        "--no-progress", *argv)
    assert code == 2 and message in one_error_line(err, "eval")


def test_a_prompt_past_the_trained_context_warns_once(tiny_gguf):
    from ropekit.loading import load_model

    model, _ = load_model(tiny_gguf)  # trained length 128
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # ropekit itself keeps it to once per model
        for _ in range(3):
            list(generate_ids(model, [list(range(3, 203))], max_new_tokens=1))
        list(generate_ids(model, [list(range(3, 100))], max_new_tokens=1))
    long = [w for w in caught if issubclass(w.category, LongPromptWarning)]
    assert len(long) == 1
    assert "the prompt has 200 tokens, more than the model's trained context of 128" in str(long[0].message)


def test_the_cli_prints_the_warning_on_one_line(tiny_gguf):
    prompt = "word " * 200
    result = subprocess.run([sys.executable, "-m", "ropekit", "generate", prompt, "--model", str(tiny_gguf),
                             "--max-new-tokens", "1"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if "warning" in line]
    assert len(lines) == 1 and lines[0].startswith("ropekit: warning: the prompt has "), result.stderr


def test_os_errors_are_one_line(capsys, tmp_path, tiny_gguf):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, err = run_cli(capsys, "eval", "perplexity", "--model", tiny_gguf, "--lengths", "64", "--out",
                        blocker / "sub", "--no-progress")
    assert code == 2 and str(blocker) in one_error_line(err, "eval")


# ---- fuzzing the argument vectors -----------------------------------------------------------------------

CASES = r'''
import contextlib, io, os, signal, sys, traceback
import torch
torch.set_num_threads(1)
from ropekit.cli import main
from ropekit.kernels.decode import extension

def prepare(args):
    extension()  # build or load the fused kernels once, before forking
    with contextlib.redirect_stdout(io.StringIO()):  # stdout carries the replies
        main(["generate", "warm", "--model", args[0], "--max-new-tokens", "2"])  # import what a run imports

def run(argv, fd):
    os.dup2(fd, 2)  # the reply's message is the child's stderr
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's usage errors
        code = e.code if isinstance(e.code, int) else 2
    except BaseException:
        traceback.print_exc()
        code = 1
    return code, ""

def outcome(status, message):
    if os.WIFSIGNALED(status):
        return "hang" if os.WTERMSIG(status) == signal.SIGALRM else "crash"
    return {0: "ok", 2: "error"}.get(os.WEXITSTATUS(status), "traceback")
'''


class Driver(Sandbox):
    """One process that imported ropekit once; each request forks a child running ``main(argv)``."""

    def __init__(self, model: Path, env: dict[str, str]):
        super().__init__(CASES, str(model), timeout_s=TIMEOUT_S, extra_as_mb=EXTRA_AS_MB, cwd=ROOT, env=env)

    def run(self, argv: list[str]) -> dict:
        return self.request(argv)

    def close(self) -> None:
        super().close(timeout_s=60)


@pytest.fixture(scope="module")
def driver(tiny_gguf, tmp_path_factory, request):
    env = {**os.environ, MEMORY_ENV: str(LIMIT), "ROPEKIT_CACHE": os.environ.get("ROPEKIT_CACHE", "")}
    env = {k: v for k, v in env.items() if v != ""}
    d = Driver(tiny_gguf, env)
    yield d
    d.close()
    summary = (f"argument fuzz: {sum(d.counts.values())} cases: {dict(sorted(d.counts.items()))}; largest child "
               f"RSS {d.max_rss_kb / 1024:.0f} MiB")
    show_summary(request, [summary])


def assert_clean(reply: dict, argv: list[str]) -> None:
    assert reply["outcome"] in ("ok", "error"), f"{argv}: {reply['outcome']}\n{reply['message']}"
    if reply["outcome"] == "error":
        errors = [line for line in reply["message"].splitlines() if ": error:" in line]
        assert len(errors) == 1 and "Traceback" not in reply["message"], f"{argv}:\n{reply['message']}"
        assert len(errors[0]) < 1000, errors[0]


INTS = ["0", "1", "2", "3", "-1", "64", "2147483647", "2147483648", "1000000000000", "1e3", "1e400", "nan", "inf",
        "-inf", "x", "", "0x10", "3.5", "99999999999999999999999"]
FLOATS = ["0", "0.5", "1", "1.5", "-0.1", "nan", "inf", "-inf", "1e308", "1e-320", "x", ""]
SPECS = ["none", "yarn:factor=2", "linear:factor=2", "dynamic:factor=2+consistent", "self-extend:group=2,window=8",
         "rerope:window=8", "leaky-rerope:window=8,k=2", "yarn:factor=2+self-extend:group=2,window=8", "",
         "self-extend:group=0,window=8", "self-extend:group=2,window=8,chunk=-1", "rerope:window=8,chunk=-3",
         "yarn:factor=2,beta_fast=0", "rerope:window=8,logn=no", "yarn:factor=2,factor=3", "ntk:factor=1e308",
         "yarn:factor=nan", "bogus", "yarn", "yarn:factor", "+", "llama3:factor=8", "longrope:short_factor=[1]",
         "none+none", "self-extend:group=2,window=1e9", "dynamic:factor=2,consistent=maybe", "\x00", "yarn:factor=2,=3"]
PROMPTS = st.one_of(st.sampled_from(["hello", "", " ", "\x00\x01", "\ud7ff" * 3, "word " * 200, "<|im_start|>",
                                     "\u202e", "a" * 5000]), st.text(max_size=40))


def options(flags: dict[str, list[str]]) -> st.SearchStrategy[list[str]]:
    pairs = [st.tuples(st.just(flag), st.sampled_from(values)) for flag, values in flags.items()]
    return st.lists(st.one_of(*pairs), max_size=5).map(lambda items: [x for pair in items for x in pair])


GENERATE_FLAGS = {"--max-new-tokens": ["0", "1", "3", "-1", "2147483648", "10000000", "1e3", "x", "nan"],
                  "--temperature": FLOATS, "--top-k": INTS, "--top-p": FLOATS, "--seed": INTS, "--method": SPECS,
                  "--rope": ["yarn", "linear", "bogus", "dynamic", "yarn:factor=2"], "--factor": FLOATS,
                  "--original-max-position-embeddings": INTS, "--dtype": ["float32", "bfloat16", "float16", "int8"],
                  "--device": ["cpu", "cuda", "cuda:99", "tpu", "meta", ""], "--backend": ["ropekit", "x"]}
EVAL_FLAGS = {"--lengths": ["64", "32,64", "2", "1", "0", "-5", "1e400", "nan", "16k", "999999999", "3.5", "",
                            "32,,64", "a", "1000000"],
              "--method": SPECS, "--dtype": ["float32", "bfloat16", "int8"], "--device": ["cpu", "cuda:3", "x"],
              "--threads": ["1", "0", "-1", "100000", "x"]}
PERPLEXITY_FLAGS = {**EVAL_FLAGS, "--protocol": ["single", "sliding", "x"], "--stride": INTS, "--windows": INTS,
                    "--segment": INTS, "--max-tokens": INTS, "--text": ["TEXT", "/nonexistent", "/", "/dev/null",
                                                                        "/proc/self/mem", "BINARY"]}
PASSKEY_FLAGS = {**EVAL_FLAGS, "--depths": ["0.5", "0,1", "2", "-1", "nan", "x", ""], "--trials": ["1", "2", "0", "-1",
                                                                                                  "1000000000", "x"],
                 "--seed": INTS, "--keys": ["1", "2", "4", "0", "32", "33", "-1", "x", "1e9", "nan"],
                 "--jitter": FLOATS}
# budgets stay small: a long search is a slow run, not a hostile input
TUNE_FLAGS = {"--target-length": ["160", "256", "129", "128", "64", "0", "-1", "x", "1e400", "nan", "16k", "200,300",
                                  "999999999", ""],
              "--family": ["yarn", "self-extend", "leaky-rerope", "longrope", "bogus", "", "YaRN"],
              "--objective": ["ppl", "passkey", "both", "x", ""],
              "--budget-evals": ["1", "2", "3", "0", "-1", "x", "nan", "1e400", "2.5", ""],
              "--seed": INTS, "--passkey-depths": ["0.5", "0,1", "2", "-1", "nan", "x", ""],
              "--passkey-trials": ["1", "2", "0", "101", "x", "1e400"],
              "--text": ["TEXT", "/nonexistent", "/", "BINARY"], "--threads": ["1", "0", "x"],
              "--dtype": ["float32", "bfloat16", "int8"]}


def fuzz_settings(default: int):
    return hypothesis_settings(default, list(HealthCheck))


@fuzz_settings(150)
@given(prompt=PROMPTS, flags=options(GENERATE_FLAGS), chat=st.booleans())
def test_fuzzed_generate_arguments_exit_0_or_2(driver, tiny_gguf, prompt, flags, chat):
    if "--max-new-tokens" not in flags:
        flags = [*flags, "--max-new-tokens", "2"]
    argv = ["generate", prompt, "--model", str(tiny_gguf), *flags, *(["--chat"] if chat else [])]
    assert_clean(driver.run(argv), argv)


@fuzz_settings(200)
@given(task=st.sampled_from(["perplexity", "passkey"]), data=st.data())
def test_fuzzed_eval_arguments_exit_0_or_2(driver, tiny_gguf, tiny_text, tmp_path_factory, task, data):
    flags = data.draw(options(PERPLEXITY_FLAGS if task == "perplexity" else PASSKEY_FLAGS))
    binary = tmp_path_factory.getbasetemp() / "binary.txt"
    if not binary.exists():
        binary.write_bytes(bytes(range(256)) * 4)
    flags = [{"TEXT": str(tiny_text), "BINARY": str(binary)}.get(x, x) for x in flags]
    if "--lengths" not in flags:
        flags += ["--lengths", "64"]
    if task == "perplexity" and "--text" not in flags:
        flags += ["--text", str(tiny_text)]
    if task == "passkey":
        flags += ["--depths", "0.5"] if "--depths" not in flags else []
        flags += ["--trials", "1"] if "--trials" not in flags else []
    out = tmp_path_factory.mktemp("fuzz-out")
    argv = ["eval", task, "--model", str(tiny_gguf), "--out", str(out), "--no-progress", *flags]
    assert_clean(driver.run(argv), argv)


@fuzz_settings(60)
@given(flags=options(TUNE_FLAGS))
def test_fuzzed_tune_arguments_exit_0_or_2(driver, tiny_gguf, tiny_text, tmp_path_factory, flags):
    binary = tmp_path_factory.getbasetemp() / "binary.txt"
    if not binary.exists():
        binary.write_bytes(bytes(range(256)) * 4)
    flags = [{"TEXT": str(tiny_text), "BINARY": str(binary)}.get(x, x) for x in flags]
    for flag, default in (("--target-length", "160"), ("--family", "yarn"), ("--budget-evals", "2"),
                          ("--text", str(tiny_text))):
        if flag not in flags:
            flags += [flag, default]
    argv = ["tune", "--model", str(tiny_gguf), "--out", str(tmp_path_factory.mktemp("tune-out")), "--no-progress",
            *flags]
    assert_clean(driver.run(argv), argv)


# ---- interrupted sweeps resume to the uninterrupted records ---------------------------------------------------

SWEEP = ["eval", "perplexity", "--lengths", "32,48,64,96", "--method", "none", "--method", "yarn:factor=2",
         "--method", "self-extend:group=2,window=16", "--method", "linear:factor=2", "--no-progress", "--threads", "1"]
VOLATILE = {"seconds", "finished", "peak_mem_mb", "peak_mem_delta_mb"}  # measurements of the run itself
KILLS = 8


def _cells(path: Path) -> list[dict]:
    return sorted(({k: v for k, v in r.items() if k not in VOLATILE} for r in json.loads(path.read_text())),
                  key=lambda r: (r["method"], r["length"]))


def test_a_sweep_killed_at_random_moments_resumes_to_the_uninterrupted_records(tmp_path, tiny_gguf, tiny_text):
    base = [sys.executable, "-m", "ropekit", *SWEEP, "--model", str(tiny_gguf), "--text", str(tiny_text)]
    reference = tmp_path / "reference"
    start = time.monotonic()
    subprocess.run([*base, "--out", str(reference)], check=True, capture_output=True, timeout=600, cwd=ROOT)
    full_run = time.monotonic() - start
    out = tmp_path / "killed"
    rng = random.Random(0)
    kills = Counter()
    for _ in range(KILLS):  # interrupt at random moments of the run (startup, cells, writes), then let it finish
        proc = subprocess.Popen([*base, "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                cwd=ROOT)
        time.sleep(rng.uniform(0.2, 1.1) * full_run)
        if proc.poll() is None:
            sig = rng.choice([signal.SIGKILL, signal.SIGINT, signal.SIGTERM])
            proc.send_signal(sig)
            kills[sig.name] += 1
        proc.wait(timeout=120)
        if (out / "results.json").exists():  # every interruption leaves a whole, parseable file (or none)
            json.loads((out / "results.json").read_text())
    proc = subprocess.Popen([*base, "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    assert proc.wait(timeout=600) == 0, proc.stderr.read()
    assert kills["SIGKILL"] + kills["SIGINT"] + kills["SIGTERM"] >= 3, kills
    assert _cells(out / "results.json") == _cells(reference / "results.json")
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".") or p.suffix == ".tmp"]
    assert leftovers == [], leftovers
    print(f"resume: {dict(kills)} interruptions, records equal to the uninterrupted run")


def test_sigterm_ends_a_run_cleanly(tmp_path, tiny_gguf, tiny_text):
    """SIGTERM (what a scheduler sends) stops the run like Ctrl-C: exit 143 or 130, no traceback."""
    code = textwrap.dedent("""
        import os, signal, sys, threading
        from ropekit.cli import main
        threading.Timer(2.0, lambda: os.kill(os.getpid(), signal.SIGTERM)).start()
        sys.exit(main(sys.argv[1:]))
    """)
    result = subprocess.run([sys.executable, "-c", code, *SWEEP[:2], "--lengths", "32,48,64,96,112,120,127", *SWEEP[4:],
                             "--model", str(tiny_gguf), "--text", str(tiny_text), "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode in (0, 130, 143), result.stderr
    assert "Traceback" not in result.stderr, result.stderr
