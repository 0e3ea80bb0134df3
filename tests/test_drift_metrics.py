"""Drift gate building blocks: metrics, thresholds and the drift report (no model needed)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from mllama_export.errors import MllamaExportError
from mllama_export.validate.metrics import compare
from mllama_export.validate.report import DriftReport, StageResult, stage_order
from mllama_export.validate.thresholds import Check, load_thresholds

PACKAGED = load_thresholds()


def _logits(rows: int = 64, vocab: int = 1000, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((rows, vocab)) * 3).astype(np.float32)


def _kv(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 4, 2, 64, 32)).astype(np.float32)


def _noisy(ref: np.ndarray, rel: float, seed: int = 2) -> np.ndarray:
    noise = np.random.default_rng(seed).standard_normal(ref.shape)
    return (ref + rel * np.sqrt(np.mean(ref.astype(np.float64) ** 2)) * noise).astype(ref.dtype)


def _names(violations) -> set[str]:
    return {v.metric for v in violations}


# -- metrics -------------------------------------------------------------------------------


def test_identical_arrays_are_perfect_and_pass_everywhere():
    ref = _logits()
    m = compare(ref.copy(), ref, logits=True)
    assert (m.max_abs_error, m.mean_abs_error, m.rel_l2) == (0.0, 0.0, 0.0)
    assert m.cosine == pytest.approx(1.0, abs=1e-12) and m.norm_ratio == pytest.approx(1.0)
    assert (m.top1_agreement, m.top5_agreement, m.kl_divergence) == (1.0, 1.0, 0.0)
    assert m.nonfinite == 0 and m.rows == 64 and m.numel == ref.size
    kv = _kv()
    mv = compare(kv, kv.copy(), logits=False)
    assert mv.top1_agreement is None and mv.kl_divergence is None
    for precision in ("fp32", "fp16", "bf16", "fp8"):
        assert PACKAGED.judge(m, precision, "logits") == []
        assert PACKAGED.judge(mv, precision, "vision") == []


def test_few_ulp_perturbation_passes_fp32():
    ref = _logits()
    act = ref.copy()
    for _ in range(3):  # 3 ULP up everywhere
        act = np.nextafter(act, np.float32(np.inf))
    m = compare(act, ref, logits=True)
    assert 0 < m.rel_l2 < 1e-6
    assert PACKAGED.judge(m, "fp32", "logits") == []
    kv = _kv()
    mv = compare(np.nextafter(kv, np.float32(-np.inf)), kv, logits=False)
    assert PACKAGED.judge(mv, "fp32", "vision") == []


def test_visible_perturbation_fails_fp32_but_passes_fp8():
    ref = _logits()
    m = compare(_noisy(ref, 0.03), ref, logits=True)
    assert m.rel_l2 == pytest.approx(0.03, rel=0.05)
    assert {"rel_l2", "max_abs_error", "kl_divergence"} <= _names(
        PACKAGED.judge(m, "fp32", "logits")
    )
    assert PACKAGED.judge(m, "fp8", "logits") == []
    kv = _kv()
    mv = compare(_noisy(kv, 0.03), kv, logits=False)
    assert "rel_l2" in _names(PACKAGED.judge(mv, "fp32", "vision"))
    assert "rel_l2" in _names(PACKAGED.judge(mv, "fp16", "vision"))
    assert PACKAGED.judge(mv, "fp8", "vision") == []


def test_swapped_rows_fail_top1():
    ref = _logits()
    m = compare(ref[::-1].copy(), ref, logits=True)
    assert m.top1_agreement < 0.1
    assert "top1_agreement" in _names(PACKAGED.judge(m, "fp8", "logits"))


def test_top1_flip_at_near_tie_is_seen_by_top1_only():
    # Every row has a near-tie between tokens 0 and 1; the actual swaps them.
    ref = np.zeros((32, 50), np.float32)
    ref[:, 0], ref[:, 1] = 10.0, 9.999
    act = ref.copy()
    act[:, [0, 1]] = act[:, [1, 0]]
    m = compare(act, ref, logits=True)
    assert m.top1_agreement == 0.0 and m.top5_agreement == 1.0
    assert m.rel_l2 < 2e-4 and m.kl_divergence < 1e-6
    assert _names(PACKAGED.judge(m, "fp8", "logits")) == {"top1_agreement"}


def test_top5_definition_reference_top1_within_actual_top5():
    vocab = 20
    ref = np.zeros((2, vocab))
    ref[:, 7] = 5.0  # reference top-1 is token 7 in both rows
    act = np.zeros((2, vocab))
    act[0, :4] = [9, 8, 7, 6]  # token 7 (score 0) ranks 5th: 4 tokens score strictly higher
    act[1, :5] = [9, 8, 7, 6, 5]  # ranks 6th: 5 tokens score strictly higher
    m = compare(act, ref, logits=True)
    assert m.top5_agreement == 0.5 and m.top1_agreement == 0.0


def test_kl_matches_closed_form_and_is_stable_at_large_scale():
    ref = np.array([[0.0, math.log(3.0)]])  # p = (1/4, 3/4)
    act = np.array([[0.0, 0.0]])  # q = (1/2, 1/2)
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert compare(act, ref, logits=True).kl_divergence == pytest.approx(expected, rel=1e-12)
    big = compare(act * 1e4 + 5e4, ref * 1e4 + 5e4, logits=True)
    assert big.kl_divergence == pytest.approx(math.log(2.0))  # p -> (0, 1), q = (1/2, 1/2)
    half = compare(_logits().astype(np.float16), _logits().astype(np.float16), logits=True)
    assert half.kl_divergence == 0.0


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_actual_never_passes(bad):
    ref = _logits()
    act = ref.copy()
    act[3, 5] = bad
    m = compare(act, ref, logits=True)
    assert m.nonfinite == 1 and not m.finite
    assert m.rel_l2 == math.inf and m.max_abs_error == math.inf and m.cosine == -math.inf
    assert m.kl_divergence == math.inf and m.top1_agreement == pytest.approx(63 / 64)
    for precision in ("fp32", "fp8"):
        names = _names(PACKAGED.judge(m, precision, "logits"))
        assert {"nonfinite", "rel_l2", "cosine", "kl_divergence"} <= names
    kv = _kv()
    kv_bad = kv.copy()
    kv_bad.flat[0] = bad
    assert "nonfinite" in _names(PACKAGED.judge(compare(kv_bad, kv, False), "fp8", "vision"))


def test_bad_inputs_are_user_errors():
    ref = _logits(4, 10)
    bad_ref = ref.copy()
    bad_ref[0, 0] = np.nan
    with pytest.raises(MllamaExportError, match="reference output holds 1 NaN/inf"):
        compare(ref, bad_ref, logits=True)
    with pytest.raises(MllamaExportError, match=r"actual \(4, 10\), reference \(4, 9\)"):
        compare(ref, ref[:, :9], logits=True)
    with pytest.raises(MllamaExportError, match="empty"):
        compare(ref[:0], ref[:0], logits=False)


def test_zero_reference():
    z = np.zeros((3, 4), np.float32)
    assert compare(z, z, False).rel_l2 == 0.0
    m = compare(z + 1, z, False)
    assert m.rel_l2 == math.inf and m.cosine == 0.0


# -- thresholds ----------------------------------------------------------------------------


def test_packaged_thresholds_are_complete_and_ordered():
    assert PACKAGED.version and PACKAGED.precisions == ("fp32", "fp16", "bf16", "fp8")
    order = ["fp32", "fp16", "bf16", "fp8"]
    for kind in ("vision", "logits"):
        lim = [PACKAGED.limits_for(p, kind) for p in order]
        assert [x["max_rel_l2"] for x in lim] == sorted(x["max_rel_l2"] for x in lim)
        assert [x["min_cosine"] for x in lim] == sorted(
            (x["min_cosine"] for x in lim), reverse=True
        )
    logits = [PACKAGED.limits_for(p, "logits") for p in order]
    for key in ("min_top1_agreement", "min_top5_agreement"):
        assert [x[key] for x in logits] == sorted((x[key] for x in logits), reverse=True)
    assert [x["max_kl_divergence"] for x in logits] == sorted(
        x["max_kl_divergence"] for x in logits
    )
    assert PACKAGED.limits_for("fp32", "logits")["max_rel_l2"] <= 1e-4
    assert PACKAGED.limits_for("fp32", "logits")["min_cosine"] >= 0.99999
    for x in logits:  # the one-sigma swing the rel_l2 limit allows on a logit difference
        assert x["top1_tie_margin"] == pytest.approx(2**0.5 * x["max_rel_l2"], rel=0.02)


def _write(tmp_path, data) -> str:
    path = tmp_path / "limits.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def _valid() -> dict:
    return {
        "version": "test-1",
        "precisions": {
            "fp32": {
                "vision": {"max_rel_l2": 0.5, "min_cosine": 0.5},
                "logits": {
                    "max_rel_l2": 0.5,
                    "min_cosine": 0.5,
                    "min_top1_agreement": 0.0,
                    "min_top5_agreement": 0.0,
                    "max_kl_divergence": 1.0,
                },
            }
        },
    }


def _mutated(path: tuple, value) -> dict:
    data = _valid()
    node = data
    for key in path[:-1]:
        node = node[key]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return data


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_mutated(("version",), KeyError), r"missing required key\(s\) \['version'\].*precisions"),
        (_mutated(("version",), 3), "version is 3; expected a non-empty string"),
        (
            _mutated(("precisions", "fp4"), {}),
            r"precisions has unknown key\(s\) \['fp4'\].*'fp32', 'fp16', 'bf16', 'fp8'",
        ),
        (
            _mutated(("precisions", "fp32", "text"), {}),
            r"fp32 has unknown key\(s\) \['text'\].*'vision', 'logits'",
        ),
        (
            _mutated(("precisions", "fp32", "vision", "min_top1_agreement"), 0.9),
            r"vision has unknown key\(s\) \['min_top1_agreement'\].*'max_rel_l2', 'min_cosine', 'max_abs_error'",
        ),
        (
            _mutated(("precisions", "fp32", "logits", "max_rel_l2"), "1e-4"),
            r"fp32\.logits\.max_rel_l2 is '1e-4'; expected a finite number",
        ),
        (
            _mutated(("precisions", "fp32", "logits", "max_rel_l2"), True),
            "max_rel_l2 is True; expected a finite number",
        ),
        (
            _mutated(("precisions", "fp32", "logits", "min_cosine"), 1.5),
            r"min_cosine is 1.5; expected a number in \[0, 1\]",
        ),
        (
            _mutated(("precisions", "fp32", "logits", "max_kl_divergence"), KeyError),
            r"logits is missing required key\(s\) \['max_kl_divergence'\]",
        ),
        (
            _mutated(("precisions", "fp32", "vision", "top1_tie_margin"), 0.1),
            r"vision has unknown key\(s\) \['top1_tie_margin'\]",
        ),
        (
            _mutated(("precisions", "fp32", "logits", "top1_tie_margin"), -0.1),
            r"top1_tie_margin is -0.1; expected a finite number >= 0",
        ),
        (_mutated(("precisions",), []), r"precisions is \[\]; expected a non-empty object"),
        (_mutated(("comment",), "x"), r"has unknown key\(s\) \['comment'\]"),
        ('{"version": "1", "precisions": {NaN}}', "not valid JSON.*line 1"),
        (
            '{"version": "1", "precisions": {"fp32": {"vision": {"max_rel_l2": NaN, '
            '"min_cosine": 0.5}}}}',
            "max_rel_l2 is nan; expected a finite number",
        ),  # fmt: skip
    ],
)
def test_thresholds_schema_errors_name_what_exists(tmp_path, data, message):
    with pytest.raises(MllamaExportError, match=message):
        load_thresholds(_write(tmp_path, data))


def test_missing_thresholds_file(tmp_path):
    with pytest.raises(MllamaExportError, match="does not exist"):
        load_thresholds(tmp_path / "nope.json")


def test_user_override_file(tmp_path):
    user = load_thresholds(_write(tmp_path, _valid()))
    assert user.version == "test-1" and user.source.endswith("limits.json")
    ref = _logits()
    m = compare(_noisy(ref, 0.03), ref, logits=True)
    assert PACKAGED.judge(m, "fp32", "logits") != []
    assert user.judge(m, "fp32", "logits") == []
    with pytest.raises(MllamaExportError, match="precision 'fp8'.*it has: fp32"):
        user.judge(m, "fp8", "logits")
    vision_metrics = compare(_kv(), _kv(), logits=False)
    with pytest.raises(MllamaExportError, match="logits=True"):
        user.judge(vision_metrics, "fp32", "logits")


def test_check_ratio_is_linear_in_error_for_every_metric():
    assert Check("rel_l2", "max", 2e-4, 1e-4).ratio == pytest.approx(2.0)
    # 1 - cos grows with the square of the error: 4x the shortfall reads as 2x.
    assert Check("cosine", "min", 1 - 4e-5, 1 - 1e-5).ratio == pytest.approx(2.0, rel=1e-6)
    assert Check("kl_divergence", "max", 4e-3, 1e-3).ratio == pytest.approx(2.0)
    assert Check("top1_agreement", "min", 0.8, 0.9).ratio == pytest.approx(2.0)
    assert Check("top5_agreement", "min", 1.0, 1.0).ratio == 0.0
    assert not Check("rel_l2", "max", math.nan, 1.0).passed
    assert Check("cosine", "min", 0.99, 0.99).passed  # limits are inclusive


# -- report --------------------------------------------------------------------------------


def _metrics(rel: float, logits: bool = True, nan: bool = False):
    if logits:  # a clear winner per row, so that moderate noise does not flip the argmax
        ref = _logits(8, 100)
        ref[np.arange(8), np.arange(8) * 7] += 10.0
    else:
        ref = _kv()
    act = _noisy(ref, rel) if rel else ref.copy()
    if nan:
        act.flat[0] = np.nan
    return compare(act, ref, logits=logits)


def _report(precision: str = "fp16") -> DriftReport:
    rep = DriftReport([], precision, PACKAGED.version, "torch-fp32", "onnxruntime")
    # Deliberately recorded out of order.
    for stage, rel in [("decode[2]", 0.05), ("prefill", 1e-3), ("decode[0]", 2e-3)]:
        rep.record(stage, "a", _metrics(rel), PACKAGED)
    rep.record("decode[1]", "a", _metrics(0.02), PACKAGED)
    rep.record("vision", "a", _metrics(1e-3, logits=False), PACKAGED)
    rep.record("vision", "b", _metrics(0.0, logits=False), PACKAGED)
    rep.record("prefill", "b", _metrics(0.0), PACKAGED)
    rep.record("decode[0]", "b", _metrics(0.5, nan=True), PACKAGED)
    return rep


def test_report_ordering_first_failure_worst_and_summary():
    rep = _report()
    assert not rep and rep.cases == ["a", "b"]
    assert [(r.case, r.stage) for r in rep.ordered()] == [
        ("a", "vision"),
        ("a", "prefill"),
        ("a", "decode[0]"),
        ("a", "decode[1]"),
        ("a", "decode[2]"),
        ("b", "vision"),
        ("b", "prefill"),
        ("b", "decode[0]"),
    ]
    first = rep.first_failure
    assert (first.case, first.stage) == ("a", "decode[1]")  # not decode[2], recorded first
    by_case = rep.first_failure_by_case()
    assert by_case["b"].stage == "decode[0]"
    worst = rep.worst
    assert (worst.case, worst.stage, worst.check.metric) == ("b", "decode[0]", "nonfinite")
    line = rep.summary_line()
    assert line.startswith("FAIL fp16 onnxruntime vs torch-fp32")
    assert "nonfinite=1 (limit <= 0) at decode[0] of case 'b'" in line
    assert "drift starts at decode[1] of case 'a'" in line


def test_report_worst_without_nan_names_metric_value_limit_stage_case():
    rep = _report()
    rep.results = [r for r in rep.results if r.case == "a"]
    worst = rep.worst
    assert (worst.stage, worst.check.metric) == ("decode[2]", "rel_l2")
    line = rep.summary_line()
    rel = worst.check.value
    assert f"rel_l2={rel:.3g}" in line and "(limit <= 0.01) at decode[2] of case 'a'" in line


def test_passing_report_summary():
    rep = DriftReport([], "fp8", PACKAGED.version, "torch-fp32", "trt")
    rep.record("vision", "x", _metrics(1e-3, logits=False), PACKAGED)
    rep.record("prefill", "x", _metrics(1e-3), PACKAGED)
    rep.record("decode[0]", "x", _metrics(0.02), PACKAGED)
    assert rep and rep.first_failure is None
    line = rep.summary_line()
    assert line.startswith("PASS fp8 trt vs torch-fp32") and "worst " in line
    assert "of case 'x'" in line and rep.worst.check.passed


def test_report_rejects_empty_duplicates_and_bad_stage_names():
    empty = DriftReport([], "fp32", "v", "ref", "be")
    assert not empty and empty.summary_line().startswith("FAIL") and empty.worst is None
    rep = _report()
    with pytest.raises(ValueError, match="twice"):
        rep.record("prefill", "a", _metrics(0.0), PACKAGED)
    with pytest.raises(ValueError, match="unknown stage name"):
        StageResult("decode", "a", _metrics(0.0))
    assert stage_order("decode[10]") > stage_order("decode[9]") > stage_order("prefill")


def test_write_produces_json_markdown_and_a_real_png(tmp_path):
    rep = _report()
    paths = rep.write(tmp_path / "out")
    assert sorted(p.name for p in paths.values()) == ["drift.json", "drift.md", "drift.png"]
    data = json.loads(paths["json"].read_text())  # strict JSON: inf/nan written as strings
    assert data["passed"] is False and data["first_failure"] == {"case": "a", "stage": "decode[1]"}
    assert data["cases"][1]["stages"][2]["metrics"]["rel_l2"] == "inf"
    assert [s["stage"] for s in data["cases"][0]["stages"]][:2] == ["vision", "prefill"]
    md = paths["md"].read_text()
    assert "| stage | rel_l2 | cosine | top1 | top5 | kl (nats) | max_abs | verdict |" in md
    assert "## Case `a`: FAIL, drift starts at decode[1]" in md and "**FAIL: " in md
    png = paths["png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    from PIL import Image

    with Image.open(paths["png"]) as im:
        assert im.size[0] >= 1000 and im.size[1] >= 500


def test_top1_counts_a_near_tie_flip_only_beyond_the_tie_tolerance():
    reference = np.array([[3.00, 2.90, 0.0], [3.0, 1.0, 0.0]])
    actual = np.array([[2.95, 2.96, 0.0], [1.0, 3.0, 0.0]])  # both rows flip their argmax
    assert compare(actual, reference, logits=True).top1_agreement == 0.0
    tied = compare(actual, reference, logits=True, tie_tolerance=0.25)
    # row 0: the reference scores the flipped choice 0.1 below its best -> a tie
    # row 1: 2.0 below its best -> a real disagreement, whatever the tolerance allows
    assert tied.top1_agreement == 0.5


def test_top1_tie_margin_scales_with_each_reference_rows_rms():
    # Two rows with the same relative near-tie at logit scales 1 and 10; both flip.
    reference = np.array([[1.0, 0.9, -1.0, -0.9], [10.0, 9.0, -10.0, -9.0]])
    actual = reference[:, [1, 0, 2, 3]]
    rms = np.sqrt(np.mean(reference**2, axis=1))  # 0.95 and 9.5: gaps 0.105 and 0.105 RMS
    assert compare(actual, reference, logits=True, tie_margin=0.1).top1_agreement == 0.0
    assert compare(actual, reference, logits=True, tie_margin=0.11).top1_agreement == 1.0
    # an absolute tolerance of 0.1 ties only the first row; max() of the two rules applies
    assert compare(actual, reference, logits=True, tie_tolerance=0.1).top1_agreement == 0.5
    both = compare(actual, reference, logits=True, tie_tolerance=0.1, tie_margin=0.05)
    assert both.top1_agreement == 0.5 and 0.1 / rms[0] > 0.105 > 0.1 / rms[1]


def test_tie_margin_is_a_parameter_not_a_limit(tmp_path):
    data = _mutated(("precisions", "fp32", "logits", "top1_tie_margin"), 0.2)
    user = load_thresholds(_write(tmp_path, data))
    assert user.ties("fp32") == {"tie_tolerance": 0.0, "tie_margin": 0.2}
    m = compare(_logits(), _logits(), logits=True)
    assert "top1_tie_margin" not in {c.metric for c in user.checks(m, "fp32", "logits")}
    assert PACKAGED.ties("fp8") == {"tie_tolerance": 0.0, "tie_margin": 0.21}
    assert PACKAGED.ties("fp16")["tie_tolerance"] == 0.25


def test_each_case_line_and_the_plot_title_name_the_metric_that_decides_the_verdict(tmp_path):
    """The fp8 verdict can be decided by cosine while rel_l2 is well within its limit: the
    per-case line, drift.png's title and its lower panel name the deciding metric."""
    from mllama_export.validate.gate import _case_line
    from mllama_export.validate.report import DriftReport, StageResult
    from mllama_export.validate.thresholds import Check

    rng = np.random.default_rng(0)
    ref = rng.standard_normal((4, 64))
    m = compare(ref + 0.01 * rng.standard_normal(ref.shape), ref, logits=True)
    checks = (Check("rel_l2", "max", 0.01, 0.15), Check("cosine", "min", 0.994, 0.99))
    result = StageResult("decode[0]", "c", m, (), checks)
    line = _case_line("c", [result], 1.0)
    assert "pass; decided by cosine=0.994 (limit >= 0.99) at decode[0], 77% of its limit" in line
    assert "worst rel_l2" in line
    report = DriftReport([result], "fp8", "t", "ref", "ort")
    assert report.worst.check.metric == "cosine"
    assert report.write(tmp_path)["png"].stat().st_size > 10_000
