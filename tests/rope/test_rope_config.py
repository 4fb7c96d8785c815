"""RopeConfig: parsing, validation messages, HF round trip, spec strings, fuzzing."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ropekit
from ropekit import RopeConfig
from ropekit.rope import ROPE_TYPES, parse_part

BASE = {"head_dim": 64, "max_position_embeddings": 8192, "rope_theta": 100000.0}


def with_rope(**rope_parameters) -> dict:
    return {**BASE, "rope_parameters": rope_parameters}


ROUND_TRIP = [
    with_rope(rope_type="default"),
    with_rope(rope_type="linear", factor=2.0),
    with_rope(rope_type="ntk", factor=4.0),
    with_rope(rope_type="dynamic", factor=2.0),
    with_rope(rope_type="yarn", factor=4.0, original_max_position_embeddings=8192, beta_fast=16, mscale=1,
              mscale_all_dim=0.5),
    with_rope(rope_type="dynamic_yarn", original_max_position_embeddings=4096, truncate=False),
    with_rope(rope_type="longrope", short_factor=[1.0] * 32, long_factor=[2.0] * 32,
              original_max_position_embeddings=4096, factor=8.0),
    with_rope(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=2048),
    with_rope(rope_type="proportional", factor=1.0, partial_rotary_factor=0.25),
    {**BASE, "rope_scaling": {"type": "linear", "factor": 3.0}, "partial_rotary_factor": 0.5},
]


@pytest.mark.parametrize("hf", ROUND_TRIP, ids=lambda hf: str(hf.get("rope_parameters", hf.get("rope_scaling"))))
def test_round_trip(hf):
    """from_hf(to_hf()) gives back the same object, and the same frequencies."""
    rc = RopeConfig.from_hf(hf)
    again = RopeConfig.from_hf(rc.to_hf())
    assert again == rc
    assert torch.equal(again.frequencies(10000)[0], rc.frequencies(10000)[0])


def test_registry_covers_every_type_with_a_source():
    assert set(ROPE_TYPES) == {"default", "linear", "ntk", "dynamic", "yarn", "dynamic_yarn", "longrope", "llama3",
                               "proportional"}
    assert all(entry.source and entry.name == name for name, entry in ROPE_TYPES.items())
    assert ROPE_TYPES["none"] is ROPE_TYPES["default"] and ROPE_TYPES.resolve("pi") == "linear"


def test_pretrained_config_is_accepted():
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0,
                         max_position_embeddings=8192,
                         rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 100000.0,
                                          "original_max_position_embeddings": 8192})
    rc = RopeConfig.from_hf(config)
    assert (rc.rope_type, rc.head_dim, rc.rope_theta, rc.scale) == ("yarn", 64, 100000.0, 2.0)


def test_spec_strings_and_with_rope_type():
    rc = RopeConfig.from_hf(BASE)
    yarn = rc.with_rope_type("yarn:factor=4,beta_fast=16")
    assert (yarn.rope_type, yarn.scale, yarn.params.beta_fast, yarn.original_max_position_embeddings) == (
        "yarn", 4.0, 16.0, 8192)
    assert rc.with_rope_type("none") == rc
    assert rc.with_rope_type({"rope_type": "linear", "factor": 2}).rope_theta == 100000.0
    assert parse_part("self-extend:group=8,window=1024") == {"rope_type": "self-extend", "group": 8,
                                                               "window": 1024}
    lists = parse_part("longrope:short_factor=[1,2],long_factor=[3, 4],factor=2")
    assert lists == {"rope_type": "longrope", "short_factor": [1, 2], "long_factor": [3, 4], "factor": 2}


@pytest.mark.parametrize(("spec", "message"), [
    ("yarn:factor=2,factor=3", "key 'factor' is given twice"),
    ("longrope:short_factor=[1,2", "unbalanced"),
    ("yarn:factor", "expected key=value"),
])
def test_spec_grammar_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_part(spec)


@pytest.mark.parametrize(("rope", "message"), [
    # beta_fast=0 used to fall back to the default 32 (``raw.get("beta_fast") or 32``)
    ({"rope_type": "yarn", "factor": 2, "beta_fast": 0}, r"'beta_fast'=0 is out of range \(0.0"),
    ({"rope_type": "yarn", "factor": 2, "beta_slow": 0.0}, r"'beta_slow'=0.0 is out of range \(0.0"),
    ({"rope_type": "yarn", "factor": 2, "truncate": "maybe"}, "'truncate' must be true or false"),
])
def test_falsy_values_are_validated_not_replaced_by_defaults(rope, message):
    with pytest.raises(ValueError, match=message):
        RopeConfig.from_hf(with_rope(**rope))


@pytest.mark.parametrize(("value", "expected"), [(True, True), ("false", False), ("no", False), (1, True),
                                                 ("YES", True), (0, False)])
def test_truncate_flag_spellings(value, expected):
    rc = RopeConfig.from_hf(with_rope(rope_type="yarn", factor=2, truncate=value))
    assert rc.params.truncate is expected


ERRORS = [
    (with_rope(rope_type="linear", factor=0.5), "'factor'=0.5 is out of range [1.0"),
    (with_rope(rope_type="linear"), "'factor' is required"),
    (with_rope(rope_type="linear", factor=float("nan")), "'factor' must be finite"),
    (with_rope(rope_type="yarn", factor=float("inf")), "'factor' must be finite"),
    (with_rope(rope_type="yarn", factor=2, beta_fast=1, beta_slow=32), "'beta_fast'=1.0 must be >= 'beta_slow'"),
    (with_rope(rope_type="longrope", short_factor=[1.0] * 31, long_factor=[1.0] * 32),
     "'short_factor' must have length 32"),
    (with_rope(rope_type="longrope", short_factor=[1.0] * 32, long_factor="x"), "'long_factor' must be a list"),
    ({"head_dim": 64, "rope_parameters": {"rope_type": "yarn", "factor": 2}}, "needs 'original_max_position"),
    ({"head_dim": 64, "rope_parameters": {"rope_type": "dynamic", "factor": 2}}, "needs 'original_max_position"),
    (with_rope(rope_type="magic"), "unknown rope_type 'magic'; known: default, dynamic"),
    ({**BASE, "head_dim": 63}, "'head_dim'=63 must be even"),
    ({**BASE, "partial_rotary_factor": 0.3}, "64*0.3 = 19 must be even"),
    ({**BASE, "rope_theta": -1.0}, "'rope_theta'=-1.0 is out of range"),
    ({**BASE, "rope_theta": float("nan")}, "'rope_theta' must be finite"),
    (with_rope(rope_type="llama3", factor=8, low_freq_factor=4, high_freq_factor=4), "'high_freq_factor'=4.0 must"),
    (with_rope(rope_type="llama3", factor=8, high_freq_factor=4), "needs 'low_freq_factor'"),
    (with_rope(rope_type="ntk", factor=2, alpha=3), "synonyms"),
    ({"rope_theta": 10000.0}, "needs 'head_dim'"),
]


@pytest.mark.parametrize(("hf", "message"), ERRORS, ids=[m for _, m in ERRORS])
def test_validation_errors_name_key_value_and_range(hf, message):
    with pytest.raises(ValueError) as err:
        RopeConfig.from_hf(hf)
    assert message in str(err.value)


def test_unknown_keys_warn_like_transformers():
    with pytest.warns(UserWarning, match="unrecognized keys"):
        RopeConfig.from_hf(with_rope(rope_type="linear", factor=2.0, flavour="x"))


def test_seq_len_validated():
    with pytest.raises(ValueError, match="'seq_len'"):
        ropekit.compute_inv_freq(BASE, seq_len=-3)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=10,
)
rope_keys = st.sampled_from(["rope_type", "type", "factor", "alpha", "rope_theta", "beta_fast", "beta_slow",
                             "original_max_position_embeddings", "short_factor", "long_factor", "low_freq_factor",
                             "high_freq_factor", "attention_factor", "mscale", "mscale_all_dim", "truncate",
                             "partial_rotary_factor"])
rope_types = st.sampled_from(sorted(ROPE_TYPES) + ["none", "bogus", 3])
model_keys = st.sampled_from(["head_dim", "hidden_size", "num_attention_heads", "rope_theta",
                              "max_position_embeddings", "partial_rotary_factor", "original_max_position_embeddings"])


@settings(max_examples=400, deadline=None)
@given(rope_type=rope_types, rope=st.dictionaries(rope_keys, json_values, max_size=6),
       model=st.dictionaries(model_keys, json_values | st.integers(1, 256), max_size=5))
def test_fuzz_any_dict_parses_or_raises_cleanly(rope_type, rope, model):
    """Any dict either parses (and yields finite frequencies) or raises ValueError/KeyError with a message."""
    hf = {**model, "rope_parameters": {"rope_type": rope_type, **rope}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            rc = RopeConfig.from_hf(hf)
        except (ValueError, KeyError) as err:
            assert str(err)
            return
        inv_freq, factor = rc.frequencies(4096)
    assert inv_freq.shape == (rc.rotary_dim // 2,)
    assert torch.isfinite(inv_freq).all() and math.isfinite(factor)
