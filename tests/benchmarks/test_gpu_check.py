"""benchmarks/gpu_check.py on the CPU: the model's transfer in parts, and a smoke run of every section."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from tiny_llama import tiny_model, write_gguf

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import gpu_check  # noqa: E402  (a script folder, not a package)

REPO = Path(__file__).resolve().parents[2]


def carry(parts: Path, names: list[str], dest: Path) -> Path:
    """What one call to the GPU machine receives: the manifest and the named parts."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in [gpu_check.MANIFEST, *names]:
        (dest / name).write_bytes((parts / name).read_bytes())
    return dest


def test_split_stash_join_round_trip_is_byte_exact(tmp_path):
    model = tmp_path / "model.gguf"
    model.write_bytes(os.urandom(300_000))
    manifest = gpu_check.split_model(model, tmp_path / "parts", 128_000)
    assert [p["size"] for p in manifest["parts"]] == [128_000, 128_000, 44_000]
    store = tmp_path / "store"
    # three calls, one part each, as the machine receives them
    assert gpu_check.stash(carry(tmp_path / "parts", ["part-000.bin"], tmp_path / "call1"), store) == [
        "part-001.bin", "part-002.bin"]
    with pytest.raises(gpu_check.CheckError, match="missing part-001.bin, part-002.bin"):
        gpu_check.join_model(store)
    gpu_check.stash(carry(tmp_path / "parts", ["part-001.bin"], tmp_path / "call2"), store)
    assert gpu_check.stash(carry(tmp_path / "parts", ["part-002.bin"], tmp_path / "call3"), store) == []
    joined = gpu_check.join_model(store)
    assert joined.name == "model.gguf" and joined.read_bytes() == model.read_bytes()
    assert gpu_check.join_model(store) == joined  # verified and reused


def test_a_corrupted_part_is_refused_with_one_line(tmp_path, capsys):
    model = tmp_path / "model.gguf"
    model.write_bytes(os.urandom(50_000))
    gpu_check.main(["split-model", "--model", str(model), "--out", str(tmp_path / "parts"), "--part-mib", "0.02"])
    part = tmp_path / "parts" / "part-001.bin"
    data = bytearray(part.read_bytes())
    data[100] ^= 1
    part.write_bytes(bytes(data))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(["stash", "--from", str(tmp_path / "parts"), "--to", str(tmp_path / "store")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.count("\n") == 1 and "part-001.bin: sha256" in err and "corrupted in transit" in err
    # a part corrupted inside the store is refused when joining, too
    for name in ("part-001.bin", "part-002.bin"):
        (tmp_path / "store" / name).write_bytes((tmp_path / "parts" / name).read_bytes())
    with pytest.raises(gpu_check.CheckError, match="part-001.bin: sha256"):
        gpu_check.join_model(tmp_path / "store")


def test_parts_are_at_most_60_mib():
    with pytest.raises(gpu_check.CheckError, match=r"part size must be in \(0, 60\] MiB"):
        gpu_check.split_model(Path("unused"), Path("unused"), 61 * gpu_check.MIB)


def test_ppl_comparison_passes_within_half_a_percent():
    reference = {"ppl": 20.0, "ppl_in_window": 19.0, "ppl_beyond": 21.0}
    close = gpu_check.compare_ppl({"ppl": 20.09, "ppl_in_window": 19.0, "ppl_beyond": 20.9}, reference)
    far = gpu_check.compare_ppl({"ppl": 20.0, "ppl_in_window": 19.0, "ppl_beyond": 21.2}, reference)
    assert close["passed"] is True and far["passed"] is False
    assert far["ratios"]["ppl_beyond"] == pytest.approx(21.2 / 21, abs=1e-6)
    assert gpu_check.compare_ppl(reference, None)["passed"] is None


def test_the_readme_16k_records_are_found_for_each_method():
    records = json.loads(gpu_check.PPL_REFERENCE.read_text())
    model_id, text = records[0]["model_id"], records[0]["text_sha256"]
    for method in gpu_check.PPL_METHODS:  # "self-extend" is the record's self-extend:group=4,window=1024
        assert gpu_check.reference_record(records, method, 16384, model_id, text) is not None, method


def test_passkey_settings_are_the_lab_bests_at_4x():
    assert gpu_check.passkey_specs(8192, 4) == ["yarn:factor=4", "self-extend:group=32,window=7168",
                                                "leaky-rerope:window=4096,k=8", "dca"]
    assert [gpu_check.passkey_length(8192, f) for f in gpu_check.PASSKEY_FACTORS] == [32000, 64000]


def test_smoke_run_writes_every_section(tmp_path):
    model = write_gguf(tmp_path / "tiny.gguf", tiny_model())
    gpu_check.split_model(model, tmp_path / "parts", 64 * 1024)
    gpu_check.stash(tmp_path / "parts", tmp_path / "store")
    out = tmp_path / "check.json"
    gpu_check.main(["run", "--device", "cpu", "--smoke", "--parts", str(tmp_path / "store"), "--out", str(out),
                    "--cuda-tests", str(REPO / "tests" / "attention" / "test_dca.py")])
    report = json.loads(out.read_text())
    assert set(report) == {"meta", "packages", "model", "sections"}
    assert report["meta"]["device_type"] == "cpu" and report["model"]["model_id"].startswith("sha256:")
    sections = report["sections"]
    assert list(sections) == list(gpu_check.SECTIONS)
    assert {name: s["status"] for name, s in sections.items()} == dict.fromkeys(gpu_check.SECTIONS, "done")
    tests = sections["tests"]
    assert tests["counts"]["skipped"] >= 1 and tests["counts"]["failed"] == tests["counts"]["errors"] == 0
    assert {(r["dtype"], r["layout"]) for r in sections["rope"]["rows"]} == {
        (d, lay) for d in ("bfloat16", "float32") for lay in ("half", "interleaved")}
    assert all(r["fraction_of_copy"] > 0 for r in sections["rope"]["rows"])
    layer = sections["layer"]["rows"]
    assert {r["tokens"] for r in layer} == {128, 256}
    for T in (128, 256):
        names = [r["name"] for r in layer if r["tokens"] == T]
        assert names[0].startswith("plain") and len(names) == 1 + 2 * 4
        timed_variants = [r for r in layer if r["tokens"] == T and r["name"] in gpu_check.layer_specs(64)]
        assert all(r["ms"] > 0 and r["throughput_vs_plain"] > 0 for r in timed_variants)
        assert all("ms" in r or r["skipped"] for r in layer)
    ppl = sections["perplexity"]["rows"]
    assert [r["method"] for r in ppl] == list(gpu_check.PPL_METHODS)
    assert all(r["ppl"] > 1 and r["passed"] is None and "no float32 record" in r["note"] for r in ppl)  # not SmolLM2
    cells = sections["passkey"]["cells"]
    assert len(cells) == 2 * 4 * 2 and all(0 <= c["correct"] <= c["trials"] == 2 for c in cells)
    assert {c["length"] for c in cells} == {500, 1000}


def test_a_spent_budget_skips_every_section_and_says_so(tmp_path):
    out = tmp_path / "check.json"
    gpu_check.main(["run", "--device", "cpu", "--smoke", "--budget-s", "0", "--out", str(out)])
    sections = json.loads(out.read_text())["sections"]
    assert all(s["status"] == "skipped" and "budget of 0 s spent" in s["reason"] for s in sections.values())
