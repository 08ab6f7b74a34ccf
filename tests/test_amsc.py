"""AMSC: groups, adaptive weights, penalty, proximal step, exact removal by the engine, the lambda search."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from compressor.errors import CompressorError
from compressor.training.amsc import (
    AmscHooks,
    amsc_penalty,
    amsc_structure,
    auto_grid,
    kill_lambdas,
    proximal_step,
    renormalize_filters,
    structure_masks,
)
from compressor.training.amsc_search import AmscOptions, find_boundary, reestimate_batchnorm, run_amsc, search_lambdas
from compressor.training.export import export_and_slim, onnxscript_available
from compressor.training.loop import TrainConfig
from compressor.training.models import build_model
from compressor.training.pipeline import TrainJob, run_job
from tests.conftest import assert_close_to_scale

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_training import one_torch_thread, randomize_bn, synthetic_data  # noqa: E402,F401 - autouse fixture

needs_dynamo = pytest.mark.skipif(not onnxscript_available(), reason="onnxscript (dynamo exporter) not installed")


def tiny_resnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_bn(build_model("resnet8"))


def test_groups_of_resnet56_and_vgg():
    structure = amsc_structure(build_model("resnet56"))
    names = [g.name for g in structure.depth]
    assert len(names) == 25 and "layer2.0" not in names and "layer3.0" not in names and "layer1.0" in names
    assert len(structure.width) == 27 and structure.width[0].filter_size == 16 * 9 + 2
    assert structure.depth[0].size == 2 * (16 * 16 * 9 + 2 * 16)
    vgg = amsc_structure(build_model("vgg16_bn"))
    assert not vgg.depth and len(vgg.width) == 13 and isinstance(vgg.width[-1].consumer, nn.Linear)
    assert not amsc_structure(build_model("resnet56"), "width-only").depth
    assert not amsc_structure(build_model("resnet56"), "depth-only").width
    with pytest.raises(CompressorError):
        amsc_structure(nn.Sequential(nn.Linear(3, 3)))


def _hand_penalty(model: nn.Module, start: dict, lambda_depth: float, lambda_width: float) -> float:
    """The issue's formula written out with numpy loops over the named parameters of resnet8."""
    now = {k: v.detach().double().numpy() for k, v in model.state_dict().items()}
    ref = {k: v.double().numpy() for k, v in start.items()}
    block = ["layer1.0.conv1.weight", "layer1.0.bn1.weight", "layer1.0.bn1.bias",
             "layer1.0.conv2.weight", "layer1.0.bn2.weight", "layer1.0.bn2.bias"]  # the only identity-shortcut block
    q = sum(ref[k].size for k in block)
    norm_hat = math.sqrt(sum(float((ref[k] ** 2).sum()) for k in block))
    norm_now = math.sqrt(sum(float((now[k] ** 2).sum()) for k in block))
    total = lambda_depth * math.sqrt(q) / norm_hat * norm_now
    for prefix in ("layer1.0", "layer2.0", "layer3.0"):
        w_hat, w = ref[f"{prefix}.conv1.weight"], now[f"{prefix}.conv1.weight"]
        for j in range(w.shape[0]):
            hat = np.concatenate([w_hat[j].ravel(), [ref[f"{prefix}.bn1.weight"][j], ref[f"{prefix}.bn1.bias"][j]]])
            cur = np.concatenate([w[j].ravel(), [now[f"{prefix}.bn1.weight"][j], now[f"{prefix}.bn1.bias"][j]]])
            total += lambda_width * math.sqrt(hat.size) / np.linalg.norm(hat) * np.linalg.norm(cur)
    return total


def test_penalty_equals_hand_computation():
    model = tiny_resnet()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    structure = amsc_structure(model)
    filters = 16 + 32 + 64
    at_start = amsc_penalty(structure, 0.3, 0.7).item()  # adaptive weights: every group contributes sqrt(q) at theta_hat
    expected = 0.3 * math.sqrt(2 * (16 * 16 * 9 + 32)) + 0.7 * (16 * math.sqrt(16 * 9 + 2) + 32 * math.sqrt(16 * 9 + 2)
                                                                + 64 * math.sqrt(32 * 9 + 2))
    assert filters == 112 and at_start == pytest.approx(expected, rel=1e-6)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(torch.rand_like(p) + 0.5)
    assert amsc_penalty(structure, 0.3, 0.7).item() == pytest.approx(_hand_penalty(model, start, 0.3, 0.7), rel=1e-5)


