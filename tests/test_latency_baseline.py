"""The closed loop never loses to the aligned MAC baseline (issue 14): the method's MAC-targeted plan at the probed
alignment and the same MACs is measured beside the latency-aware choice, and the better one is kept."""

from __future__ import annotations

import pytest

from compressor.engine.analysis import analyze
from compressor.engine.cost import model_cost
from compressor.engine.plan import PlanOptions
from compressor.latency import ProfileSettings, paired, plan_for_latency, resolve_request, table
from compressor.latency.baseline import prefer_baseline
from tests.test_latency import FAST, cache_dir, fake_ms, residual_net  # noqa: F401 - cache_dir is a fixture


@pytest.mark.parametrize("chosen, base, wins", [
    ((0.45, 100.0), (0.55, 100.0), False),  # only the latency-aware plan meets the budget
    ((0.55, 100.0), (0.48, 100.0), True),  # only the baseline meets it
    ((0.40, 100.0), (0.48, 120.0), True),  # both meet it: the baseline keeps more MACs
    ((0.48, 120.0), (0.40, 100.0), False),  # both meet it: the latency-aware plan keeps more MACs
    ((0.48, 100.0), (0.44, 100.5), True),  # same MACs: the faster
    ((0.44, 100.0), (0.48, 100.5), False),
    ((0.70, 100.0), (0.60, 100.0), True),  # neither meets it: the faster
    ((0.60, 100.0), (0.70, 100.0), False),
])
def test_the_least_pruned_plan_that_meets_the_budget_is_kept(chosen, base, wins):
    assert prefer_baseline(chosen[0], chosen[1], base[0], base[1], wanted=0.5)[0] is wins


def block_penalty_pair(penalty: float, calls: list, keep_all_penalty: float = 0.0):
    """A fake measure_pair: the candidate's MAC fraction plus `penalty` per residual Add it lost (dropping a block
    buys nothing on this target), plus `keep_all_penalty` when it dropped none (only dropping blocks pays)."""

    def pair(original, candidate, request, input_shapes=None, warmup=None, runs=None):
        calls.append(candidate)
        adds = [sum(n.op_type == "Add" for n in m.graph.node) for m in (original, candidate)]
        macs = model_cost(candidate, input_shapes).macs / model_cost(original, input_shapes).macs
        fraction = macs + penalty * (adds[0] - adds[1]) + (keep_all_penalty if adds[0] == adds[1] else 0.0)
        return paired.PairMeasurement(10.0, 10.0 * fraction, 3)

    return pair


def plan(monkeypatch, penalty: float, keep_all_penalty: float = 0.0):
    # a launch-bound table: the latency model drops residual blocks first
    monkeypatch.setattr(table, "measure_ms", fake_ms(per_layer_ms=1.0, per_gmac_ms=1.0))
    calls = []
    monkeypatch.setattr(paired, "measure_pair", block_penalty_pair(penalty, calls, keep_all_penalty))
    analysis = analyze(residual_net(width=64, blocks=3))
    settings = ProfileSettings(**{**vars(FAST), "loop_iterations": 2})
    request = resolve_request("latency", 0.5, "cpu:1", 1, None, None, settings=settings)
    return analysis, plan_for_latency(analysis, "l1", PlanOptions(0.5, "latency"), request), calls


def test_the_baseline_replaces_a_latency_aware_plan_that_loses_to_it(cache_dir, monkeypatch):
    analysis, planned, calls = plan(monkeypatch, penalty=0.3)
    loop, baseline = planned.info["closed_loop"], planned.info["aligned_baseline"]
    assert any(c["blocks_dropped"] for c in loop)  # the latency model dropped blocks ...
    assert baseline["chosen"] and baseline["measured_fraction"] < baseline["latency_aware_fraction"]
    assert len(calls) == len(loop) + 1
    assert not planned.plan.dropped_blocks  # ... the target rewards channels: the MAC-targeted plan is kept
    assert planned.measured.fraction == pytest.approx(baseline["measured_fraction"])
    assert analysis.cost(planned.plan)[0] == pytest.approx(baseline["macs_kept"])
    assert baseline["round_to"] == planned.model.alignment
    kept = [analysis.groups[g].size - len(r) for g, r in planned.plan.removed.items() if len(r)]
    assert kept and all(k % baseline["round_to"] == 0 or k < baseline["round_to"] for k in kept)
    assert any(n.startswith("aligned MAC baseline") and "kept the baseline" in n for n in planned.plan.notes)


def test_a_latency_aware_plan_faster_than_the_baseline_stays(cache_dir, monkeypatch):
    analysis, planned, calls = plan(monkeypatch, penalty=0.0, keep_all_penalty=0.4)
    baseline = planned.info["aligned_baseline"]
    assert baseline is not None and not baseline["chosen"]
    assert baseline["measured_fraction"] > 0.5 >= baseline["latency_aware_fraction"]
    assert planned.plan.dropped_blocks  # the latency-aware plan, with its dropped blocks
    assert any("kept the latency-aware plan" in n for n in planned.plan.notes)


def test_the_baseline_can_be_switched_off(cache_dir, monkeypatch):
    monkeypatch.setattr(table, "measure_ms", fake_ms(per_layer_ms=1.0, per_gmac_ms=1.0))
    calls = []
    monkeypatch.setattr(paired, "measure_pair", block_penalty_pair(0.3, calls))
    analysis = analyze(residual_net(width=64, blocks=3))
    settings = ProfileSettings(**{**vars(FAST), "loop_iterations": 2, "aligned_baseline": False})
    planned = plan_for_latency(analysis, "l1", PlanOptions(0.5, "latency"),
                               resolve_request("latency", 0.5, "cpu:1", 1, None, None, settings=settings))
    assert planned.info["aligned_baseline"] is None and len(calls) == len(planned.info["closed_loop"])
