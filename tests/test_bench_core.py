"""The pure parts of the benchmark core (bench/timing.py, core.py, report.py): the ratios every
benchmark table reports, the order the timer calls the compared implementations in, the table
layout and the files gpu_check.sh and RESULTS.md are made from."""

import csv
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import core  # noqa: E402
import report  # noqa: E402
import timing  # noqa: E402


def rec(case, impl, times_ms, mode="fwd", group=0):
    times = sorted(times_ms)
    ms = times[len(times) // 2] if len(times) % 2 else (times[len(times) // 2 - 1] + times[len(times) // 2]) / 2
    return dict(case=case, impl=impl, mode=mode, ms=ms, times_ms=list(times_ms), group=group)


# ----------------------------------------------------------------------------------------------
# Ratios
# ----------------------------------------------------------------------------------------------
def test_paired_takes_the_median_of_per_round_ratios():
    # rounds 2 and 3 ran under load for both: per round 2.0 each; the medians' ratio is not 2
    num, den = [20.0, 60.0, 80.0], [10.0, 30.0, 40.0]
    assert core.paired(num, den, 60.0, 30.0, same_rounds=True) == pytest.approx(2.0)
    assert core.paired([20.0, 30.0, 90.0], [10.0, 30.0, 30.0], 30.0, 30.0, True) == pytest.approx(2.0)


def test_paired_falls_back_to_the_ratio_of_medians():
    assert core.paired([20.0, 30.0, 90.0], [10.0, 30.0, 30.0], 30.0, 30.0, False) == pytest.approx(1.0)
    # under 3 pairs: one pair is fragile
    assert core.paired([20.0, 90.0], [10.0, 30.0], 55.0, 20.0, True) == pytest.approx(2.75)


def test_paired_ratio_of_records():
    a, b = rec("c", "sdpa", [20, 60, 80]), rec("c", "longattn", [10, 30, 40])
    assert core.paired_ratio(a, b) == pytest.approx(2.0)
    b_other_run = dict(b, group=1)
    assert core.paired_ratio(a, b_other_run) == pytest.approx(60 / 30)
    assert core.paired_ratio(dict(a, group=None), dict(b, group=None)) == pytest.approx(60 / 30)
    # records saved before they carried a group were interleaved per case: paired
    legacy = [{k: v for k, v in r.items() if k != "group"} for r in (a, b)]
    assert core.paired_ratio(*legacy) == pytest.approx(2.0)
    assert core.paired_ratio(a, None) is None
    assert core.paired_ratio(dict(a, ms=None), b) is None


def test_ratio_of_measurements_pairs_only_the_same_group():
    a = timing.Measurement(lambda: None, times=[2.0, 6.0, 8.0], group=3)
    b = timing.Measurement(lambda: None, times=[1.0, 3.0, 4.0], group=3)
    c = timing.Measurement(lambda: None, times=[1.0, 3.0, 8.0], group=4)
    assert core.ratio(a, b) == pytest.approx(2.0)
    assert core.ratio(a, c) == pytest.approx(6.0 / 3.0)


def test_set_speedups_against_longattn_of_the_same_case_and_mode():
    records = [rec("c", "longattn", [10, 30, 40]), rec("c", "sdpa", [20, 60, 80]),
               rec("c", "flex", [15, 15, 15]), rec("c", "sdpa", [5, 5, 5], mode="fwdbwd"),
               dict(rec("d", "sdpa", [1, 1, 1]))]
    core.set_speedups(records)
    assert [r["longattn_speedup"] for r in records] == [pytest.approx(1.0), pytest.approx(2.0),
                                                       pytest.approx(0.5), None, None]


def test_best_alternative_is_the_fastest_other_measured_implementation():
    records = [rec("c", "longattn", [10, 10, 10]), rec("c", "sdpa", [30, 30, 30]),
               rec("c", "flex", [20, 20, 20]), rec("c", "flash", [5, 5, 5]),
               dict(rec("c", "flash_attn", [1, 1, 1]), ms=None),
               rec("d", "longattn", [10, 10, 10], mode="fwdbwd"), rec("d", "sdpa", [40, 40, 40], mode="fwdbwd"),
               rec("c", "longattn", [10, 10, 10], mode="fwdbwd"), rec("c", "sdpa", [35, 35, 35], mode="fwdbwd"),
               rec("e", "sdpa", [1, 1, 1])]  # no longattn: no row
    rows = core.best_alternatives(records, exclude=("flash",))
    assert [(c, m, i) for c, m, i, _ in rows] == [("c", "fwd", "flex"), ("c", "fwdbwd", "sdpa"),
                                                  ("d", "fwdbwd", "sdpa")]
    assert [v for *_, v in rows] == [pytest.approx(2.0), pytest.approx(3.5), pytest.approx(4.0)]
    assert records[0]["best_alternative"] == "flex"
    assert records[0]["best_alternative_speedup"] == pytest.approx(2.0)
    lines = core.best_alternative_lines(rows)
    assert lines[1] == "- c fwd: flex 2.00x"
    assert core.best_alternative_lines([]) == []


def test_error_note_keeps_the_first_line():
    note = core.error_note(RuntimeError("CUDA error: illegal address\nmore\nlines"))
    assert note == "error: RuntimeError: CUDA error: illegal address"
    assert core.error_note(ValueError("")) == "error: ValueError: "
    assert len(core.error_note(ValueError("x" * 500))) == len("error: ValueError: ") + 200


# ----------------------------------------------------------------------------------------------
# Timer
# ----------------------------------------------------------------------------------------------
def test_plan_reps_fits_the_budget_within_bounds():
    assert timing.plan_reps(0.1, 1.0, 1, 5) == 5
    assert timing.plan_reps(1.0, 2.5, 1, 5) == 2
    assert timing.plan_reps(10.0, 2.5, 1, 5) == 1  # a slow call is timed once
    assert timing.plan_reps(10.0, 2.5, 3, 50) == 3
    assert timing.plan_reps(0.0, 1.0, 1, 7) == 7
    assert timing.plan_reps(123.0, None, 1, 4) == 4


def test_inner_calls_and_cuda_rep():
    assert timing.inner_calls(0.01, 0.0) == 1
    assert timing.inner_calls(0.05, 0.04) == 1
    assert timing.inner_calls(1e-5, 0.04) == 4000
    assert timing.cuda_rep_ms(0.005, 0.150, 3, 50) == pytest.approx(150.0)
    assert timing.cuda_rep_ms(0.002, 0.150, 3, 50) == pytest.approx(100.0)  # max_reps
    assert timing.cuda_rep_ms(0.100, 0.150, 3, 50) == pytest.approx(300.0)  # min_reps
    assert timing.cuda_rep_ms(1e-5, 0.150, 3, 50) == pytest.approx(0.5)  # max_reps


def test_measure_all_warms_up_then_interleaves_round_robin():
    calls = []

    def fn(name):
        return lambda: calls.append(name)
    ms = [timing.Measurement(fn(n), name=n, max_reps=3) for n in "abc"]
    timing.measure_all(ms)
    # one warm-up call each, then rounds, each starting one implementation later
    assert "".join(calls) == "abc" + "abc" + "bca" + "cab"
    assert [len(m.times) for m in ms] == [3, 3, 3]
    assert len({m.group for m in ms}) == 1 and ms[0].method == "round-robin"
    again = timing.compare({"x": lambda: None}, 2)
    assert again["x"].group != ms[0].group


def test_measure_all_extra_warmup_reset_and_errors():
    calls = []

    def boom():
        raise RuntimeError("no backward")
    ms = [timing.Measurement(lambda: calls.append("f"), name="f", max_reps=3, extra_warmup=True),
          timing.Measurement(boom, name="bad", max_reps=3),
          timing.Measurement(lambda: calls.append("g"), name="g", max_reps=2,
                             reset=lambda: calls.append("r"))]
    timing.measure_all(ms, keep_going=True)
    assert isinstance(ms[1].error, RuntimeError) and ms[1].times == []
    assert len(ms[0].times) == 3 and ms[0].first is not None  # the warm call counts as a rep
    assert calls.count("f") == 1 + 3 and calls.count("g") == 1 + 2
    assert all(calls[i - 1] == "r" for i, c in enumerate(calls) if c == "g")
    with pytest.raises(RuntimeError):
        timing.measure_all([timing.Measurement(boom)])


def test_self_timed_measurements_report_their_own_time():
    m = timing.compare({"x": lambda: None}, 1)["x"]
    assert m.times[0] >= 0
    st = timing.Measurement(lambda: 0.25, max_reps=3, self_timed=True)
    timing.measure_all([st])
    assert st.times == [0.25, 0.25, 0.25] and st.median == 0.25


@pytest.fixture
def fake_cuda(monkeypatch):
    """The CUDA path without a GPU: no-op synchronizations, every event-timed call 2 ms."""
    monkeypatch.setattr(timing, "sync", lambda device: None)
    monkeypatch.setattr(timing, "_event_time", lambda m, device: 0.002)


def test_cuda_uses_do_bench_when_triton_imports(fake_cuda, monkeypatch):
    seen = {}

    def do_bench(fn, warmup, rep, return_mode):
        seen.update(warmup=warmup, rep=rep, return_mode=return_mode)
        return [1.0, 2.0, 4.0]
    monkeypatch.setattr(timing, "_do_bench", lambda: do_bench)
    m = timing.measure(lambda: None, "cuda", budget_s=0.15, min_reps=3, max_reps=50)
    assert m.method == "triton do_bench" and m.group is None
    assert m.times == [0.001, 0.002, 0.004] and m.n == 3
    assert seen == dict(warmup=1, rep=pytest.approx(100.0), return_mode="all")


def test_cuda_events_without_triton_or_with_a_reset(fake_cuda, monkeypatch):
    monkeypatch.setattr(timing, "_do_bench", lambda: None)
    m = timing.measure(lambda: None, "cuda", budget_s=0.01, min_reps=3, max_reps=50)
    assert m.method == "cuda events" and m.times == [0.002] * 5

    def old_do_bench(fn, warmup, rep, return_mode):  # a triton without return_mode="all"
        raise AssertionError(return_mode)
    monkeypatch.setattr(timing, "_do_bench", lambda: old_do_bench)
    assert timing.measure(lambda: None, "cuda", budget_s=0.01, min_reps=3).method == "cuda events"
    monkeypatch.setattr(timing, "_do_bench", lambda: pytest.fail("do_bench cannot reset between calls"))
    resets = []
    ms = timing.compare({"x": lambda: None}, 4, "cuda", reset=lambda: resets.append(1))
    assert ms["x"].method == "cuda events" and len(ms["x"].times) == 4


def test_core_measure_fills_records():
    entries = [core.Entry(dict(case="c", impl="longattn", mode="fwd", ms=None, note=""), lambda: None, 2e9, 3),
               core.Entry(dict(case="c", impl="sdpa", mode="fwd", ms=None, note="x"),
                          lambda: 1 / 0, 2e9, 3)]
    core.measure(entries, "cpu", 1.0, core.CPU_FIELDS)
    r, bad = entries[0].rec, entries[1].rec
    assert r["reps"] == 3 and len(r["times_ms"]) == 3 and r["ms"] > 0
    assert r["gflops"] == pytest.approx(2e9 / (r["ms"] / 1e3) / 1e9)
    assert {"min_ms", "first_call_s", "group", "timer"} <= set(r)
    assert bad["ms"] is None and bad["note"].startswith("error: ZeroDivisionError")


# ----------------------------------------------------------------------------------------------
# Tables and files
# ----------------------------------------------------------------------------------------------
def test_markdown_table_free_last_column():
    lines = report.markdown_table(("case", "ms", "note"), [("a", "1.00", "long note"), ("bbb", "-", "")],
                                  free_last=True)
    assert lines == ["| case | ms   | note |",
                     "|------|------|---|",
                     "| a    | 1.00 | long note |",
                     "| bbb  | -    |  |"]


def test_markdown_table_right_aligned_columns():
    lines = report.markdown_table(["case", "x sdpa"], [["causal", "1.50x"], ["w", "12.00x"]], right=range(1, 2))
    assert lines == ["| case   | x sdpa |",
                     "|--------|-------:|",
                     "| causal |  1.50x |",
                     "| w      | 12.00x |"]


def test_fmt():
    assert report.fmt_ms(None) == "-" and report.fmt_ms(12.345) == "12.3" and report.fmt_ms(1.234) == "1.23"
    assert report.fmt(None) == "-" and report.fmt(2.5, "{:.2f}x") == "2.50x"


def test_writers(tmp_path):
    result = dict(meta=dict(dtype=torch.bfloat16), records=[dict(case="c", ms=1.5, extra=[1, 2])])
    report.write_json(str(tmp_path / "r.json"), result)
    assert report.read_json(str(tmp_path / "r.json")) == dict(meta=dict(dtype="torch.bfloat16"),
                                                               records=[dict(case="c", ms=1.5, extra=[1, 2])])
    report.write_csv(str(tmp_path / "r.csv"), result["records"], ["case", "ms", "note"])
    with open(tmp_path / "r.csv") as f:
        assert list(csv.DictReader(f)) == [dict(case="c", ms="1.5", note="")]
    report.write_text(str(tmp_path / "sub" / "r.md"), "| a |\n")
    assert (tmp_path / "sub" / "r.md").read_text() == "| a |\n"
    json.loads((tmp_path / "r.json").read_text())