def test_weightings_uniform_and_reverse():
    model = tiny_resnet()
    adaptive = amsc_structure(model, weighting="adaptive")
    uniform = amsc_structure(model, weighting="uniform")
    reverse = amsc_structure(model, weighting="reverse")
    with torch.no_grad():
        norm = float(adaptive.depth[0].norm())
        row_norms = adaptive.width[1].norms()
    q = adaptive.depth[0].size
    assert uniform.depth[0].weight == pytest.approx(math.sqrt(q))
    assert reverse.depth[0].weight == pytest.approx(math.sqrt(q) * norm, rel=1e-6)
    assert adaptive.depth[0].weight == pytest.approx(math.sqrt(q) / norm, rel=1e-6)
    root = math.sqrt(adaptive.width[1].filter_size)
    assert torch.allclose(uniform.width[1].weights, torch.full_like(row_norms, root))
    assert torch.allclose(reverse.width[1].weights, root * row_norms, rtol=1e-5)


def test_proximal_step_gives_exact_zeros_and_exact_shrinkage():
    model = tiny_resnet()
    structure = amsc_structure(model, "width-only")
    layer = structure.width[0]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    optimizer.step()
    with torch.no_grad():
        norms = layer.norms().double()
        threshold = torch.median(norms).item()  # half the filters go to zero, the others shrink
        before = layer.rows().double().clone()
    lr, lam = 0.5, 1.0
    layer.weights = torch.full((layer.conv.out_channels,), threshold / (lr * lam))
    proximal_step(structure, lr, 0.0, lam, optimizer)
    with torch.no_grad():
        after = layer.rows().double()
    dead = norms <= threshold
    assert dead.any() and (~dead).any()
    assert bool((after[dead] == 0).all())
    scale = (1 - threshold / norms[~dead])[:, None]
    assert torch.allclose(after[~dead], before[~dead] * scale, rtol=1e-6, atol=1e-9)
    momentum = optimizer.state[layer.conv.weight]["momentum_buffer"]
    assert bool((momentum[dead] == 0).all()) and bool((momentum[~dead] != 0).any())


def test_depth_prox_zeroes_a_whole_block_exactly():
    model = tiny_resnet()
    structure = amsc_structure(model, "depth-only")
    group = structure.depth[0]
    with torch.no_grad():
        norm = float(group.norm())
    proximal_step(structure, 1.0, norm / group.weight * 1.0001, 0.0)
    assert all(bool((p == 0).all()) for _, p in group.params)
    assert structure.counts()["blocks_zero"] == 1


@pytest.mark.parametrize("dynamo", [pytest.param(True, marks=needs_dynamo), False])
def test_zero_groups_export_and_zeros_removes_them_exactly(tmp_path, dynamo):
    model = build_model("resnet20")
    randomize_bn(model)
    with torch.no_grad():
        for block in (model.layer1[1], model.layer3[2]):  # whole blocks: only the last BN is zero
            block.bn2.weight.zero_()
            block.bn2.bias.zero_()
        model.layer2[0].bn1.weight[[1, 5, 9]] = 0  # single filters via BN gamma and beta (padding-shortcut block)
        model.layer2[0].bn1.bias[[1, 5, 9]] = 0
        model.layer3[1].conv1.weight[:4] = 0  # single filters via the conv weights and BN
        model.layer3[1].bn1.weight[:4] = 0
        model.layer3[1].bn1.bias[:4] = 0
    report = export_and_slim(model, tmp_path / "zeroed", torch.randn(32, 3, 32, 32), dynamo=dynamo)
    assert len(report["blocks_removed"]) == 2
    removed = {g["name"]: g["channels_before"] - g["channels_after"] for g in report["groups"]
               if g["channels_after"] < g["channels_before"]}
    assert sorted(removed.values()) == [3, 4]
    assert report["slim_check"]["max_abs_diff"] <= report["slim_check"]["tolerance"]
    per_block = 2 * 16 * 16 * 9 * 32 * 32  # MACs of one stage-1 branch = one stage-3 branch
    filters = 3 * (16 * 9 * 16 * 16 + 32 * 9 * 16 * 16) + 4 * (64 * 9 * 8 * 8 * 2)
    assert report["macs_before"] - report["macs_after"] == 2 * per_block + filters


