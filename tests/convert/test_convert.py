"""Rope settings across formats (ropekit.rope.formats, ropekit.convert, ``ropekit convert`` / ``ropekit plan``):
round trips, refusals, the traps users fall into (each test named after one), the GGUF rewrite.

References: transformers' own ``ROPE_INIT_FUNCTIONS`` for what an HF config means, llama.cpp's
semantics as read in its source (see ropekit/rope/formats.py; tests/convert/test_llama_cpp.py runs llama.cpp
itself), and the frequencies of the configuration before conversion (a round trip must give them
back exactly).
"""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch
from tiny_llama import tiny_model, write_gguf

from ropekit.cli import main
from ropekit.convert import Inexpressible, plan_extension, translate, translate_all
from ropekit.rope import RopeConfig
from ropekit.rope import formats as F

BASE = RopeConfig.from_hf({"head_dim": 64, "rope_theta": 100000.0, "max_position_embeddings": 8192})
META = {"general.architecture": "llama", "llama.attention.head_count": 9, "llama.embedding_length": 576}


def same_rope(a: RopeConfig, b: RopeConfig, seq_len: int = 12000) -> bool:
    """The same frequencies and attention factor at ``seq_len`` (what a runtime computes)."""
    (fa, sa), (fb, sb) = a.frequencies(seq_len), b.frequencies(seq_len)
    return fa.shape == fb.shape and torch.allclose(fa, fb, rtol=2e-7, atol=0) and math.isclose(sa, sb, rel_tol=1e-9)


def via_gguf(rc: RopeConfig) -> RopeConfig:
    out = F.to_gguf(rc)
    keys = {k: v for k, v in out.items() if not k.endswith(".weight")}
    return F.from_gguf({**META, **keys}, {k: v for k, v in out.items() if k.endswith(".weight")})


