"""--profile-budget with the closed loop: the latency table leaves time for a few whole-candidate measurements,
estimated from the network's own timing (issue 14: one int8 candidate cost a third of a 15 s budget, and the loop
stopped after one candidate that missed the budget)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from compressor.engine.analysis import analyze
from compressor.engine.plan import PlanOptions
from compressor.latency import ProfileSettings, paired, plan_for_latency, planner, resolve_request, table
from compressor.latency.loop_budget import (LOOP_RESERVE, TABLE_FLOOR_SHARE, candidate_seconds, loop_measurements,
                                            loop_reserve_s, table_budget_s)
from tests.test_latency import FAST, biased_pair, cache_dir, fake_ms, residual_net  # noqa: F401 - cache_dir: a fixture


# ------------------------------------------------------------------------------------------------- pure functions
def test_reserve_grows_with_the_cost_of_one_candidate():
    base = candidate_seconds(conversion_s=1.0, session_s=0.2, network_ms=20.0, runs_per_side=23)
    assert base == pytest.approx(1.0 + 0.4 + 2 * 23 * 0.02)
    assert candidate_seconds(2.0, 0.2, 20.0, 23) > base  # a slower conversion
    assert candidate_seconds(1.0, 0.5, 20.0, 23) > base  # slower sessions
    assert candidate_seconds(1.0, 0.2, 40.0, 23) > base  # a slower network
    assert candidate_seconds(1.0, 0.2, 20.0, 350) > base  # more runs (GPU defaults)
    reserves = [loop_reserve_s(c, 1.0, 3) for c in (0.5, 1.0, 5.0)]
    assert reserves == sorted(reserves) and reserves[0] < reserves[-1]
    assert loop_reserve_s(5.0, 1.0, 3) == pytest.approx(3 * 5.0 + 1.0)  # three candidates and the original's conversion
    assert loop_reserve_s(5.0, 1.0, 0) == 0.0


@pytest.mark.parametrize("iterations, baseline, expected", [(0, True, 0), (1, False, 1), (1, True, 2), (2, True, 3),
                                                            (4, True, LOOP_RESERVE), (4, False, LOOP_RESERVE)])
def test_measurements_reserved_never_exceed_what_the_loop_takes(iterations, baseline, expected):
    assert loop_measurements(iterations, baseline) == expected


def test_table_budget_never_exceeds_its_share_and_keeps_a_floor():
    assert table_budget_s(None, 0.75, 100.0) is None  # unbounded stays unbounded
    assert table_budget_s(20.0, 0.75, 0.0) == pytest.approx(15.0)  # a cheap loop: the share, as before
    assert table_budget_s(20.0, 1.0, 0.0) == pytest.approx(20.0)  # loop off: the whole budget
    assert table_budget_s(20.0, 0.75, 8.0) == pytest.approx(12.0)  # the reserve comes off the budget
    assert table_budget_s(20.0, 0.75, 19.5) == pytest.approx(TABLE_FLOOR_SHARE * 20.0)  # never below the floor
    assert table_budget_s(20.0, 0.05, 0.0) == pytest.approx(1.0)  # a share under the floor is still a ceiling
    budgets = [table_budget_s(s, 0.75, r) for s in (1.0, 15.0, 30.0) for r in (0.0, 2.0, 10.0, 40.0)]
    assert all(b <= 0.75 * s + 1e-12 for b, s in zip(budgets, [s for s in (1.0, 15.0, 30.0) for _ in range(4)]))
    assert table_budget_s(15.0, 0.75, 16.0) < table_budget_s(15.0, 0.75, 4.0)  # a costlier loop: less for the table


# ------------------------------------------------------------------------------------------------- end to end
NETWORK_S, MICRO_S, CANDIDATE_S = 1.0, 0.2, 2.0  # seconds each fake measurement takes on the fake clock


def fake_clock(monkeypatch):
    """A clock that moves only when something is measured: NETWORK_S per whole network and MICRO_S per micro-model
    (table.measure_ms), CANDIDATE_S per side-by-side measurement (a biased measure_pair whose first candidate misses
    the budget); returns the list of paired calls."""
    now = [0.0]
    clock = SimpleNamespace(perf_counter=lambda: now[0])
    monkeypatch.setattr(table, "time", clock)
    monkeypatch.setattr(planner, "time", clock)
    measure = fake_ms(per_layer_ms=0.2, per_gmac_ms=200.0)

    def timed_measure(model, target, batch, settings, calibration=False, input_shapes=None):
        now[0] += NETWORK_S if calibration else MICRO_S
        return measure(model, target, batch, settings, calibration, input_shapes)

    calls = []
    pair = biased_pair(1.4, calls)

    def timed_pair(*args, **kwargs):
        now[0] += CANDIDATE_S
        return pair(*args, **kwargs)

    monkeypatch.setattr(table, "measure_ms", timed_measure)
    monkeypatch.setattr(paired, "measure_pair", timed_pair)
    return calls


def plan_with_budget(profile_budget):
    analysis = analyze(residual_net(width=64, blocks=3))
    settings = ProfileSettings(**{**vars(FAST), "loop_iterations": 3})
    request = resolve_request("latency", 0.5, "cpu:1", 1, None, profile_budget, settings=settings)
    return plan_for_latency(analysis, "l1", PlanOptions(0.5, "latency"), request)


def test_a_tight_profile_budget_leaves_the_loop_a_second_candidate(cache_dir, monkeypatch):
    calls = fake_clock(monkeypatch)
    planned = plan_with_budget(12.0)
    reserve = planned.info["table"]["loop_reserve"]
    # estimated from the network's timing: a session of NETWORK_S per model and no conversion (fp32)
    assert reserve["estimated_from"] == "the network's timing" and reserve["network_conversion_s"] == 0.0
    assert reserve["measurements"] == LOOP_RESERVE and reserve["candidate_s"] == pytest.approx(CANDIDATE_S, rel=0.05)
    assert reserve["reserve_s"] == pytest.approx(LOOP_RESERVE * reserve["candidate_s"])
    assert reserve["table_budget_s"] == pytest.approx(12.0 - reserve["reserve_s"])
    assert reserve["table_budget_s"] < 0.75 * 12.0
    loop = planned.info["closed_loop"]
    assert loop[0]["measured_fraction"] > 0.5  # the first candidate misses the budget ...
    assert len(loop) >= 2 and len(calls) >= 2  # ... and the loop had the time to measure another
    assert all(c["seconds"] == pytest.approx(CANDIDATE_S) for c in loop)
    assert len(loop) == 2 and planned.info["aligned_baseline"] is not None  # the third measurement: the baseline


def test_without_a_profile_budget_nothing_is_reserved(cache_dir, monkeypatch):
    fake_clock(monkeypatch)
    planned = plan_with_budget(None)
    assert planned.info["table"]["loop_reserve"] is None and planned.info["table"]["skipped_over_budget"] == 0