def test_structure_masks_keep_zero_groups_at_zero():
    model = tiny_resnet()
    structure = amsc_structure(model)
    with torch.no_grad():
        for _, p in structure.depth[0].params:
            p.zero_()
        layer = structure.width[2]
        layer.conv.weight[3] = 0
        layer.bn.weight[3] = 0
        layer.bn.bias[3] = 0
    masks = structure_masks(structure)
    assert set(masks.keep) >= {"layer1.0.conv1.weight", "layer3.0.conv1.weight", "layer3.0.bn1.bias"}
    assert masks.zeroed()["layer3.0.conv1.weight"] == 32 * 9 and masks.zeroed()["layer3.0.bn1.weight"] == 1
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    masks.apply(model)
    counts = structure.counts()
    assert counts["blocks_zero"] == 1 and counts["filters_zero"] == 1  # the zero block's filters are not counted


def test_boundary_search_refines_and_extends():
    macs = lambda lam: {"macs_removed": min(1.0, lam / 10.0)}  # noqa: E731 - removal grows with lambda
    calls = []

    def run(lam):
        calls.append(lam)
        return macs(lam)

    found, _ = find_boundary(run, [1.0, 4.0, 16.0], lambda r: r["macs_removed"] >= 0.58, "smallest", 3)
    assert found == pytest.approx(math.sqrt(8.0 * math.sqrt(32.0))) and len(calls) == 6  # 4|16, then 8, 5.66, 6.73
    calls.clear()
    found, largest = find_boundary(run, [0.1, 0.2], lambda r: r["macs_removed"] >= 0.58, "smallest", 0)
    assert found is None and largest == pytest.approx(0.8) and len(calls) == 4
    found, _ = find_boundary(run, [1.0, 2.0, 4.0, 8.0], lambda r: r["macs_removed"] <= 0.3, "largest", 1)
    assert found == pytest.approx(math.sqrt(8.0))


def test_auto_grid_spans_the_kill_lambdas():
    structure = amsc_structure(tiny_resnet())
    kills = kill_lambdas(structure, "width", lr_sum=2.0)
    assert len(kills) == 16 + 32 + 64
    grid = auto_grid(kills, 4)
    assert len(grid) == 4 and grid == sorted(grid)
    assert grid[0] == pytest.approx(np.quantile(kills, 0.1)) and grid[-1] == pytest.approx(np.quantile(kills, 0.9))


def test_run_amsc_fixed_lambdas_and_hooks():
    model = tiny_resnet()
    data = synthetic_data(n_train=64)
    measured = []

    def measure(net):
        measured.append(1)
        return {"macs_removed": 0.5}

    options = AmscOptions(lambda_depth=50.0, lambda_width=5.0, sparse_epochs=1)
    outcome = run_amsc(model, data, options, TrainConfig(batch_size=32, lr=0.1), measure)
    assert measured == [1] and outcome.lambda_depth == 50.0 and outcome.chosen["macs_removed"] == 0.5
    assert outcome.counts["blocks_zero"] == 1 and outcome.counts["filters_zero"] > 16
    assert len(outcome.masks) > 0
    hooks = AmscHooks(outcome.structure, 1.0, 1.0, penalty_in_loss=True)
    assert hooks.penalty(model).requires_grad
    with pytest.raises(CompressorError):
        AmscOptions().validate()


def test_amsc_search_pipeline_removes_what_the_search_chose(tmp_path):
    job = TrainJob(model="resnet8", data="unused", out=str(tmp_path / "amsc"), device="cpu", verify_images=16,
                   method="amsc", ratio=0.3, config=TrainConfig(epochs=1, batch_size=32, lr=0.05),
                   amsc=AmscOptions(search=True, grid_points=2, refine=1, sparse_epochs=1, max_drop=100.0))
    metrics = run_job(job, data=synthetic_data(n_train=64), log=None)
    amsc = metrics["amsc"]
    assert amsc["chosen"]["macs_removed"] >= 0.3  # seeded: the search reaches the target on this data
    assert metrics["macs_reduction"] == pytest.approx(amsc["chosen"]["macs_removed"], abs=1e-6)
    assert metrics["blocks_removed"] == amsc["blocks_zero"]
    stages = {t["stage"] for t in amsc["trials"]}
    assert {"depth", "width"} <= stages


