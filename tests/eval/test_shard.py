"""Shards of a grid: ``--shard K/N`` and the launchers' RANK/WORLD_SIZE/LOCAL_RANK, each cell run by exactly one
shard, balanced by estimated cost; two one-thread processes give the records of one two-thread process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_llama import tiny_model, write_hf_folder

import ropekit
from ropekit.eval import shard as sh
from ropekit.eval import sweep as sw
from ropekit.eval.results import ResultStore

SRC = Path(ropekit.__file__).resolve().parents[1]  # the source tree under test, for the subprocesses


@pytest.mark.parametrize("text, expected",
                         [("1/1", sh.Shard(0, 1)), ("2/4", sh.Shard(1, 4)), (" 3/3 ", sh.Shard(2, 3))])
def test_parse_shard(text, expected):
    assert sh.parse_shard(text) == expected


@pytest.mark.parametrize("text", ["0/2", "3/2", "1/0", "2", "a/b", "1/2/3", "", "-1/2", "1.5/2", f"1/{10**7}"])
def test_parse_shard_rejects_naming_the_flag(text):
    with pytest.raises(ValueError, match="--shard"):
        sh.parse_shard(text)


def test_launcher_variables():
    assert sh.shard_from_env({}) is None
    assert sh.shard_from_env({"RANK": "0", "WORLD_SIZE": "1"}) is None  # a world of one: every cell
    assert sh.shard_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == sh.Shard(3, 4, 1)
    assert sh.shard_from_env({"LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}) == sh.Shard(1, 2, 1)
    with pytest.raises(ValueError, match="RANK=4"):
        sh.shard_from_env({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        sh.shard_from_env({"RANK": "0", "WORLD_SIZE": "two"})
    # --shard wins over the launcher's variables
    assert sh.resolve_shard("1/2", {"RANK": "3", "WORLD_SIZE": "4"}) == sh.Shard(0, 2)
    assert sh.resolve_shard(None, {"RANK": "3", "WORLD_SIZE": "4"}) == sh.Shard(3, 4)


def test_device_per_rank():
    ranked = sh.Shard(1, 2, device_index=1)
    assert sh.shard_device("cuda", ranked) == "cuda:1"
    assert sh.shard_device("cpu", ranked) == "cpu"
    assert sh.shard_device("cuda:0", ranked) == "cuda:0"  # an explicit index is kept
    assert sh.shard_device("cuda", sh.Shard(1, 2)) == "cuda"  # --shard alone names no device


@pytest.mark.parametrize("count", [1, 2, 3, 5, 8, 40])
def test_shards_cover_the_grid_once_and_balance_cost(count):
    lengths = [2048, 4096, 8192, 16384, 32768]
    cells = [{"task": "perplexity", "method": m, "length": n, "windows": 1} for m in "abcdefg" for n in lengths]
    owned = [sh.mine(cells, sh.Shard(k, count)) for k in range(count)]
    assert [sum(column) for column in zip(*owned, strict=True)] == [1] * len(cells)  # each cell exactly once
    loads = [sum(sh.cell_cost(c) for c, ours in zip(cells, row, strict=True) if ours) for row in owned]
    largest = max(sh.cell_cost(c) for c in cells)
    assert max(loads) - min(loads) <= largest  # LPT: within one cell of each other
    assert owned == [sh.mine(cells, sh.Shard(k, count)) for k in range(count)]  # deterministic


def test_cost_grows_with_the_square_of_the_length():
    assert sh.cell_cost({"task": "perplexity", "length": 32768}) == 4 * sh.cell_cost({"task": "perplexity",
                                                                                      "length": 16384})
    assert sh.cell_cost({"task": "passkey", "length": 100, "trials": 5}) == 5 * 100**2


def test_sharded_sweeps_into_one_store_equal_one_sweep(tmp_path):
    model = tiny_model(max_position_embeddings=32)
    ids = torch.randint(0, 250, (200,), generator=torch.Generator().manual_seed(1))
    methods, lengths = ["none", "yarn:factor=2"], [16, 48, 64]

    def sweep(store, shard):
        return sw.Sweeper(model, None, store, model_name="tiny", show_progress=False, log=lambda s: None,
                          shard=shard).perplexity(ids, methods, lengths, text="t")

    whole = sweep(ResultStore(tmp_path / "one.json"), None)
    first = sweep(ResultStore(tmp_path / "results.json"), sh.Shard(0, 2))
    assert 0 < len(first) < len(whole)  # the first shard alone: its share only
    second = sweep(ResultStore(tmp_path / "results.json"), sh.Shard(1, 2))
    assert len(second) == len(whole)  # the last shard sees every cell: its own and the first's
    assert [(r["method"], r["length"]) for r in second] == [(r["method"], r["length"]) for r in whole]
    assert [r["ppl"] for r in second] == pytest.approx([r["ppl"] for r in whole], rel=1e-6)


def _ropekit(args: list[str], threads: int, **env: str) -> subprocess.Popen:
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    inherited = {k: v for k, v in os.environ.items() if k not in launcher}
    environ = {**inherited, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": str(threads), **env}
    return subprocess.Popen([sys.executable, "-m", "ropekit", *args, "--threads", str(threads), "--no-progress"],
                            env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(process: subprocess.Popen) -> str:
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-2000:]
    return out


def _cells(out: Path) -> dict[tuple, float]:
    return {(r["method"], r["length"]): r["ppl"] for r in json.loads((out / "results.json").read_text())}


def test_two_one_thread_shards_give_the_records_of_one_two_thread_process(tmp_path):
    folder = write_hf_folder(tmp_path / "tiny", tiny_model(max_position_embeddings=64))
    text = tmp_path / "text.txt"
    text.write_text("It is a truth universally acknowledged. " * 20)
    grid = ["eval", "perplexity", "--model", str(folder), "--text", str(text), "--lengths", "32,64,96",
            "--method", "none", "--method", "yarn:factor=2"]
    single = tmp_path / "single"
    _finish(_ropekit([*grid, "--out", str(single)], threads=2))
    shared = tmp_path / "shared"
    shards = [_ropekit([*grid, "--out", str(shared), "--shard", f"{k}/2"], threads=1) for k in (1, 2)]
    for process in shards:
        _finish(process)
    expected, got = _cells(single), _cells(shared)
    assert sorted(got) == sorted(expected) and len(got) == 6
    assert [got[c] for c in sorted(got)] == pytest.approx([expected[c] for c in sorted(got)], rel=1e-5)
    assert len(list((shared / "results.records").glob("*.json"))) == 6
    assert "| method |" in (shared / "report.md").read_text()


def test_torchrun_variables_shard_like_the_flag(tmp_path):
    folder = write_hf_folder(tmp_path / "tiny", tiny_model(max_position_embeddings=64))
    text = tmp_path / "text.txt"
    text.write_text("It is a truth universally acknowledged. " * 20)
    out = tmp_path / "ranks"
    grid = ["eval", "perplexity", "--model", str(folder), "--text", str(text), "--lengths", "32,64",
            "--method", "none", "--method", "linear:factor=2", "--out", str(out)]
    ranks = [_ropekit(grid, threads=1, RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r)) for r in (0, 1)]
    for process in ranks:
        _finish(process)
    assert len(_cells(out)) == 4
