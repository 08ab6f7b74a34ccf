"""`--target latency`: the latency table and its cache, the allocation, the budget, the check, and clean failures.

Real timings are taken on cpu:1 with few runs (never asserted on); the allocation tests use a fake latency function
(milliseconds from node counts and MACs) so their answers are deterministic.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest

import compressor
from compressor import methods
from compressor.engine.analysis import analyze
from compressor.engine.cost import model_cost
from compressor.errors import CompressorError
from compressor.latency import ProfileSettings, check, paired, plan_for_latency, planner, resolve_request, table
from compressor.latency.allocate import BlockChoice, GroupChoice, ItemCost, allocate_latency
from compressor.latency.importance import kept_value, method_scores, unit_values
from compressor.latency.micro import find_items, micro_model, structure_key
from compressor.latency.grid import (ItemTable, aligned_widths, fit_fixed_share, interpolation_weights, level_points,
                                     level_widths)
from compressor.latency.micro import CostItem
from compressor.engine.plan import PlanOptions
from compressor.engine.surgery import apply_plan
from tests.graphs import GraphBuilder, head

REPO = Path(__file__).resolve().parents[1]
FAST = ProfileSettings(warmup=1, min_runs=2, max_runs=3, seconds_per_point=0.001, calibration_runs=3,
                       calibration_seconds=0.01, check_warmup=1, check_runs=3, loop_iterations=0)


def residual_net(width: int = 32, hw: int = 16, blocks: int = 2, seed: int = 0) -> onnx.ModelProto:
    """stem conv → `blocks` residual blocks (conv-BN-ReLU, conv-BN, Add, ReLU) → pool/gemm head, batch fixed at 1."""
    b = GraphBuilder(shape=(1, 8, hw, hw), seed=seed)
    x = b.op("Relu", [b.bn(b.conv("x", 8, width), width)])
    for _ in range(blocks):
        y = b.op("Relu", [b.bn(b.conv(x, width, width), width)])
        y = b.bn(b.conv(y, width, width), width)
        x = b.op("Relu", [b.op("Add", [x, y])])
    return b.model(head(b, x, width))


def dynamic_batch(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same model with a dynamic batch axis on its inputs and outputs."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for vi in [*model.graph.input, *model.graph.output]:
        dim = vi.type.tensor_type.shape.dim[0]
        dim.ClearField("dim_value")
        dim.dim_param = "batch"
    return model


def fake_ms(per_layer_ms: float, per_gmac_ms: float):
    """A latency function: a fixed cost per conv/gemm node plus a cost per MAC (ignores timing entirely)."""

    def measure(model, target, batch, settings, calibration=False, input_shapes=None):
        layers = sum(n.op_type in ("Conv", "Gemm") for n in model.graph.node)
        return 0.01 + per_layer_ms * layers + per_gmac_ms * model_cost(model, input_shapes).macs / 1e9

    return measure


@pytest.fixture()
def cache_dir(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("COMPRESSOR_CACHE", str(folder))
    return folder


def plan_latency(model, ratio=0.5, latency_ms=None, method="l1", exclude=(), round_to=1):
    analysis = analyze(model)
    request = resolve_request("latency", ratio, "cpu:1", 1, latency_ms, None, settings=FAST)
    return analysis, plan_for_latency(analysis, method, PlanOptions(ratio, "latency", round_to=round_to,
                                                                    exclude=tuple(exclude)), request)


# ------------------------------------------------------------------------------------------------- table and cache
def test_table_is_built_cached_and_reused_without_profiling(cache_dir, monkeypatch):
    calls = []
    real = table.measure_ms

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(table, "measure_ms", counting)
    model = residual_net()
    _, first = plan_latency(model)
    assert len(calls) == first.model.info["measured"] > 0
    files = list((cache_dir / "latency").glob("*.json"))
    assert len(files) == 1 and "cpu_1" in files[0].name
    stored = json.loads(files[0].read_text())
    assert stored["context"]["batch"] == 1 and stored["context"]["target"] == "cpu:1"
    assert stored["context"]["onnxruntime"] and stored["context"]["device"]
    assert len(stored["entries"]) == first.model.info["measured"]

    calls.clear()
    _, second = plan_latency(model)
    assert calls == []  # everything came from the cache
    assert second.model.info["measured"] == 0 and second.model.info["cache_hits"] > 0
    assert second.model.full_ms == first.model.full_ms and second.predicted_ms == first.predicted_ms
    assert {g: v.tolist() for g, v in second.plan.removed.items()} == {g: v.tolist() for g, v in first.plan.removed.items()}
    assert second.plan.dropped_blocks == first.plan.dropped_blocks


def test_cache_is_shared_by_identical_layers_and_keyed_by_batch(cache_dir, monkeypatch):
    monkeypatch.setattr(table, "measure_ms", fake_ms(0.1, 1.0))
    analysis = analyze(residual_net(blocks=3))
    request = resolve_request("latency", 0.5, "cpu:1", 1, None, None, settings=FAST)
    planned = plan_for_latency(analysis, "l1", PlanOptions(0.5, "latency"), request)
    # the three blocks are the same layers: their micro-models are measured once and found in the cache twice
    assert planned.model.info["cache_hits"] > 0
    other = table.LatencyCache(table.context_of(request.target, 4), None)
    assert other.path != table.LatencyCache(table.context_of(request.target, 1), None).path
    assert other.entries == {}


def test_structure_key_ignores_names_and_weights_but_not_shapes():
    analysis = analyze(residual_net())
    item = next(i for i in find_items(analysis, {g.index for g in analysis.groups}) if len(i.dims) == 2)
    model = micro_model(analysis, item, {}, 1)
    renamed = onnx.ModelProto()
    renamed.CopyFrom(model)
    for node in renamed.graph.node:
        node.name = "other_" + node.name
    for init in renamed.graph.initializer:
        init.CopyFrom(onnx.numpy_helper.from_array(np.zeros_like(onnx.numpy_helper.to_array(init)), init.name))
    assert structure_key(renamed) == structure_key(model)
    assert structure_key(micro_model(analysis, item, {}, 1, weights=False)) == structure_key(model)
    narrower = micro_model(analysis, item, {item.dims[0]: 16}, 1)
    assert structure_key(narrower) != structure_key(model)
    assert structure_key(micro_model(analysis, item, {}, 2)) != structure_key(model)


def test_micro_model_has_the_shapes_surgery_gives_the_layer():
    b = GraphBuilder(shape=(1, 8, 8, 8))
    x = b.op("Relu", [b.bn(b.conv("x", 8, 16), 16)])
    x = b.op("Relu", [b.conv(x, 16, 16, group=16)])  # depthwise: its group attribute follows the kept width
    analysis = analyze(b.model(head(b, b.conv(x, 16, 24), 24)))
    items = find_items(analysis, {g.index for g in analysis.groups if g.prunable.any()})
    depthwise = next(i for i in items if len(i.dims) == 1 and i.kind == "layer" and analysis.groups[i.dims[0]].size == 16
                     and any(a.name == "group" and a.i == 16 for n in analysis.view.nodes if n.name == i.name
                             for a in n.attribute))
    model = micro_model(analysis, depthwise, {depthwise.dims[0]: 8}, 3, copies=2)
    onnx.checker.check_model(model, full_check=True)
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    assert next(a.i for a in conv.attribute if a.name == "group") == 8
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    shapes = {o.name: [d.dim_value for d in o.type.tensor_type.shape.dim] for o in inferred.graph.output}
    assert len(shapes) == 2 and all(s == [3, 8, 8, 8] for s in shapes.values())
    pooled = micro_model(analysis, depthwise, {depthwise.dims[0]: 8}, 3, pooled=True)
    assert [n.op_type for n in pooled.graph.node][-1] == "GlobalAveragePool"
    assert structure_key(pooled) != structure_key(micro_model(analysis, depthwise, {depthwise.dims[0]: 8}, 3))


@pytest.mark.parametrize("penalized, expected", [(1, 8), (16, 16), (64, 64)])
def test_alignment_is_chosen_from_network_measurements(cache_dir, monkeypatch, penalized, expected):
    def measure(model, target, batch, settings, calibration=False, input_shapes=None):
        widths = [i.dims[0] for i in model.graph.initializer if len(i.dims) == 4]
        slow = sum(w % penalized != 0 for w in widths)  # misaligned layers cost their network extra
        return 0.01 + 1e-6 * model_cost(model, input_shapes).macs + 0.5 * slow

    monkeypatch.setattr(table, "measure_ms", measure)
    analysis, planned = plan_latency(residual_net(width=256, hw=4), ratio=0.3)
    probe = planned.model.info["alignment_probe"]
    assert probe["source"] == "measured on the network" and set(probe["ms_by_offset"]) == {"0", "8", "16", "32", "64"}
    assert planned.model.alignment == expected
    model = planned.model  # fitted to the whole network, its skeleton and the probe's five widths
    assert model.fit_error is not None and model.info["alignment_probe"]["ms_by_offset"]
    assert model.predict_ms({}) == pytest.approx(model.full_ms, rel=model.fit_error + 1e-9)
    assert model.predict_ms({}, {b.index for b in analysis.blocks}) == pytest.approx(model.skeleton_ms,
                                                                                     rel=model.fit_error + 1e-9)
    assert table.GAMMA_RANGE[0] <= model.gamma <= table.GAMMA_RANGE[1]


def test_aligned_widths_and_interpolation():
    assert aligned_widths(96, [1.0], 16) == [96]
    assert aligned_widths(96, [1.0, 0.5, 0.25, 0.75], 16, floor=10) == [16, 32, 48, 64, 96]
    assert aligned_widths(12, [1.0, 0.5], 16) == [12]
    weights = interpolation_weights([8, 16, 32], [8, 12, 24, 32])
    np.testing.assert_allclose(weights @ np.array([1.0, 2.0, 6.0]), [1.0, 1.5, 4.0, 6.0])
    np.testing.assert_allclose(interpolation_weights([32], [8, 32]), [[1.0], [1.0]])


@pytest.mark.parametrize("level", [1, 2, 3])
def test_item_tables_reproduce_a_bilinear_cost(level):
    item = CostItem(0, "conv", "layer", ("conv",), ("x",), ("y",), (0, 1), frozenset())
    sizes, floors = (64, 96), (8, 8)
    widths = [level_widths(size, floor, 8, level) for size, floor in zip(sizes, floors)]
    cost = lambda a, b: 0.002 * a * b  # noqa: E731 - time proportional to input x output channels
    known = {p: cost(*p) for p in level_points(sizes, widths, level)}
    assert len(known) == (len(widths[0]) * len(widths[1]) if level == 3 else len(widths[0]) + len(widths[1]) - 1)
    item_table = ItemTable.from_points(item, widths, level, known)
    a, b = np.array([8, 24, 40, 64]), np.array([16, 48, 96])
    np.testing.assert_allclose(item_table.dense([a, b]), cost(a[:, None], b[None, :]), rtol=1e-9)
    assert item_table.at({0: 24}) == pytest.approx(cost(24, 96))


def test_unmeasured_items_follow_the_fixed_share_fitted_on_measured_ones():
    item = CostItem(0, "conv", "layer", ("conv",), ("x",), ("y",), (0,), frozenset())
    widths = [level_widths(64, 8, 8, 2)]
    measured = ItemTable.from_points(item, widths, 2, {(w,): 1.0 + 3.0 * w / 64 for w in widths[0]})  # a = 0.25
    assert fit_fixed_share([measured]) == pytest.approx(0.25)
    unmeasured = ItemTable.from_points(item, [[64]], 0, {(64,): 2.0})
    unmeasured.fixed_share = 0.25
    np.testing.assert_allclose(unmeasured.dense([np.array([16, 32, 64])]), 2.0 * (0.25 + 0.75 * np.array([0.25, 0.5, 1])))
    assert fit_fixed_share([unmeasured]) is None


# ------------------------------------------------------------------------------------------------------ importance
def test_kept_value_keeps_the_best_units_with_diminishing_returns():
    values = unit_values(np.array([4.0, 1.0, 3.0, 0.0]))
    assert values.mean() == pytest.approx(1.0)
    kept = kept_value(values, np.ones(4, dtype=bool), [0, 1, 2, 4])
    assert kept[0] == 0.0 and np.all(np.diff(kept) > 0)
    flat = kept_value(np.ones(8), np.ones(8, dtype=bool), np.arange(9))
    gains = np.diff(flat)
    assert np.all(np.diff(gains) < 0)  # each further unit removed costs more than the previous one
    assert flat[-1] == pytest.approx(8.0)


def test_method_scores_use_registered_scorers_graph_rw_and_fall_back_to_l1(monkeypatch):
    analysis = analyze(residual_net())
    groups = [g.index for g in analysis.groups if g.prunable.any()]
    options = PlanOptions(0.5, "latency")
    scores, note = method_scores("l2", analysis, options, groups)
    assert note is None and set(scores) == set(groups)
    scores, note = method_scores("graph-rw", analysis, options, groups)
    assert note and "graph-rw" in note and set(scores) == set(groups)
    monkeypatch.setitem(methods.METHODS, "plain", methods.Method("plain", lambda analysis, options: None))
    scores, note = method_scores("plain", analysis, options, groups)
    assert "l1" in note and set(scores) == set(groups)
    with pytest.raises(CompressorError, match="scoring method"):
        method_scores("zeros", analysis, options, groups)


# ------------------------------------------------------------------------------------------------------ allocation
def _crafted(block_values: list[float]):
    """Group 0 lives only in block 0, whose layers cost ~4 ms whatever their width (launch-bound); group 1 is
    outside any block, its layer costs 3 ms per width step. Values are given per candidate width."""
    widths = np.array([2, 4, 6, 8])
    groups = {0: GroupChoice(0, widths, np.array(block_values)), 1: GroupChoice(1, widths, np.array([20.0, 40, 60, 80]))}
    items = [ItemCost((0,), frozenset({0}), np.array([3.90, 3.93, 3.96, 4.0])),
             ItemCost((1,), frozenset(), np.array([3.0, 6.0, 9.0, 12.0]))]
    return groups, items, {0: BlockChoice(0, (0,))}


def test_allocation_drops_the_block_when_it_is_cheaper_per_importance():
    groups, items, blocks = _crafted([2.0, 4, 6, 8])  # block: 8 value for 4 ms; narrowing group 1: 20 per 3 ms
    result = allocate_latency(groups, items, blocks, budget_items_ms=12.0)
    assert result.dropped == {0} and result.widths[1] == 8
    assert result.met and result.predicted_ms == pytest.approx(12.0)


def test_allocation_narrows_when_the_block_is_worth_more():
    groups, items, blocks = _crafted([20.0, 40, 60, 80])  # block: 80 value for 4 ms; narrowing group 1: 20 per 3 ms
    result = allocate_latency(groups, items, blocks, budget_items_ms=12.0)
    assert result.dropped == set() and result.widths[1] == 4 and result.widths[0] == 8
    assert result.met and result.predicted_ms <= 12.0


def test_allocation_prefers_the_move_that_just_finishes_over_one_that_overshoots():
    widths = np.array([4, 8])
    groups = {0: GroupChoice(0, widths, np.array([1.9, 2.0])), 1: GroupChoice(1, widths, np.array([1.0, 2.0]))}
    items = [ItemCost((0,), frozenset(), np.array([1.0, 2.0])), ItemCost((1,), frozenset({0}), np.array([5.0, 10.0]))]
    # after narrowing group 0 (0.1 lost for 1 ms), 1.5 ms are missing: dropping the block saves 10 ms for 2,
    # narrowing its group saves 5 ms for 1; credited with the 1.5 ms needed, narrowing wins
    result = allocate_latency(groups, items, {0: BlockChoice(0, (1,))}, budget_items_ms=9.5)
    assert result.dropped == set() and result.widths == {0: 8, 1: 4}  # refill gave group 0 its width back
    assert result.met and result.predicted_ms == pytest.approx(7.0) and result.kept_value == pytest.approx(3.0)


def test_allocation_refills_what_an_overshooting_move_gave_up():
    widths = np.array([4, 8])
    groups = {0: GroupChoice(0, widths, np.array([1.9, 2.0])), 1: GroupChoice(1, np.array([8]), np.array([2.0]))}
    items = [ItemCost((0,), frozenset(), np.array([1.0, 2.0])), ItemCost((1,), frozenset({0}), np.array([10.0]))]
    result = allocate_latency(groups, items, {0: BlockChoice(0, (1,))}, budget_items_ms=9.5)
    # narrowing group 0 first is cheapest, then only dropping the block reaches the budget; 8.5 ms are then free,
    # and the refill widens group 0 again
    assert result.dropped == {0} and result.widths[0] == 8
    assert result.met and result.predicted_ms == pytest.approx(2.0)
    assert any(m.startswith("widen group 0") for m in result.moves)


def test_launch_bound_target_drops_blocks_first(cache_dir, monkeypatch):
    monkeypatch.setattr(table, "measure_ms", fake_ms(per_layer_ms=1.0, per_gmac_ms=1.0))  # ~all time is per layer
    analysis, planned = plan_latency(residual_net(blocks=3), ratio=0.4)
    assert planned.plan.dropped_blocks and not planned.plan.removed
    assert planned.predicted_ms <= planned.budget_ms


@pytest.mark.parametrize("ratio, latency_ms", [(0.3, None), (0.6, None), (None, 3.0)])
def test_budget_is_met_by_the_prediction(cache_dir, monkeypatch, ratio, latency_ms):
    monkeypatch.setattr(table, "measure_ms", fake_ms(per_layer_ms=0.2, per_gmac_ms=200.0))
    analysis, planned = plan_latency(residual_net(blocks=3), ratio=ratio, latency_ms=latency_ms)
    model = planned.model
    expected = latency_ms if latency_ms is not None else (1 - ratio) * model.full_ms
    assert planned.budget_ms == pytest.approx(expected)
    assert planned.predicted_ms <= planned.budget_ms * (1 + 1e-9)
    assert planned.info["budget_met_by_prediction"]
    kept = {g.index: g.size - len(planned.plan.removed.get(g.index, ())) for g in analysis.groups}
    assert model.predict_ms(kept, planned.plan.dropped_blocks) == pytest.approx(planned.predicted_ms)
    assert model.predict_ms({}, set()) == pytest.approx(model.full_ms, rel=(model.fit_error or 0) + 1e-9)
    for g, removed in planned.plan.removed.items():  # widths are multiples of the alignment
        assert (analysis.groups[g].size - len(removed)) % model.alignment == 0
    result = apply_plan(analysis, planned.plan)
    onnx.checker.check_model(result)


def test_exclude_and_round_to_are_honoured(cache_dir, monkeypatch):
    monkeypatch.setattr(table, "measure_ms", fake_ms(per_layer_ms=1.0, per_gmac_ms=200.0))
    model = residual_net(blocks=3)
    analysis = analyze(model)
    protected = analysis.blocks[0].nodes[0]  # a conv inside the first block: that block and its group stay
    excluded_groups = analysis.excluded_groups([f"[{protected[0]}]{protected[1:]}"])
    analysis, planned = plan_latency(model, ratio=0.5, exclude=(f"[{protected[0]}]{protected[1:]}",), round_to=16)
    assert planned.model.alignment == 16 and planned.model.info["alignment_probe"]["source"] == "--round-to 16"
    assert 0 not in planned.plan.dropped_blocks and excluded_groups
    assert not set(planned.plan.removed) & excluded_groups
    for g, removed in planned.plan.removed.items():
        assert (analysis.groups[g].size - len(removed)) % 16 == 0


# ---------------------------------------------------------------------------------------------- end to end, errors
def test_compress_reports_predicted_and_measured_latency(cache_dir):
    result = compressor.compress(residual_net(), "l1", 0.5, target="latency", device="cpu:1", profile_budget=2.0)
    latency = result.report["latency"]
    assert result.report["target"] == "latency" and result.report["verified"]
    for key in ("budget_ms", "predicted_ms", "measured_before_ms", "measured_after_ms", "measured_speedup",
                "predictor_error", "flagged", "calibration", "table"):
        assert key in latency
    assert latency["predictor_error"] == pytest.approx(
        (latency["predicted_ms"] - latency["measured_after_ms"]) / latency["measured_after_ms"])
    assert latency["flagged"] == (abs(latency["predictor_error"]) > 0.10)
    assert any("predictor error" in n for n in result.report["notes"]) == latency["flagged"]
    assert result.report["macs_after"] < result.report["macs_before"]


@pytest.mark.parametrize("kwargs, message", [
    ({"device": "tensorrt"}, "cuda"),
    ({"device": "gpu"}, "bad target"),
    ({"device": "cpu:0"}, "thread"),
    ({"device": "cpu:1", "batch": 0}, "--batch"),
    ({"device": "cpu:1", "batch": 2}, "fixed batch"),
    ({"device": "cpu:1", "latency_ms": -1.0}, "--latency-ms"),
    ({"device": "cpu:1", "profile_budget": 0.0}, "--profile-budget"),
    ({"device": "cpu:1", "ratio": 1.5}, "ratio"),
    ({"device": "cpu:1", "method": "zeros"}, "scoring method"),
    ({"device": "cpu:1", "latency_ms": 1e6}, "already meets"),
    ({"target": "macs", "device": "cpu:1"}, "only apply with --target latency"),
    ({"target": "seconds"}, "macs, params, latency"),
])
def test_bad_latency_requests_fail_with_one_line(cache_dir, monkeypatch, kwargs, message):
    monkeypatch.setattr(table, "measure_ms", fake_ms(0.1, 1.0))
    kwargs = {"target": "latency", "ratio": 0.5, **kwargs}
    with pytest.raises(CompressorError, match=message) as caught:
        compressor.compress(residual_net(), kwargs.pop("method", "l1"), kwargs.pop("ratio"), **kwargs)
    assert "\n" not in str(caught.value)


def test_cuda_without_the_provider_fails_cleanly():
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(CompressorError, match="CUDAExecutionProvider is not available"):
        resolve_request("latency", 0.5, "cuda", 1, None, None)


def run_cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), **env)
    return subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, text=True, env=env, cwd=REPO)


def test_cli_latency_end_to_end(tmp_path):
    model, out, report = tmp_path / "model.onnx", tmp_path / "slim.onnx", tmp_path / "report.json"
    onnx.save(residual_net(), model)
    env = {"COMPRESSOR_CACHE": str(tmp_path / "cache")}
    proc = run_cli(str(model), "--method", "l1", "--target", "latency", "--device", "cpu:1", "--ratio", "0.5",
                   "--profile-budget", "2", "-o", str(out), "--report", str(report), env=env)
    assert proc.returncode == 0, proc.stderr
    assert "latency on cpu:1 batch 1 (fp32)" in proc.stdout and "predictor error" in proc.stdout
    data = json.loads(report.read_text())
    assert data["latency"]["device"] == "cpu:1" and data["latency"]["batch"] == 1
    onnx.checker.check_model(onnx.load(out))
    assert (tmp_path / "cache" / "latency").is_dir()

    bad = run_cli(str(model), "--target", "latency", "--device", "tensorrt", "--ratio", "0.5", "-o", str(out), env=env)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and bad.stderr.startswith("error: ")
    both = run_cli(str(model), "--target", "latency", "--ratio", "0.5", "--latency-ms", "1", "-o", str(out), env=env)
    assert both.returncode == 2 and "not both" in both.stderr


def test_macs_ratio_caps_the_macs_as_well(cache_dir, monkeypatch):
    monkeypatch.setattr(table, "measure_ms", fake_ms(per_layer_ms=1.0, per_gmac_ms=1.0))  # latency: layer count
    analysis = analyze(residual_net(blocks=3))
    request = resolve_request("latency", 0.2, "cpu:1", 1, None, None, settings=FAST)
    loose = plan_for_latency(analysis, "l1", PlanOptions(0.2, "latency"), request)
    capped = plan_for_latency(analysis, "l1", PlanOptions(0.2, "latency", extra={"macs_ratio": "0.6"}), request)
    assert analysis.cost(loose.plan)[0] > 0.4 * analysis.macs
    assert analysis.cost(capped.plan)[0] <= 0.4 * analysis.macs * 1.001
    assert capped.predicted_ms <= capped.budget_ms and capped.info["macs_ratio"] == 0.6
    with pytest.raises(CompressorError, match="macs_ratio"):
        plan_for_latency(analysis, "l1", PlanOptions(0.2, "latency", extra={"macs_ratio": "half"}), request)


# ----------------------------------------------------------------------------------------------- batch, closed loop
def test_latency_mode_runs_at_batch_2_on_a_dynamic_batch_model(cache_dir):
    result = compressor.compress(dynamic_batch(residual_net()), "l1", 0.5, target="latency", device="cpu:1", batch=2,
                                 profile_budget=2.0)
    latency = result.report["latency"]
    assert latency["batch"] == 2 and latency["measured_after_ms"] > 0 and result.report["verified"]
    files = list((cache_dir / "latency").glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["context"]["batch"] == 2
    assert 1 <= len(latency["closed_loop"]) <= ProfileSettings().loop_iterations


def test_fixed_batch_model_fails_in_one_line_before_profiling(cache_dir, monkeypatch):
    calls = []
    monkeypatch.setattr(table, "measure_ms", lambda *a, **k: calls.append(1) or 1.0)
    with pytest.raises(CompressorError, match="fixed batch size of 1.*dynamic batch axis.*--batch 1") as caught:
        compressor.compress(residual_net(), "l1", 0.5, target="latency", device="cpu:1", batch=2)
    assert "\n" not in str(caught.value) and calls == []


def biased_pair(bias: float, calls: list):
    """A fake measure_pair: the fake latency of both models, the candidate's times `bias` (the model's error)."""
    measure = fake_ms(per_layer_ms=0.2, per_gmac_ms=200.0)

    def pair(original, candidate, request, input_shapes=None, warmup=None, runs=None):
        calls.append(1)
        before = measure(original, None, 1, None, input_shapes=input_shapes)
        return paired.PairMeasurement(before, bias * measure(candidate, None, 1, None, input_shapes=input_shapes), 3)

    return pair


@pytest.mark.parametrize("bias", [0.6, 1.4])
def test_closed_loop_corrects_a_biased_model_and_stops_within_the_budget(cache_dir, monkeypatch, bias):
    monkeypatch.setattr(table, "measure_ms", fake_ms(per_layer_ms=0.2, per_gmac_ms=200.0))
    calls = []
    monkeypatch.setattr(paired, "measure_pair", biased_pair(bias, calls))
    analysis = analyze(residual_net(width=64, blocks=3))
    settings = ProfileSettings(**{**vars(FAST), "loop_iterations": 3, "aligned_baseline": False})
    request = resolve_request("latency", 0.5, "cpu:1", 1, None, None, settings=settings)
    planned = plan_for_latency(analysis, "l1", PlanOptions(0.5, "latency"), request)
    loop = planned.info["closed_loop"]
    assert 1 <= len(loop) == len(calls) <= 3
    assert [c["chosen"] for c in loop].count(True) == 1
    chosen = next(c for c in loop if c["chosen"])
    first = loop[0]["measured_fraction"]
    assert chosen["measured_fraction"] <= 0.5 + 1e-9  # the measured budget is met
    if first <= 0.5:  # an over-pruned first candidate is widened, never narrowed further
        assert chosen["measured_fraction"] >= first
    assert planned.measured is not None and planned.measured.fraction == pytest.approx(chosen["measured_fraction"])
    # the chosen plan's report compares its corrected prediction with its own measurement
    fields = check.check_fields(planned, planned.measured, planned.predicted_fraction)
    assert fields["measured_after_ms"] == planned.measured.after_ms and fields["budget_met_measured"]


def test_closed_loop_stops_at_the_first_candidate_inside_the_window(cache_dir, monkeypatch):
    monkeypatch.setattr(table, "measure_ms", fake_ms(per_layer_ms=0.2, per_gmac_ms=200.0))
    calls = []
    monkeypatch.setattr(paired, "measure_pair", biased_pair(1.0, calls))
    analysis = analyze(residual_net(width=64, blocks=3))
    open_loop = plan_for_latency(analysis, "l1", PlanOptions(0.5, "latency"),
                                 resolve_request("latency", 0.5, "cpu:1", 1, None, None, settings=FAST))
    fraction = biased_pair(1.0, [])(analysis.proto, apply_plan(analysis, open_loop.plan), None).fraction
    settings = ProfileSettings(**{**vars(FAST), "loop_iterations": 3, "aligned_baseline": False})
    planned = plan_for_latency(analysis, "l1", PlanOptions(0.5, "latency"),
                               resolve_request("latency", 0.5, "cpu:1", 1, None, None, settings=settings))
    if planner.LOOP_ACCEPT * 0.5 <= fraction <= 0.5:
        assert len(calls) == 1 and planned.plan.dropped_blocks == open_loop.plan.dropped_blocks
    else:
        assert 1 < len(calls) <= 3


def _compute_bound(rho: float):
    """Block 0 holds group 0 (time proportional to its width, plus a join that does not shrink); groups 1 and 2
    live outside blocks, half as expensive per channel. Every group is worth kept_value of 8 equal units."""
    widths = np.array([2, 4, 6, 8])
    values = kept_value(np.ones(8), np.ones(8, dtype=bool), widths)
    groups = {g: GroupChoice(g, widths, values) for g in range(3)}
    items = [ItemCost((0,), frozenset({0}), 1.0 * widths), ItemCost((), frozenset({0}), np.array(1.0)),
             ItemCost((1,), frozenset(), 0.5 * widths), ItemCost((2,), frozenset(), 0.5 * widths)]
    return groups, items, {0: BlockChoice(0, (0,), rho)}, widths, values


@pytest.mark.parametrize("rho", [0.5, 1.0])
@pytest.mark.parametrize("budget", [6.0, 7.0, 8.0, 9.0, 10.0])
def test_allocation_matches_brute_force_with_block_dropping_on_a_compute_bound_table(rho, budget):
    groups, items, blocks, widths, values = _compute_bound(rho)
    best = 0.0
    for a in range(4):
        for b in range(4):
            for c in range(4):
                for drop in (False, True):
                    ms = (0.0 if drop else widths[a] + 1.0) + 0.5 * widths[b] + 0.5 * widths[c]
                    value = values[a] * (1 - rho if drop else 1.0) + values[b] + values[c]
                    if ms <= budget + 1e-9:
                        best = max(best, value)
    result = allocate_latency(groups, items, blocks, budget_items_ms=budget)
    assert result.met and result.predicted_ms <= budget + 1e-9
    assert result.kept_value == pytest.approx(best)
    if rho == 0.5 and budget >= 8.0:  # the block is the cheapest importance per ms: dropped, everything else full
        assert result.dropped == {0} and result.widths == {0: 8, 1: 8, 2: 8}


def test_block_value_option_is_validated(cache_dir, monkeypatch):
    monkeypatch.setattr(table, "measure_ms", fake_ms(per_layer_ms=1.0, per_gmac_ms=1.0))
    analysis = analyze(residual_net())
    request = resolve_request("latency", 0.3, "cpu:1", 1, None, None, settings=FAST)
    with pytest.raises(CompressorError, match="block_value"):
        plan_for_latency(analysis, "l1", PlanOptions(0.3, "latency", extra={"block_value": "2"}), request)
    planned = plan_for_latency(analysis, "l1", PlanOptions(0.3, "latency", extra={"block_value": "1"}), request)
    assert planned.info["block_value_factor"] == 1.0


# ------------------------------------------------------------------ closed loop on a launch-bound target (ResNet-56)
def launch_bound_pair(calls: list, per_mac_share: float = 0.1, noise: float = 0.03, seed: int = 0):
    """A fake measure_pair for a launch-bound target: latency = 1 ms of launches + a tiny per-MAC term
    (`per_mac_share` of the original's time), each model timed with ±`noise` multiplicative jitter."""
    rng = np.random.default_rng(seed)

    def pair(original, candidate, request, input_shapes=None, warmup=None, runs=None):
        calls.append(1)
        full = model_cost(original, input_shapes).macs

        def timed(model):
            share = per_mac_share * model_cost(model, input_shapes).macs / full
            return (1.0 + share) * rng.uniform(1 - noise, 1 + noise)

        return paired.PairMeasurement(timed(original), timed(candidate), 3)

    return pair


def candidate_stub(internal_ms: float, predicted_ms: float, before_ms: float, after_ms: float, kept: float):
    return planner._Candidate(plan=None, allocation=SimpleNamespace(kept_value=kept), predicted_ms=predicted_ms,
                              internal_budget_ms=internal_ms, corrected_fraction=predicted_ms,
                              measured=paired.PairMeasurement(before_ms, after_ms, 200))


# the three candidates of the committed H200 run (benchmarks/results/latency_aware_r56_ratio025.json), budget 0.75
R56_FULL_MS, R56_BUDGET_MS = 1.078972, 0.809229
R56_TRIED = [(0.809229, 0.806076, 1.4107125, 1.109237, 0.913), (0.745802, 0.745291, 1.6007575, 1.2567395, 0.886),
             (1.078972e-06, 0.375181, 1.6779875, 0.334661, 0.472)]


def test_correction_is_damped_when_noisy_measurements_give_a_flat_secant():
    # candidates 1 and 2 measured 0.786 and 0.785 of the original: the secant through them is nearly flat and the
    # undamped correction asked for a budget of ~0 ms (25 of 25 blocks removed)
    tried = [candidate_stub(*row) for row in R56_TRIED[:2]]
    model = SimpleNamespace(full_ms=R56_FULL_MS)
    internal = planner._next_allocation_budget(tried, model, 0.75)
    assert planner.LOOP_STEP * 0.745802 <= internal < 0.745802


def test_correction_interpolates_between_bracketing_candidates():
    model = SimpleNamespace(full_ms=1.0)
    slow = candidate_stub(0.6, 0.6, 1.0, 0.60, 0.9)  # over a budget of 0.5
    fast = candidate_stub(0.3, 0.3, 1.0, 0.30, 0.5)  # far under the window
    internal = planner._next_allocation_budget([slow, fast], model, 0.5)
    aim = 0.5 * planner.LOOP_AIM
    assert internal == pytest.approx(0.3 + (aim - 0.3) * 0.3 / 0.3)
    # contradicting measurements (the faster one had the larger budget) stop the loop
    assert planner._next_allocation_budget([candidate_stub(0.3, 0.3, 1.0, 0.6, 0.9),
                                            candidate_stub(0.6, 0.6, 1.0, 0.3, 0.5)], model, 0.5) is None


def test_choice_never_keeps_a_candidate_far_under_the_window():
    request = SimpleNamespace(latency_ms=None)
    tried = [candidate_stub(*row) for row in R56_TRIED]
    chosen, note = planner._choose(tried, R56_BUDGET_MS, R56_FULL_MS, request)
    assert chosen is tried[1] and "closest from above" in note  # 0.785 (+4.7%), not 0.199 (everything removed)
    # inside the window: the one keeping the most importance, no note
    inside = [candidate_stub(0.5, 0.5, 1.0, 0.49, 0.7), candidate_stub(0.55, 0.55, 1.0, 0.47, 0.8)]
    chosen, note = planner._choose([*tried, *inside], R56_BUDGET_MS / 1.5, R56_FULL_MS, request)
    assert chosen is inside[1] and note is None


@pytest.mark.parametrize("ratio, seed", [(0.25, 0), (0.5, 1)])
def test_closed_loop_on_a_launch_bound_target_stops_without_removing_everything(cache_dir, monkeypatch, ratio, seed):
    # the latency model believes the MACs matter (compute-bound table); the target is launch-bound: removing MACs
    # barely helps and the budget is out of reach
    monkeypatch.setattr(table, "measure_ms", fake_ms(per_layer_ms=0.2, per_gmac_ms=200.0))
    calls = []
    monkeypatch.setattr(paired, "measure_pair", launch_bound_pair(calls, seed=seed))
    analysis = analyze(residual_net(width=64, blocks=3))
    settings = ProfileSettings(**{**vars(FAST), "loop_iterations": 4, "aligned_baseline": False})
    request = resolve_request("latency", ratio, "cpu:1", 1, None, None, settings=settings)
    planned = plan_for_latency(analysis, "l1", PlanOptions(ratio, "latency"), request)
    loop = planned.info["closed_loop"]
    assert 1 <= len(loop) == len(calls) <= 4 and [c["chosen"] for c in loop].count(True) == 1
    budgets = [c["allocation_budget_ms"] for c in loop]
    for before, after in zip(budgets, budgets[1:]):  # damped: one step shrinks the budget by LOOP_STEP at most
        assert after >= planner.LOOP_STEP * min(budgets[:budgets.index(before) + 1]) * (1 - 1e-9)
    macs_after, _ = analysis.cost(planned.plan)
    assert macs_after > 0.2 * analysis.macs and len(planned.plan.dropped_blocks) < len(analysis.blocks)
    assert any("no candidate of the closed loop" in n for n in planned.plan.notes)