def test_boundary_search_interpolates_toward_a_target():
    tried = []

    def run(lam):
        tried.append(lam)
        return {"macs_removed": min(1.0, math.log10(lam) / 3 + 0.5)}  # linear in log(lambda): 0.58 at 10**0.24

    found, _ = find_boundary(run, [0.1, 1.0, 10.0], lambda r: r["macs_removed"] >= 0.58, "smallest", 1,
                         target=("macs_removed", 0.58))
    assert found == pytest.approx(10 ** 0.24, rel=1e-6) and len(tried) == 4


def test_boundary_search_extends_below_a_grid_that_starts_past_the_boundary():
    found, _ = find_boundary(lambda lam: {"m": lam}, [4.0, 8.0], lambda r: r["m"] >= 2.5, "smallest", 0)
    assert found == pytest.approx(4.0)
    tried = []
    found, _ = find_boundary(lambda lam: tried.append(lam) or {"m": lam}, [4.0, 8.0], lambda r: r["m"] >= 1.5,
                         "smallest", 1)
    assert tried == pytest.approx([4.0, 8.0, 2.0, 1.0, math.sqrt(2.0)]) and found == 2.0  # sqrt(2) < 1.5


# --- judging a trial: renormalized filters, re-estimated BN statistics; the depth stage's share -------------------


def test_renormalize_filters_restores_start_norms_and_keeps_the_function():
    model = tiny_resnet()
    structure = amsc_structure(model)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        model.layer1[0].conv1.weight.mul_(0.01)  # a shrunk block conv
        model.layer2[0].conv1.weight[:3].mul_(0.1)  # three shrunk filters of a width layer
        model.layer2[0].conv1.weight[5].zero_()  # one removed filter
        before = model.eval()(x)
    rescaled = renormalize_filters(structure)
    with torch.no_grad():
        after = model(x)
    assert rescaled == sum(p.conv.out_channels for p in structure.conv_bns) - 1
    for pair in structure.conv_bns:
        norms, start = pair.filter_norms(), pair.start_norms
        alive = norms > 0
        assert torch.allclose(norms[alive], start[alive], rtol=1e-5)
    assert float(model.layer2[0].conv1.weight[5].detach().abs().max()) == 0.0
    assert_close_to_scale(after, before, 1e-4)  # BN eps is the only difference


def test_bn_reestimation_forgets_old_statistics_and_averages_batch_statistics():
    data = synthetic_data(n_train=96)
    first = tiny_resnet()
    second = tiny_resnet()
    randomize_bn(second, seed=5)  # other running statistics, same weights except BN affine
    second.load_state_dict({k: v for k, v in first.state_dict().items() if "running" not in k}, strict=False)
    assert not torch.equal(first.bn1.running_mean, second.bn1.running_mean)
    used = [reestimate_batchnorm(m, data, 3, 32) for m in (first, second)]
    assert used == [3, 3] and not first.training and first.bn1.momentum == 0.1
    for a, b in zip(first.modules(), second.modules()):
        if isinstance(a, nn.BatchNorm2d):
            assert torch.allclose(a.running_mean, b.running_mean, atol=1e-6)
            assert torch.allclose(a.running_var, b.running_var, atol=1e-6)
    # by hand: the stem conv's outputs on the same three batches, per-batch mean and unbiased variance, averaged
    batches = [x for x, _ in data.train_batches(10_000, 32)][:3]
    with torch.no_grad():
        outs = [first.conv1(x) for x in batches]
    mean = torch.stack([o.mean((0, 2, 3)) for o in outs]).mean(0)
    var = torch.stack([o.var((0, 2, 3), unbiased=True) for o in outs]).mean(0)
    assert_close_to_scale(first.bn1.running_mean, mean, 1e-5)
    assert_close_to_scale(first.bn1.running_var, var, 1e-5)
    assert reestimate_batchnorm(first, data, 0, 32) == 0


