"""No late surprises: what a command needs is checked before the first cell. A missing plotting extra is one
warning and a run without figures; a hostile JSON file (deep nesting, huge numbers, invalid UTF-8) or a text path
that is not a regular file is one line and exit 2."""

from __future__ import annotations

import os
import shutil
import sys

import pytest
from tiny_llama import tiny_model, write_hf_folder

from ropekit.cli import main


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return write_hf_folder(tmp_path_factory.mktemp("tiny"), tiny_model(max_position_embeddings=64))


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("It is a truth universally acknowledged. " * 20)
    return path


def _one_error_line(capsys, *names: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("ropekit ") and ": error: " in err
    for name in names:
        assert name in err
    return err


def test_missing_matplotlib_is_one_warning_and_a_report_without_figures(tiny_folder, text, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib fails, find_spec says absent
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match=r"matplotlib is not installed.*ropekit\[lab\]") as caught:
        assert main(["eval", "perplexity", "--model", str(tiny_folder), "--text", str(text), "--lengths", "32",
                     "--out", str(out), "--no-progress"]) == 0
    assert len(caught) == 1
    assert (out / "results.json").is_file() and (out / "results.csv").is_file()
    assert not (out / "perplexity.png").exists() and ".png" not in (out / "report.md").read_text()


def test_missing_extra_is_known_before_the_first_cell(tiny_folder, text, tmp_path, monkeypatch):
    """The warning comes before the model is loaded (so before any cell)."""
    import ropekit.cli.eval as cli_eval

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    order = []
    monkeypatch.setattr(cli_eval, "load", lambda args: order.append("load") or (_ for _ in ()).throw(
        KeyboardInterrupt))
    with pytest.warns(UserWarning, match="matplotlib") as caught, pytest.raises(KeyboardInterrupt):
        cli_eval.run_perplexity(cli_eval_args(tiny_folder, text, tmp_path))
    assert len(caught) == 1 and order == ["load"]


def cli_eval_args(folder, text, tmp_path):
    from ropekit.cli import build_parser

    return build_parser().parse_args(["eval", "perplexity", "--model", str(folder), "--text", str(text),
                                      "--lengths", "32", "--out", str(tmp_path / "o"), "--no-progress"])


HOSTILE_JSON = {"deep nesting": b"[" * 100_000, "huge float": b'{"hidden_size": 1e999}',
                "huge integer": b'{"hidden_size": ' + b"9" * 5000 + b"}", "invalid UTF-8": b'{"model_type": "\xff"}'}


@pytest.mark.parametrize("case", sorted(HOSTILE_JSON))
def test_hostile_results_json_is_one_line(tiny_folder, tmp_path, capsys, case):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_bytes(HOSTILE_JSON[case])
    assert main(["eval", "passkey", "--model", str(tiny_folder), "--lengths", "300", "--out", str(out),
                 "--no-progress"]) == 2
    _one_error_line(capsys, str(out / "results.json"))


@pytest.mark.parametrize("case", sorted(HOSTILE_JSON))
@pytest.mark.parametrize("name", ["config.json", "tokenizer_config.json"])
def test_hostile_model_json_is_one_line(tiny_folder, tmp_path, capsys, case, name):
    folder = tmp_path / "model"
    shutil.copytree(tiny_folder, folder)
    (folder / name).write_bytes(HOSTILE_JSON[case])
    assert main(["eval", "passkey", "--model", str(folder), "--lengths", "300", "--out", str(tmp_path / "out"),
                 "--no-progress"]) == 2
    _one_error_line(capsys, name)


@pytest.mark.parametrize("case", sorted(HOSTILE_JSON))
def test_hostile_config_for_convert_is_one_line(tiny_folder, tmp_path, capsys, case):
    folder = tmp_path / "model"
    shutil.copytree(tiny_folder, folder)
    (folder / "config.json").write_bytes(HOSTILE_JSON[case])
    assert main(["plan", "--model", str(folder), "--target-length", "256"]) == 2
    _one_error_line(capsys, "config.json")


@pytest.mark.parametrize("kind", ["folder", "fifo", "device"])
def test_text_that_is_not_a_regular_file_says_so(tiny_folder, tmp_path, capsys, kind):
    if kind == "folder":
        path, word = tmp_path, "a folder"
    elif kind == "fifo":
        path, word = tmp_path / "pipe", "a pipe"
        os.mkfifo(path)
    else:
        path, word = "/dev/zero", "a device"
    assert main(["eval", "perplexity", "--model", str(tiny_folder), "--text", str(path), "--out",
                 str(tmp_path / "out"), "--no-progress"]) == 2
    err = _one_error_line(capsys, str(path), "not a regular file")
    assert word in err


def test_bad_shard_is_one_line_before_loading(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["eval", "perplexity", "--model", str(tmp_path / "absent.gguf"), "--out", str(tmp_path)]) == 2
    _one_error_line(capsys, "RANK=5")
    assert main(["eval", "perplexity", "--model", str(tmp_path / "absent.gguf"), "--shard", "3/2"]) == 2
    _one_error_line(capsys, "--shard")
