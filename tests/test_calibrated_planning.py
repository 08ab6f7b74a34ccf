"""Calibrated planning: data-aware importance, measured sensitivity, the allocation by sensitivity, and the measured
values of `--target latency`. Small CPU models with planted structure; real ONNX Runtime runs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from compressor import methods
from compressor.engine.analysis import analyze
from compressor.calibration.data import CalibrationSet
from compressor.calibration.importance import accumulate_grams, find_consumers, group_data_scores, refine, refit_linear
from compressor.calibration.planning import calibrated_plan, measured_importance, parse_settings
from compressor.calibration.taps import stream_tensors
from compressor.errors import CompressorError
from compressor.latency import plan_for_latency, resolve_request, table
from compressor.latency.importance import MeasuredImportance
from compressor.engine.plan import PlanOptions, baseline_value, target_value
from compressor.runtime.sessions import cpu_session
from tests.graphs import GraphBuilder, head
from tests.test_latency import FAST, dynamic_batch, fake_ms


def calib_for(model: onnx.ModelProto, n: int = 64, seed: int = 1) -> CalibrationSet:
    shape = [d.dim_value or n for d in model.graph.input[0].type.tensor_type.shape.dim]
    shape[0] = n
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return CalibrationSet.from_arrays({model.graph.input[0].name: x})


def two_branches(quiet_scale: float = 0.01) -> onnx.ModelProto:
    """x → convA → ReLU → convC and x → convB → ReLU → convD, summed: groups A and B cost the same MACs, but
    convD's weights are scaled by `quiet_scale`, so B's channels hardly reach the output."""
    b = GraphBuilder(shape=(1, 4, 8, 8), seed=3)
    a = b.conv(b.op("Relu", [b.conv("x", 4, 16)]), 16, 8)
    quiet = b.op("Relu", [b.conv("x", 4, 16)])
    w = b.const((b.rng.standard_normal((8, 16, 3, 3)) * 0.3 * quiet_scale).astype(np.float32))
    out = b.op("Add", [a, b.op("Conv", [quiet, w], pads=[1, 1, 1, 1])])
    return dynamic_batch(b.model(out))


def residual_net(width: int = 16, blocks: int = 3) -> onnx.ModelProto:
    b = GraphBuilder(shape=(1, 8, 8, 8), seed=0)
    x = b.op("Relu", [b.conv("x", 8, width)])
    for _ in range(blocks):
        y = b.conv(b.op("Relu", [b.conv(x, width, width)]), width, width)
        x = b.op("Relu", [b.op("Add", [x, y])])
    return dynamic_batch(b.model(head(b, x, width)))


def producer_group(analysis, fragment: str) -> int:
    return next(g.index for g in analysis.groups if g.prunable.any() and fragment in g.name)


def test_more_sensitive_group_is_pruned_less_and_target_is_met():
    model = two_branches()
    analysis = analyze(model)
    calib = calib_for(model)
    groups = [g.index for g in analysis.groups if g.prunable.any()]
    assert len(groups) == 2
    loud, quiet = groups  # convA is built first
    options = PlanOptions(ratio=0.3)
    uniform = methods.get("l1").plan(analysis, options)
    assert len(uniform.removed.get(loud, [])) == len(uniform.removed.get(quiet, []))
    plan = calibrated_plan(analysis, "l1", options, calib, refit=False)
    assert len(plan.removed.get(quiet, [])) > len(plan.removed.get(loud, []))
    reached = 1 - target_value(analysis, plan, "macs") / baseline_value(analysis, "macs")
    assert abs(reached - 0.3) <= 0.02
    assert plan.group_info[loud]["calib_damage"] <= plan.group_info[quiet]["calib_damage"] + 1.0


@pytest.mark.parametrize("target", ["macs", "params"])
@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_calibrated_plans_meet_the_target(target, ratio):
    model = residual_net()
    analysis = analyze(model)
    plan = calibrated_plan(analysis, "l1", PlanOptions(ratio=ratio, target=target), calib_for(model, 32))
    reached = 1 - target_value(analysis, plan, target) / baseline_value(analysis, target)
    assert abs(reached - ratio) <= 0.02, (reached, plan.notes)
    assert not plan.is_empty()


def test_without_data_importance_and_allocation_are_the_methods_own():
    model = residual_net()
    analysis = analyze(model)
    options = PlanOptions(ratio=0.4, extra={"calib_importance": "off", "calib_allocation": "method"})
    own = methods.get("l1").plan(analysis, PlanOptions(ratio=0.4))
    plan = calibrated_plan(analysis, "l1", options, calib_for(model, 8))
    assert {g: v.tolist() for g, v in plan.removed.items()} == {g: v.tolist() for g, v in own.removed.items()}


def test_obs_finds_a_duplicated_channel_and_the_refit_recovers_the_output():
    b = GraphBuilder(shape=(1, 4, 8, 8), seed=5)
    w1 = (b.rng.standard_normal((8, 4, 3, 3)) * 0.3).astype(np.float32)
    w1[6] = w1[2]  # channel 6 duplicates channel 2: removable with no loss once the consumer is refitted
    h = b.op("Relu", [b.op("Conv", ["x", b.const(w1)], pads=[1, 1, 1, 1])])
    out = b.conv(h, 8, 4)
    model = dynamic_batch(b.model(out))
    analysis = analyze(model)
    g = producer_group(analysis, "Conv")
    consumers = find_consumers(analysis, [g])
    calib = calib_for(model, 64)
    accumulate_grams(analysis.proto, consumers[g], calib, stream_tensors, batch_size=16)
    group = analysis.groups[g]
    obs = group_data_scores(group.units, group.prunable, consumers[g], "obs")
    assert int(np.argmin(obs)) in (2, 6)
    c = consumers[g][0]
    refitted = refit_linear(c, group.units[[int(np.argmin(obs))]])
    err = np.einsum("oi,ij,oj->", refitted - c.linear, c.gram, refitted - c.linear)
    scale = np.einsum("oi,ij,oj->", c.linear, c.gram, c.linear)
    assert err <= 1e-4 * scale
    energy = group_data_scores(group.units, group.prunable, consumers[g], "energy")
    act = group_data_scores(group.units, group.prunable, consumers[g], "act")
    assert np.all(np.isfinite(energy)) and np.all(energy >= 0) and np.all(act >= 0)


def test_refine_blends_and_keeps_units_without_data():
    base = np.array([1.0, 2.0, 3.0, 4.0])
    data = np.array([4.0, 3.0, 2.0, np.nan])
    assert np.argsort(refine(base, data, 0.0)).tolist() == [0, 1, 2, 3]
    full = refine(base, data, 1.0)
    assert np.argsort(full[:3]).tolist() == [2, 1, 0]
    assert full[3] == pytest.approx(base[3] / base.mean())


def test_bad_calibration_options_are_clear_errors():
    with pytest.raises(CompressorError, match="calib_importance"):
        parse_settings({"calib_importance": "magic"})
    with pytest.raises(CompressorError, match="calib_blend"):
        parse_settings({"calib_blend": "2"})
    with pytest.raises(CompressorError, match="unknown calibration option"):
        parse_settings({"calib_whatever": "1"})


def test_measured_importance_values_and_block_factor():
    damage = {0: np.array([0.0, 1.0, 4.0])}
    measured = MeasuredImportance({0: np.ones(4)}, lambda g, k: np.interp(k, [0, 2, 4], damage[g]), {7: 3.0})
    values = measured.values(0, 4, [0, 2, 4])
    assert np.allclose(values[-1] - values, [4.0, 1.0, 0.0])
    c = measured.ceiling()
    assert measured.block_factor(7, (0,), 0.5) == pytest.approx(3.0 / c)
    assert measured.block_factor(8, (0,), 0.5) == 0.5


def test_latency_allocation_keeps_the_block_whose_removal_is_measured_to_hurt(monkeypatch, tmp_path):
    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path))
    monkeypatch.setattr(table, "measure_ms", fake_ms(0.2, 1.0))
    model = residual_net(blocks=3)
    analysis = analyze(model)
    options = PlanOptions(0.3, "latency")
    request = resolve_request("latency", 0.3, "cpu:1", 1, None, None, settings=FAST)
    measured = measured_importance(analysis, "l1", options, calib_for(model, 32))
    hurt = {b: (100.0 if b == 0 else 1e-6) for b in measured.block_damage}
    planted = MeasuredImportance(measured.scores, lambda g, k: np.asarray(k, dtype=np.float64) * 10.0, hurt)
    planned = plan_for_latency(analysis, "l1", options, request, measured=planted)
    assert 0 not in planned.plan.dropped_blocks and planned.plan.dropped_blocks
    plain = plan_for_latency(analysis, "l1", options, request, measured=measured)
    assert plain.predicted_ms <= plain.budget_ms * 1.001


def test_latency_target_with_calibration_on_cpu_runs_end_to_end(monkeypatch, tmp_path):
    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path))
    import compressor

    model = residual_net(blocks=3)
    result = compressor.compress(model, method="l1", ratio=0.3, target="latency", device="cpu:1", batch=1,
                                 calib=calib_for(model, 32), method_options={"calib_probe_images": "16"})
    assert result.report["verified"] and result.report["latency"]
    assert result.report["macs_after"] < result.report["macs_before"]


def test_probe_of_a_group_runs_only_its_downstream_part_and_measures_what_the_whole_model_does():
    from compressor.calibration.sensitivity import Probe, zeroed_weights

    model = residual_net()
    analysis = analyze(model)
    feeds = list(calib_for(model, n=16).batches(8))
    groups = [g.index for g in analysis.groups if g.prunable.any()]
    parts = {g: {p.init for p, _ in analysis.group_slices(g, roles=("in",))} for g in groups}
    probe = Probe(analysis.proto, feeds, set().union(*parts.values()), parts)
    assert min(len(probe.cuts[g][0]) for g in groups) < len(analysis.proto.graph.node)  # a later group runs less
    for g in groups:
        removed = np.arange(analysis.groups[g].size // 2)
        replaced = zeroed_weights(analysis, probe.weights, g, removed)
        whole, part = probe.damage(replaced), probe.damage(replaced, g)
        assert whole > 0
        assert abs(part - whole) <= 1e-6 * whole


def test_a_model_fixing_batch_one_gets_the_grams_of_its_dynamic_batch_twin():
    from compressor.calibration.planning import calibration_consumers

    dynamic = residual_net()
    fixed = onnx.ModelProto.FromString(dynamic.SerializeToString())
    for vi in [*fixed.graph.input, *fixed.graph.output]:
        dim = vi.type.tensor_type.shape.dim[0]
        dim.ClearField("dim_param")
        dim.dim_value = 1
    calib = calib_for(dynamic, n=80)
    grams = []
    for model in (dynamic, fixed):
        analysis = analyze(model)
        groups = [g.index for g in analysis.groups if g.prunable.any()]
        consumers = calibration_consumers(analysis, calib, groups)
        grams.append([c.gram for g in groups for c in consumers[g]])
    assert len(grams[0]) == len(grams[1]) > 0
    for a, b in zip(*grams):
        assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max()