class FakeTrials:
    """Stands in for _Trials: MACs removed grow with each lambda; validation top-1 falls with them."""

    def __init__(self, depth_cost: float, width_cost: float):
        self.records: dict = {}
        self.depth_cost, self.width_cost = depth_cost, width_cost

    def run(self, lambda_depth, lambda_width, stage):
        key = (float(lambda_depth), float(lambda_width))
        if key not in self.records:
            depth, width = min(0.8, lambda_depth), min(0.8, lambda_width)
            macs = depth + (1 - depth) * width
            self.records[key] = {"stage": stage, "lambda_depth": key[0], "lambda_width": key[1],
                                 "macs_removed": macs,
                                 "val_top1": 90.0 - self.depth_cost * 100 * depth - self.width_cost * 100 * width}
        return self.records[key]


def _fake_search(depth_cost, width_cost, **options):
    trials = FakeTrials(depth_cost, width_cost)
    settings = dict(search=True, ratio=0.6, max_drop=10.0, refine=0, depth_grid=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7),
                    width_grid=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6))
    settings.update(options)
    notes: list[str] = []
    key = search_lambdas(trials, amsc_structure(tiny_resnet()), AmscOptions(**settings), 1.0, notes)
    return key, trials, notes


def test_depth_stage_takes_at_most_its_share_of_the_target():
    key, trials, _ = _fake_search(0.1, 0.1, depth_share=0.5)
    assert key[0] == pytest.approx(0.3) and key[1] > 0  # largest lambda0 with MACs <= 0.5 * 0.6 (and drop <= 10)
    assert trials.records[key]["macs_removed"] >= 0.6
    key, _, _ = _fake_search(0.1, 0.05, max_drop=2.5)
    assert key[0] == pytest.approx(0.2) and key[1] > 0  # accuracy decides first: 0.3 would lose 3 points


def test_depth_may_take_the_whole_target_and_width_then_stays_off():
    key, trials, notes = _fake_search(0.01, 0.1)  # depth is cheap: it reaches the ratio within max-drop
    assert key == (pytest.approx(0.6), 0.0) and not any(r["stage"] == "width" for r in trials.records.values())
    assert any("already removes the ratio" in n for n in notes)


def test_both_keeps_depth_alone_when_it_is_more_accurate_at_the_ratio():
    key, trials, notes = _fake_search(0.1, 0.3, max_drop=2.5)  # depth within drop up to 0.2; width is expensive
    assert key[1] == 0.0 and trials.records[key]["macs_removed"] >= 0.6
    assert any("depth alone" in n for n in notes)
    key, _, _ = _fake_search(0.3, 0.05, max_drop=2.5)  # width is cheap: depth + width stays
    assert key[1] > 0


def test_depth_stage_drops_a_lambda_that_removes_nothing_and_prefers_less_shrinkage():
    class Stepwise(FakeTrials):
        def run(self, lambda_depth, lambda_width, stage):
            record = super().run(lambda_depth, lambda_width, stage)
            if lambda_width == 0.0:  # depth removes MACs in steps of 0.2 (whole blocks), shrinkage costs accuracy
                depth = 0.2 * math.floor(min(0.8, lambda_depth) / 0.2 + 1e-9)
                record["macs_removed"] = depth
                record["val_top1"] = 90.0 - 100 * 0.1 * depth - lambda_depth
            return record

    notes: list[str] = []
    options = AmscOptions(search=True, ratio=0.6, max_drop=2.5, refine=0, depth_grid=(0.05, 0.1, 0.15, 0.25, 0.3),
                          width_grid=(0.1, 0.3, 0.5, 0.7))
    trials = Stepwise(0.1, 0.02)
    key = search_lambdas(trials, amsc_structure(tiny_resnet()), options, 1.0, notes)
    assert key[0] == pytest.approx(0.25)  # 0.3 removes the same block(s) as 0.25 with more shrinkage
    trials = Stepwise(0.1, 0.02)
    options.max_drop = 1.5  # removing a block costs 2 points: nothing is removed within max-drop
    key = search_lambdas(trials, amsc_structure(tiny_resnet()), options, 1.0, notes)
    assert key[0] == 0.0 and any("removes no block" in n for n in notes)