def transformers_frequencies(hf: dict, seq_len: int | None = None):
    """transformers' own inv_freq and attention factor for an HF config dict (the independent reference)."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig(hidden_size=576, num_attention_heads=9, **hf)
    kind = config.rope_parameters["rope_type"]
    return ROPE_INIT_FUNCTIONS[kind](config, "cpu", seq_len=seq_len)


ROUND_TRIPS = ["none", "linear:factor=2", "yarn:factor=2", "yarn:factor=4,beta_fast=16,beta_slow=2",
               "yarn:factor=2,attention_factor=1.3", "yarn:factor=4,mscale=1,mscale_all_dim=0.707",
               "ntk:factor=3", "llama3:factor=8,low_freq_factor=1,high_freq_factor=4",
               "llama3:factor=32,low_freq_factor=1,high_freq_factor=4,original_max_position_embeddings=8192",
               f"longrope:short_factor={[1.0 + i / 64 for i in range(32)]},"
               f"long_factor={[2.0 + i / 8 for i in range(32)]},original_max_position_embeddings=4096"]


@pytest.mark.parametrize("spec", ROUND_TRIPS)
def test_round_trips_are_lossless_where_the_format_can_express_the_method(spec):
    rc = BASE.with_rope_type(spec)
    assert same_rope(RopeConfig.from_hf(F.to_hf(rc)), rc)
    assert same_rope(RopeConfig.from_hf(F.to_hf_legacy(rc)), rc)
    assert same_rope(RopeConfig.from_hf(F.to_vllm(rc)["hf_overrides"] | {"head_dim": 64}), rc)
    if "beta" not in spec:  # llama.cpp reads YaRN betas from flags only for llama files
        assert same_rope(via_gguf(rc), rc)
    if spec.split(":")[0] in ("none", "linear", "yarn", "ntk") and "scale" not in spec and "attention" not in spec:
        assert same_rope(RopeConfig.from_llama_cpp(F.to_llama_cpp(rc), BASE), rc)


@pytest.mark.parametrize(("spec", "target", "message"), [
    ("dynamic:factor=2", "gguf", "no rope type like 'dynamic'"),
    ("dynamic:factor=2", "llama.cpp", "no rope type like 'dynamic'"),
    ("dynamic:factor=2", "vllm", "computed once at load"),
    ("llama3:factor=8,low_freq_factor=1,high_freq_factor=4", "llama.cpp", "needs per-pair factor tensors"),
    ("yarn:factor=2,truncate=false", "gguf", "always truncates"),
    ("yarn:factor=2,truncate=false", "llama.cpp", "always truncated"),
    ("yarn:factor=2,attention_factor=1.3", "llama.cpp", "--yarn-attn-factor is overwritten"),
    ("yarn:factor=2,beta_fast=16", "gguf", "does not read YaRN betas"),
    ("rerope:window=512", "llama.cpp", "exists only in ropekit"),
    ("self-extend:group=4,window=1024", "vllm", "exists only in ropekit"),
    ("self-extend:group=4,window=1024", "hf", "exists only in ropekit"),
    ("dynamic:factor=2+consistent", "hf", "cache-consistent dynamic scaling exists only in ropekit"),
])
def test_a_target_that_cannot_express_a_method_says_so(spec, target, message):
    with pytest.raises(Inexpressible, match=message):
        translate(spec, BASE, target)


def test_self_extend_translates_to_llama_cpp_group_attention():
    result = translate("self-extend:group=4,window=1024", BASE, "llama.cpp")
    assert result.value[-4:] == ["--grp-attn-n", "4", "--grp-attn-w", "1024"]
    assert result.value[result.value.index("-c") + 1] == str((8192 - 1024) * 4 + 1024)
    assert any("llama-completion" in note for note in result.notes)


# ---- the traps (each named after the bug it guards) ----------------------------------------------


def test_explicit_attention_factor_wins_over_the_computed_one():
    rc = BASE.with_rope_type("yarn:factor=2,attention_factor=1.5")
    assert rc.frequencies()[1] == 1.5
    gguf = F.to_gguf(rc)
    assert gguf["llama.rope.scaling.attn_factor"] == pytest.approx(1.5 / (0.1 * math.log(2) + 1))
    assert via_gguf(rc).frequencies()[1] == pytest.approx(1.5)
    _, theirs = transformers_frequencies({"rope_parameters": {"rope_type": "yarn", "factor": 2.0,
                                                              "rope_theta": 1e5, "attention_factor": 1.5,
                                                              "original_max_position_embeddings": 8192}})
    assert theirs == 1.5


def test_mscale_and_mscale_all_dim_give_their_ratio():
    hf = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e5, "mscale": 1.0, "mscale_all_dim": 0.707,
          "original_max_position_embeddings": 8192}
    ours = RopeConfig.from_hf({"head_dim": 64, "rope_parameters": hf}).frequencies()[1]
    expected = (0.1 * 1.0 * math.log(4) + 1) / (0.1 * 0.707 * math.log(4) + 1)
    assert ours == pytest.approx(expected, rel=1e-12)
    assert transformers_frequencies({"rope_parameters": hf})[1] == pytest.approx(expected, rel=1e-7)


def test_truncate_false_keeps_the_fractional_ramp():
    cut, smooth = (BASE.with_rope_type(f"yarn:factor=4,truncate={t}") for t in ("true", "false"))
    assert not torch.equal(cut.frequencies()[0], smooth.frequencies()[0])
    hf = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e5, "truncate": False,
          "original_max_position_embeddings": 8192}
    theirs, _ = transformers_frequencies({"rope_parameters": hf})
    torch.testing.assert_close(smooth.frequencies()[0], theirs, rtol=1e-6, atol=0)


def test_original_max_position_embeddings_is_not_max_position_embeddings():
    """A YaRN x4 model that ships max_position_embeddings 32768: the ramp is computed from the trained 8192."""
    hf = {"head_dim": 64, "max_position_embeddings": 32768, "rope_scaling": {"type": "yarn", "factor": 4.0,
          "original_max_position_embeddings": 8192}, "rope_theta": 1e5}
    rc = RopeConfig.from_hf(hf)
    assert rc.original_max_position_embeddings == 8192 and rc.max_position_embeddings == 32768
    confused = {**hf["rope_scaling"], "original_max_position_embeddings": 32768}
    wrong = RopeConfig.from_hf({**hf, "rope_scaling": confused})
    assert not torch.equal(rc.frequencies()[0], wrong.frequencies()[0])
    assert F.to_gguf(rc)["llama.rope.scaling.original_context_length"] == 8192


def test_llama3_factor_is_read_from_the_config_never_assumed():
    """Llama 3.2 uses factor 32 (3.1: 8): a converter that hard-codes 8 is wrong for it."""
    rc = BASE.with_rope_type("llama3:factor=32,low_freq_factor=1,high_freq_factor=4")
    assert rc.params.factor == 32
    assert max(F.to_gguf(rc)["rope_freqs.weight"]) == pytest.approx(32)
    assert via_gguf(rc).params.factor == pytest.approx(32)
    with pytest.raises(ValueError, match="'factor' is required"):
        BASE.with_rope_type("llama3:low_freq_factor=1,high_freq_factor=4")


def test_rope_type_and_legacy_type_keys():
    legacy = RopeConfig.from_hf({"head_dim": 64, "rope_scaling": {"type": "linear", "factor": 2.0}})
    modern = RopeConfig.from_hf({"head_dim": 64, "rope_parameters": {"rope_type": "linear", "factor": 2.0}})
    assert legacy == modern
    with pytest.raises(ValueError, match="'rope_type'='yarn' and legacy 'type'='linear' disagree"):
        RopeConfig.from_hf({"head_dim": 64, "max_position_embeddings": 8192,
                            "rope_scaling": {"type": "linear", "rope_type": "yarn", "factor": 2.0}})


def test_longrope_uses_the_short_factors_at_exactly_the_original_length():
    short, long = [1.0] * 32, [4.0] * 32
    rc = BASE.with_rope_type(f"longrope:short_factor={short},long_factor={long},original_max_position_embeddings=4096")
    plain = BASE.frequencies()[0]
    torch.testing.assert_close(rc.frequencies(4096)[0], plain, rtol=0, atol=0)
    torch.testing.assert_close(rc.frequencies(4097)[0], plain / 4, rtol=1e-6, atol=0)


@pytest.mark.parametrize("seq_len", [None, 0, 1, 100, 8191, 8192])
def test_dynamic_ntk_below_the_trained_length_is_the_default_rope(seq_len):
    """(the dynamic formula s = factor * n / L - (factor - 1) goes below 1, and the base negative, for small n)"""
    for factor in (1.0, 2.0, 8.0):
        inv_freq, attention = BASE.with_rope_type(f"dynamic:factor={factor}").frequencies(seq_len)
        assert torch.isfinite(inv_freq).all() and attention == 1.0
        torch.testing.assert_close(inv_freq, BASE.frequencies()[0], rtol=0, atol=0)


# ---- the command line --------------------------------------------------------------------------


def test_cli_convert_every_source(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"hidden_size": 576, "num_attention_heads": 9, "rope_theta": 1e5,
                                  "max_position_embeddings": 8192,
                                  "rope_scaling": {"type": "yarn", "factor": 2.0,
                                                   "original_max_position_embeddings": 8192}}))
    assert main(["convert", "--hf-config", str(config), "--to", "llama.cpp"]) == 0
    flags = capsys.readouterr().out.strip()
    assert flags == "--rope-scaling yarn --rope-scale 2 --rope-freq-base 100000 --yarn-orig-ctx 8192 -c 16384"
    model = write_gguf(tmp_path / "tiny.gguf", tiny_model(max_position_embeddings=64))
    assert main(["convert", "--model", str(model), "--llama-cpp", "--rope-scaling linear --rope-scale 4",
                 "--to", "hf"]) == 0
    hf = json.loads(capsys.readouterr().out)
    assert hf["rope_parameters"]["rope_type"] == "linear" and hf["rope_parameters"]["factor"] == 4.0
    assert main(["convert", "--gguf", str(model), "--to", "vllm"]) == 0
    assert "--max-model-len 64" in capsys.readouterr().out
    assert main(["convert", "--model", str(model), "--method", "rerope:window=8", "--to", "all"]) == 0
    table = capsys.readouterr().out
    assert table.count("cannot:") == 5


@pytest.mark.parametrize(("argv", "message"), [
    (["--method", "rerope:window=8", "--to", "llama.cpp"], "cannot: llama.cpp: the attention variant 'rerope'"),
    (["--method", "bogus", "--to", "hf"], "unknown name 'bogus'"),
    (["--llama-cpp=--rope-scale", "--to", "hf"], "needs a value"),
    (["--llama-cpp", "--rope-scaling magic", "--to", "hf"], "must be none, linear or yarn"),
    (["--llama-cpp", "--flash-attn on", "--to", "hf"], "is not a rope flag"),
    (["--method", "yarn:factor=2", "--to", "hf", "--out", "x.gguf"], "--out writes a GGUF file"),
])
def test_cli_convert_errors_are_one_line_and_exit_2(tmp_path, capsys, argv, message):
    model = write_gguf(tmp_path / "tiny.gguf", tiny_model())
    assert main(["convert", "--model", str(model), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


@pytest.mark.parametrize(("spec", "rope_type"), [
    ("yarn:factor=4", "yarn"), ("linear:factor=2", "linear"), ("yarn:factor=4,attention_factor=1.3", "yarn"),
    # a rope_freqs tensor, read back as Llama 3 bands (the way Llama 3.x GGUFs carry their rope)
    ("llama3:factor=8,low_freq_factor=1,high_freq_factor=4,original_max_position_embeddings=16", "llama3"),
    # rope_factors_long / _short tensors, read back as LongRoPE
    ("longrope:short_factor=[1,1,1,1,1,1,1,1],long_factor=[1,1,2,2,2,2,3,3],original_max_position_embeddings=16",
     "longrope")])
def test_rewritten_gguf_loads_with_the_new_rope_and_the_original_is_untouched(tmp_path, spec, rope_type):
    from ropekit.loading import load_model
    from ropekit.model import patch

    source = write_gguf(tmp_path / "tiny.gguf", tiny_model(max_position_embeddings=32))
    before = hashlib.sha256(source.read_bytes()).hexdigest()
    out = tmp_path / "new.gguf"
    assert main(["convert", "--model", str(source), "--method", spec, "--to", "gguf", "--out", str(out)]) == 0
    assert hashlib.sha256(source.read_bytes()).hexdigest() == before
    rewritten, _ = load_model(out)
    original, _ = load_model(source)
    patch(original, spec)
    assert rewritten.config.rope.rope_type == rope_type
    assert torch.equal(rewritten.config.rope.frequencies()[0], original.config.rope.frequencies()[0])
    assert rewritten.config.rope.frequencies()[1] == pytest.approx(original.config.rope.frequencies()[1], rel=1e-6)
    ids = torch.randint(0, 250, (1, 100), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # exact, except that GGUF stores an attention factor (explicit, or LongRoPE's) as a float32 (1 ulp: ~1e-7)
        tolerance = 1e-5 if "attention_factor" in spec or spec.startswith("longrope") else 0.0
        torch.testing.assert_close(rewritten(ids), original(ids), atol=tolerance, rtol=tolerance)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_failed_rewrite_leaves_nothing_behind(tmp_path, monkeypatch):
    import ropekit.convert.gguf_rewrite as R

    source = write_gguf(tmp_path / "tiny.gguf", tiny_model())

    def broken(*args):
        raise ValueError("simulated read-back mismatch")

    monkeypatch.setattr(R, "_verify", broken)
    assert main(["convert", "--model", str(source), "--method", "linear:factor=2", "--to", "gguf", "--out",
                 str(tmp_path / "new.gguf")]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.gguf"]


# ---- plan -----------------------------------------------------------------------------------------


def test_plan_candidates_reach_the_target_and_say_what_they_change():
    candidates = plan_extension(BASE, 32768)
    families = [c.family for c in candidates]
    assert {"linear", "ntk", "dynamic", "yarn", "llama3", "self-extend", "leaky-rerope", "dca"} <= set(families)
    for c in candidates:
        assert c.reach >= 32768 and c.in_window
    dca = next(c for c in candidates if c.family == "dca")
    assert dca.method == "dca:chunk=6144,local=1024" and "within a chunk of 5120 tokens exact" in dca.in_window
    se = next(c for c in candidates if c.family == "self-extend")
    assert se.method == "self-extend:group=7,window=4096" and (8192 - 4096) * 7 + 4096 >= 32768
    linear = next(c for c in candidates if c.family == "linear")
    assert "32/32 pairs turn slower (strongest: 1/4)" in linear.in_window
    rows = dict(translate_all(next(c for c in candidates if c.family == "yarn").method, BASE))
    assert rows["llama.cpp"].startswith("--rope-scaling yarn --rope-scale 4")
    with pytest.raises(ValueError, match="above the trained length 8192"):
        plan_extension(BASE, 4096)


def test_cli_plan_measures_and_ranks(tmp_path, capsys):
    model = write_gguf(tmp_path / "tiny.gguf", tiny_model(max_position_embeddings=32))
    text = tmp_path / "text.txt"
    text.write_text("It is a truth universally acknowledged. " * 40)
    assert main(["plan", "--model", str(model), "--target-length", "64", "--measure", "--text", str(text),
                 "--json", "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)
    measured = report["candidates"]
    assert measured[0]["method"] == "none" and all("ppl_beyond" in c for c in measured)
    beyond = [c["ppl_beyond"] for c in measured[1:]]
    assert beyond == sorted(beyond)


def test_cli_plan_budget_must_leave_tokens_beyond_the_trained_length(tmp_path, capsys):
    model = write_gguf(tmp_path / "tiny.gguf", tiny_model(max_position_embeddings=32))
    assert main(["plan", "--model", str(model), "--target-length", "64", "--measure", "--budget-tokens", "32",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--budget-tokens must be above the trained length 32" in err and "\n" not in err
