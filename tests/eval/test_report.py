"""Report figures and tables: the figure data (``figure_data``) checked against values computed here, the
panel choice, styles, the tables, and that every figure (``plots``) writes a PNG."""

import json
import math
from pathlib import Path

import pytest

from ropekit.eval import figure_data as fd
from ropekit.eval import plots, report, tables

TRAINED = 8192
RESULTS = Path(__file__).resolve().parents[2] / "docs" / "results" / "results.json"


def difficulty(i: float) -> float:
    """How hard the text is at text index ``i`` (nats added to every run's loss there)."""
    return 0.25 * math.sin(2 * math.pi * i / 6000)


def make_record(method: str, length: int, nll, *, protocol: str = "single", stride: int | None = None,
                trained: int = TRAINED, bucket: int = 256, segment: int = 4096, text_tokens: int | None = None,
                buckets: bool = True) -> dict:
    """A perplexity record whose token at window position p / text index i has NLL ``nll(p, i)`` (nats).

    single: one window of ``length`` tokens from the start (p == i), keyed by window position; sliding: over
    ``text_tokens`` tokens, window position taken as ``min(i, length - 1)``, keyed by text index. Every 8th
    token is evaluated and stands for 8."""
    sliding = protocol == "sliding"
    n = (text_tokens or length) if sliding else length
    tally = {"all": [0.0, 0], "in": [0.0, 0], "beyond": [0.0, 0], "text_beyond": [0.0, 0]}
    per_bucket: dict[int, list[float]] = {}
    per_segment: dict[int, list[float]] = {}
    for i in range(1, n, 8):  # every 8th token, weighted 8
        p = min(i, length - 1) if sliding else i
        v = nll(p, i)
        for key, hit in (("all", True), ("in", p < trained), ("beyond", p >= trained), ("text_beyond", i >= trained)):
            if hit:
                tally[key][0] += 8 * v
                tally[key][1] += 8
        where = i if sliding else p
        for size, table in ((bucket, per_bucket), (segment, per_segment)):
            acc = table.setdefault(where // size, [0.0, 0])
            acc[0] += 8 * v
            acc[1] += 8

    def ppl(acc):
        return math.exp(acc[0] / acc[1]) if acc[1] else None

    r = {"task": "perplexity", "method": method, "length": length, "protocol": protocol, "stride": stride,
         "windows": 1, "windows_run": 1, "trained_length": trained, "text": "synthetic.txt", "ppl": ppl(tally["all"]),
         "ppl_in_window": ppl(tally["in"]), "ppl_beyond": ppl(tally["beyond"]),
         "ppl_text_beyond": ppl(tally["text_beyond"]), "segments_by": "text" if sliding else "window",
         "tokens_scored": n - 1, "seconds": 1.0, "peak_mem_mb": 10.0,
         "segments": [{"start": s * segment, "end": (s + 1) * segment, "ppl": ppl(acc), "tokens": int(acc[1])}
                      for s, acc in sorted(per_segment.items())]}
    r["bucket"], r["bucket_nll"] = (bucket, {str(b * bucket): round(acc[0] / acc[1], 6)
                                             for b, acc in sorted(per_bucket.items())}) if buckets else (None, None)
    return r


def none_nll(p, i):
    return 3.0 + difficulty(i) + (1.0 if p < 256 else 0.0) + (0.0 if p < TRAINED else min(4.0, (p - TRAINED) / 2000))


def flat(offset):
    return lambda p, i: 3.0 + offset + difficulty(i) + (1.0 if p < 256 else 0.0)


def reference_nll(p, i):
    return 3.0 + difficulty(i) + (1.0 if i < 256 else 0.0)


def synthetic_records(*, lengths=(32768,), reference=True, buckets=True) -> list[dict]:
    """none breaking after the trained length, yarn / self-extend flat, linear interpolation uniformly worse
    (breaking by the working rule), and optionally the same-token reference (sliding, window = trained)."""
    records = []
    for length in lengths:
        records += [make_record("none", length, none_nll, buckets=buckets),
                    make_record("yarn:factor=4", length, flat(0.08), buckets=buckets),
                    make_record("self-extend:group=8,window=1024", length, flat(0.03), buckets=buckets),
                    make_record("linear:factor=4", length, flat(0.9), buckets=buckets)]
    if reference:
        records.append(make_record("none", TRAINED, lambda p, i: 3.0 + difficulty(i) + (1.0 if i < 256 else 0.0),
                                   protocol="sliding", stride=4096, text_tokens=max(lengths), buckets=buckets))
    return records


def committed_results() -> list[dict]:
    return [r for r in json.loads(RESULTS.read_text()) if r.get("task") == "perplexity"]


def is_png(path) -> bool:
    path = Path(path)
    return path.exists() and path.stat().st_size > 1000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- smoothing and per-position data -------------------------------------------------------------------------

def test_smooth_is_a_centred_moving_average_shrinking_at_the_ends():
    assert fd.smooth([0, 0, 9, 0, 0], 3) == [0, 3, 3, 3, 0]
    assert fd.smooth([1, 2, 3, 4, 5], 5) == [2, 2.5, 3, 3.5, 4]
    assert fd.smooth([4.0, 4.0, 4.0], 5) == [4.0, 4.0, 4.0]
    assert fd.smooth([1, 5], 1) == [1, 5]
    with pytest.raises(ValueError):
        fd.smooth([1, 2, 3], 4)


def test_position_series_reads_buckets_in_numeric_order():
    r = {"segments_by": "window", "bucket": 256,
         "bucket_nll": {"1024": 4.0, "256": 2.0, "0": 1.0, "512": 3.0, "768": 3.5}}
    s = fd.position_series(r)
    assert s.starts == (0, 256, 512, 768, 1024) and s.nll == (1.0, 2.0, 3.0, 3.5, 4.0)
    assert s.width == 256 and s.by == "window" and s.smoothed
    assert s.centres == [128, 384, 640, 896, 1152]
    assert fd.display_nll(s, 3) == pytest.approx([1.5, 2.0, 17 / 6, 3.5, 3.75])


def test_coarse_buckets_are_not_smoothed_and_records_without_buckets_have_no_series():
    r = {"bucket": 4096, "segments_by": "text", "bucket_nll": {"4096": 2.0, "0": 1.0}}
    s = fd.position_series(r)
    assert s.by == "text" and s.width == 4096 and not s.smoothed
    assert s.starts == (0, 4096) and s.nll == (1.0, 2.0)
    assert fd.display_nll(s) == [1.0, 2.0]
    assert fd.position_series({"bucket": None, "bucket_nll": None, "segments_by": "window"}) is None
    assert fd.position_series({"bucket": 256, "bucket_nll": {}, "segments_by": "window"}) is None


def test_rebin_takes_the_mean_of_the_pooled_bins():
    s = fd.PositionSeries((0, 256, 512, 768, 1024), 256, (1.0, 2.0, 3.0, 5.0, 7.0))
    pooled = fd.rebin(s, 512)
    assert pooled.starts == (0, 512, 1024) and pooled.width == 512
    assert pooled.nll == pytest.approx((1.5, 4.0, 7.0))
    assert fd.rebin(s, 256) is s
    with pytest.raises(ValueError):
        fd.rebin(s, 300)


# --- reference, working rule, ratios ------------------------------------------------------------------------

def test_reference_is_the_sliding_run_with_windows_of_the_trained_length():
    records = synthetic_records()
    ref = fd.find_reference(records, TRAINED)
    assert ref["protocol"] == "sliding" and ref["length"] == TRAINED
    assert fd.find_reference(records, 4096) is None  # no sliding run of that window
    assert fd.find_reference(records[:-1], TRAINED) is None
    assert fd.find_reference(records, None) is None
    other = make_record("yarn:factor=4", TRAINED, flat(0.0), protocol="sliding", stride=4096, text_tokens=16384)
    assert fd.find_reference([ref, other], TRAINED) is ref  # the unscaled model's run preferred
    wider = make_record("none", 16384, flat(0.0), protocol="sliding", stride=4096, text_tokens=16384)
    assert fd.find_reference([wider], TRAINED) is None


def test_reference_ppl_is_the_unscaled_in_window_ppl_then_the_sliding_reference():
    records = synthetic_records()
    none = records[0]
    assert fd.reference_ppl(records, TRAINED) == none["ppl_in_window"]
    without_none = [r for r in records if not (r["method"] == "none" and r["protocol"] == "single")]
    assert fd.reference_ppl(without_none, TRAINED) == records[-1]["ppl"]
    only_methods = without_none[:-1]
    assert fd.reference_ppl(only_methods, TRAINED) == min(r["ppl_in_window"] for r in only_methods)


def test_working_rule_is_ppl_beyond_below_twice_the_reference():
    assert fd.is_working({"ppl_beyond": 39.9, "ppl": 30.0}, 20.0)
    assert not fd.is_working({"ppl_beyond": 40.0, "ppl": 30.0}, 20.0)
    assert fd.is_working({"ppl_beyond": None, "ppl": 21.0}, 20.0)  # no token past the trained length
    assert not fd.is_working({"ppl_beyond": None, "ppl": 45.0}, 20.0)
    assert fd.is_working({"ppl_beyond": 1e6}, None)
    labels = fd.working_labels(synthetic_records(), TRAINED)
    assert labels == {"yarn:factor=4", "self-extend:group=8,window=1024", "none (sliding 8192/4096)"}


def test_ratio_to_the_same_token_reference_cancels_the_text():
    records = synthetic_records()
    ref = fd.position_series(records[-1])
    x, ratio = fd.ratio_to_reference(fd.position_series(records[1]), ref)
    assert len(x) == 128 and x[0] == 128
    assert ratio == pytest.approx([math.exp(0.08)] * 128, rel=1e-4)  # yarn's constant 0.08 nats, text cancelled
    # a reference with coarse segments: both pooled to 4096 tokens
    coarse = fd.position_series(make_record("none", TRAINED, reference_nll,
                                            protocol="sliding", stride=4096, text_tokens=32768, bucket=4096))
    x, ratio = fd.ratio_to_reference(fd.position_series(records[1]), coarse)
    assert x == [2048 + 4096 * k for k in range(8)] and ratio == pytest.approx([math.exp(0.08)] * 8, rel=1e-3)


def test_ratio_to_a_constant_reference():
    s = fd.PositionSeries((0, 256, 512), 256, (math.log(20), math.log(30), math.log(40)))
    x, ratio = fd.ratio_to_reference(s, None, 20.0, k=1)
    assert x == [128, 384, 640] and ratio == pytest.approx([1.0, 1.5, 2.0])
    with pytest.raises(ValueError):
        fd.ratio_to_reference(s)


def test_ratio_panel_leaves_out_the_breaking_runs():
    panel = fd.ratio_panel(synthetic_records(), TRAINED)
    assert panel.reference == "none (sliding 8192/4096)" and panel.reference_ppl is None
    assert set(panel.curves) == {"yarn:factor=4", "self-extend:group=8,window=1024"}
    assert panel.left_out == ["none", "linear:factor=4"]
    constant = fd.ratio_panel(synthetic_records(reference=False), TRAINED)
    assert constant.reference is None and constant.reference_ppl == synthetic_records()[0]["ppl_in_window"]
    assert set(constant.curves) == {"yarn:factor=4", "self-extend:group=8,window=1024"}
    several = [{**r, "windows": 2} if r["method"] == "yarn:factor=4" else r for r in synthetic_records()]
    assert fd.ratio_panel(several, TRAINED).unaligned == ["yarn:factor=4"]
    no_reference = [r for r in synthetic_records(reference=False) if r["method"] != "none"]
    assert fd.ratio_panel(no_reference, TRAINED) is None


def test_longest_runs_take_the_longest_window_with_data():
    records = synthetic_records(lengths=(16384, 32768))
    runs = fd.longest_runs(records)
    assert runs["none"]["length"] == 32768 and runs["none (sliding 8192/4096)"]["length"] == TRAINED
    old = [{**records[4], "bucket_nll": None}] + records[:4]  # the 32K none without per-position data
    assert fd.longest_runs(old, with_positions=True)["none"]["length"] == 16384


# --- axes, panels, styles ------------------------------------------------------------------------------------

def test_axis_top_follows_the_working_runs_and_the_breaking_one_is_off_scale():
    curves = {"none": [3.0, 3.1, 7.0], "yarn": [3.0, 3.2, 3.3], "se": [2.9, 3.0, 3.1]}
    bottom, top = fd.axis_limits(curves, {"yarn", "se"})
    assert top == pytest.approx(1.5 * 3.3) and 0 < bottom < 2.9
    assert fd.axis_limits(curves, set())[1] == pytest.approx(1.5 * 7.0)
    assert fd.off_scale([1, 2, 3], curves["none"], top) == (3, 7.0)
    assert fd.off_scale([1, 2, 3], curves["yarn"], top) is None


def test_styles_are_unique_for_25_methods_and_colours_for_the_first_20():
    labels = [f"method-{i}" for i in range(25)]
    styles = fd.series_styles(labels)
    assert len(styles) == 25
    assert len({(s.color, s.marker, s.linestyle) for s in styles.values()}) == 25
    assert len({styles[label].color for label in labels[:20]}) == 20
    assert len(set(fd.PALETTE)) >= 20 and fd.REFERENCE_STYLE.color not in fd.PALETTE
    assert fd.series_styles(labels) == styles  # the same labels, the same styles
    assert fd.series_styles(["a", "b", "a"]) == fd.series_styles(["a", "b"])


def panels_of(records) -> list[str]:
    return fd.choose_panels(records, fd.ratio_panel(records, TRAINED))


def test_panels_for_one_length_and_for_several():
    assert panels_of(synthetic_records()) == ["position", "ratio"]
    assert panels_of(synthetic_records(lengths=(16384, 32768))) == ["position", "ratio", "length"]
    assert panels_of(synthetic_records(reference=False)) == ["position", "ratio"]
    assert panels_of([{**r, "bucket_nll": None} for r in synthetic_records()]) == ["summary"]
    assert panels_of([{**r, "bucket_nll": None} for r in synthetic_records(lengths=(16384, 32768))]) == ["length"]
    broken = [r for r in synthetic_records(reference=False) if r["method"] in ("none", "linear:factor=4")]
    assert panels_of(broken) == ["position"]  # nothing working to set against the reference


def test_committed_results_have_4096_token_buckets_and_the_sliding_reference():
    records = committed_results()
    assert all("bucket_nll" in r and "ppl_text_beyond" in r for r in records)
    assert len({fd.series_label(r) for r in records}) >= 18
    assert fd.choose_panels(records, fd.ratio_panel(records, TRAINED)) == ["position", "ratio", "length"]
    for r in fd.longest_runs(records, with_positions=True).values():
        s = fd.position_series(r)
        assert s.width == 4096 and not s.smoothed
        assert s.nll == pytest.approx([math.log(seg["ppl"]) for seg in r["segments"]], abs=1e-6)
    panel = fd.ratio_panel(records, TRAINED)
    assert panel.reference == "none (sliding 8192/4096)"
    assert "none" in panel.left_out and "linear:factor=2" in panel.left_out
    assert "yarn:factor=4" in panel.curves and "none" not in panel.curves


# --- the figure data, computed once ----------------------------------------------------------------------------

def moving_average(values: list[float], k: int) -> list[float]:
    """The centred moving average written out: mean of values[i - k//2 .. i + k//2] inside the list."""
    return [sum(values[j] for j in range(i - k // 2, i + k // 2 + 1) if 0 <= j < len(values))
            / len([j for j in range(i - k // 2, i + k // 2 + 1) if 0 <= j < len(values)]) for i in range(len(values))]


def test_position_panel_shows_each_run_smoothed_and_the_breaking_one_off_scale():
    records = synthetic_records()
    data = fd.perplexity_figure_data(records, TRAINED)
    assert [p.kind for p in data.panels] == ["position", "ratio"]
    position = data.panels[0]
    curves = {c.label: c for c in position.curves}
    yarn = records[1]
    raw = [yarn["bucket_nll"][str(256 * k)] for k in range(128)]
    assert curves["yarn:factor=4"].x == tuple(128 + 256 * k for k in range(128))
    assert curves["yarn:factor=4"].y == pytest.approx(moving_average(raw, 5))
    working_max = max(max(moving_average([r["bucket_nll"][k] for k in r["bucket_nll"]], 5))
                      for r in records if r["method"] in ("yarn:factor=4", "self-extend:group=8,window=1024")
                      or r["protocol"] == "sliding")
    assert position.ylim[1] == pytest.approx(1.5 * working_max)
    none_y = curves["none"].y
    first_above = next(x for x, y in zip(curves["none"].x, none_y, strict=True) if y > position.ylim[1])
    (mark,) = [m for m in position.off_scale if m.text.startswith("\u2191 none:")]
    assert mark.x == first_above and mark.peak == max(none_y)
    assert position.xlim == (0, 32768) and position.trained == TRAINED and position.shade_beyond
    assert "256-token bucket (centred moving average over 5 buckets)" in position.title


def test_ratio_panel_data_and_legend():
    data = fd.perplexity_figure_data(synthetic_records(), TRAINED)
    ratio = data.panels[1]
    assert {c.label for c in ratio.curves} == {"yarn:factor=4", "self-extend:group=8,window=1024"}
    for c, offset in zip(ratio.curves, (0.08, 0.03), strict=True):
        assert c.y == pytest.approx([math.exp(offset)] * len(c.y), rel=1e-4)
    assert ratio.unit_line == 1.0 and ratio.ylim[0] <= 0.95 and ratio.ylim[1] >= 1.05
    assert "not shown, ppl beyond >= 2 x reference in-window ppl: none, linear:factor=4" in ratio.title
    texts = [e.text for e in data.legend]
    assert texts == ["none (breaks)", "yarn:factor=4", "self-extend:group=8,window=1024", "linear:factor=4 (breaks)",
                     "none (sliding 8192/4096) - same-token reference", f"trained length {TRAINED}"]
    assert data.legend[4].style == fd.REFERENCE_STYLE and data.missing_note is None


def test_summary_and_the_series_no_panel_shows():
    records = [{**r, "bucket_nll": None} for r in synthetic_records(reference=False)]
    data = fd.perplexity_figure_data(records, TRAINED)
    (summary,) = data.panels
    assert summary.kind == "summary" and [b.label for b in summary.bars] == [r["method"] for r in records]
    assert [(b.beyond, b.inside) for b in summary.bars] == [(r["ppl_beyond"], r["ppl_in_window"]) for r in records]
    one_more = synthetic_records(reference=False) + [{**records[0], "method": "ntk:factor=4"}]
    assert fd.perplexity_figure_data(one_more, TRAINED).missing_note == \
        "no per-position data, one length only (not drawn): ntk:factor=4"
    with pytest.raises(ValueError):
        fd.perplexity_figure_data([{"ppl": None}])


def test_passkey_grid_pools_the_records_of_a_cell():
    records = [{"method": "m", "length": 100, "depth": 0.5, "correct": 1, "trials": 1},
               {"method": "m", "length": 100, "depth": 0.5, "correct": 0, "trials": 3},
               {"method": "m", "length": 200, "depth": 0.1, "correct": 2, "trials": 2},
               {"method": "m", "length": 200, "depth": 0.1, "correct": 1, "trials": 1, "keys": 2},
               {"method": "other", "length": 100, "depth": 0.1, "correct": 0, "trials": 1}]
    grid = fd.passkey_grid(records, "m", [100, 200], [0.1, 0.5])
    assert grid.counts == (((0, 0), (1, 4)), ((2, 2), (0, 0)))
    assert grid.accuracy[0][1] == 0.25 and grid.accuracy[1][0] == 1.0 and math.isnan(grid.accuracy[0][0])
    assert grid.cell_texts == [["-", "25%\n1/4"], ["100%\n2/2", "-"]]
    assert fd.passkey_grid(records, "m (2 keys)", [100, 200], [0.1, 0.5]).counts == (((0, 0), (0, 0)),
                                                                                     ((1, 1), (0, 0)))


def test_passkey_figure_data_lays_out_one_heatmap_per_method_and_task():
    records = [{"method": m, "length": n, "depth": d, "correct": 1, "trials": 2, **({"keys": k} if k > 1 else {})}
               for m in ("a", "b", "c") for k in (1, 3) for n in (100, 200) for d in (0.1, 0.5, 0.9)]
    data = fd.passkey_figure_data(records)
    assert [h.label for h in data.heatmaps] == ["a", "a (3 keys)", "b", "b (3 keys)", "c", "c (3 keys)"]
    assert (data.rows, data.columns) == (2, 4) and data.lengths == (100, 200) and data.depths == (0.1, 0.5, 0.9)
    styles = fd.series_styles(["a", "b", "c"])
    assert data.legend == tuple((m, styles[m].color) for m in "abc")
    assert data.heatmaps[1].frame_color == styles["a"].color
    assert data.size == pytest.approx((1.6 + (0.75 * 3 + 0.9) * 4, (0.5 * 2 + 1.9) * 2 + 0.6))


# --- the plots write PNGs ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["single-length", "multi-length", "sliding-reference", "constant-reference",
                                  "committed-records", "no-positions"])
def test_plot_perplexity_writes_a_png(tmp_path, kind):
    records = {
        "single-length": lambda: synthetic_records(reference=False, buckets=True)[:3],
        "multi-length": lambda: synthetic_records(lengths=(16384, 32768)),
        "sliding-reference": synthetic_records,
        "constant-reference": lambda: synthetic_records(reference=False),
        "committed-records": committed_results,
        "no-positions": lambda: synthetic_records(reference=False, buckets=False),
    }[kind]()
    path = tmp_path / "perplexity.png"
    plots.plot_perplexity(records, path, TRAINED)
    assert is_png(path)


def test_plot_perplexity_without_records_raises(tmp_path):
    with pytest.raises(ValueError):
        plots.plot_perplexity([], tmp_path / "p.png")


def passkey_records() -> list[dict]:
    return [{"task": "passkey", "method": m, "length": n, "depth": d, "correct": c, "trials": 2,
             "accuracy": c / 2} for m, c in (("none", 0), ("yarn:factor=4", 2)) for n in (8000, 16000)
            for d in (0.1, 0.5, 0.9)]


def test_plot_passkey_writes_a_png(tmp_path):
    path = tmp_path / "passkey.png"
    plots.plot_passkey(passkey_records(), path)
    assert is_png(path)


def test_write_outputs_shares_one_style_per_method(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(report, "plot_perplexity", lambda records, path, trained, *, styles: seen.update(ppl=styles))
    monkeypatch.setattr(report, "plot_passkey", lambda records, path, *, styles: seen.update(keys=styles))
    report.write_outputs(tmp_path, synthetic_records() + passkey_records())
    assert seen["ppl"] is seen["keys"]
    assert seen["ppl"]["yarn:factor=4"] != seen["ppl"]["none"]
    assert set(seen["ppl"]) >= {"none", "yarn:factor=4", "none (sliding 8192/4096)"}


def test_write_outputs_writes_both_plots(tmp_path):
    files = report.write_outputs(tmp_path, synthetic_records() + passkey_records())
    assert is_png(files["perplexity_plot"]) and is_png(files["passkey_plot"])
    assert "![perplexity](perplexity.png)" in files["report"].read_text()


def test_passkey_table_gives_counts_and_the_wilson_interval_per_task():
    records = [{"task": "passkey", "method": "none", "length": 100, "depth": d, "correct": c, "trials": 5}
               for d, c in ((0.1, 3), (0.9, 0))]
    records.append({"task": "passkey", "method": "none", "length": 100, "depth": 0.1, "correct": 1, "trials": 2,
                    "keys": 4, "jitter": 0.05})
    rows = tables.passkey_table(records).splitlines()
    # 3/10 pooled over the depths: Wilson 95% [0.1078, 0.6032]; 1/2: [0.0945, 0.9055]
    assert rows[2] == "| `none` | 30% (3/10; 11-60%) |"
    assert rows[3] == "| `none (4 keys, jitter 0.05)` | 50% (1/2; 9-91%) |"


def test_passkey_figure_has_one_heatmap_per_method_and_task_and_no_empty_panel():
    records = [{"task": "passkey", "method": m, "length": n, "depth": d, "correct": 2, "trials": 3,
                **({"keys": k} if k > 1 else {})}
               for m in ("none", "yarn:factor=4", "self-extend:group=4,window=16") for k in (1, 3)
               for n in (100, 200) for d in (0.1, 0.5)]
    records = records[:-1]  # one cell of the last panel has no record
    fig = plots.passkey_figure(fd.passkey_figure_data(records))
    heatmaps = [ax for ax in fig.axes if ax.get_images()]
    assert len(heatmaps) == 6 and len(fig.axes) == 7  # six panels on two rows of four, the colour bar; none empty
    texts = [t.get_text() for t in heatmaps[-1].texts]
    assert texts.count("67%\n2/3") == 3 and texts.count("-") == 1
    colours = {tuple(ax.spines["top"].get_edgecolor()) for ax in heatmaps}
    assert len(colours) == 3  # one frame colour per method
    assert fig.legends and [t.get_text() for t in fig.legends[0].get_texts()] == \
        ["none", "yarn:factor=4", "self-extend:group=4,window=16"]
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_csv_rows_carry_the_passkey_task_and_interval(tmp_path):
    import csv

    records = [{"task": "passkey", "method": "none", "length": 100, "depth": 0.5, "correct": 0, "trials": 10,
                "accuracy": 0.0}]
    tables.write_csv(records, tmp_path / "r.csv")
    (row,) = csv.DictReader(open(tmp_path / "r.csv"))
    assert row["keys"] == "1" and row["jitter"] == "0.0" and row["ci95_low"] == "0.0"
    assert float(row["ci95_high"]) == pytest.approx(0.2775, abs=1e-4)
