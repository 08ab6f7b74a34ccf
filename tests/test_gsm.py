"""Global Sparse Momentum SGD: the published update rule, the global mask, the passive decay, structured exact zeros."""

from __future__ import annotations

import copy
import math

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import compressor
from compressor.errors import CompressorError
from compressor.training.gsm import UNSTRUCTURED_NOTE, GlobalSparseMomentum, build_gsm_optimizer
from compressor.training.gsm_groups import FilterGroup, cifar_resnet_filter_groups, conv_linear_macs, filter_groups_for
from compressor.training.models import cifar_resnet
from tests.conftest import assert_close_to_scale

LR, BETA, ETA = 0.05, 0.98, 1e-4
CLOSE = dict(rtol=1e-12, atol=1e-14)  # float64: only the rounding of fused multiply-adds differs


class TinyNet(nn.Module):
    """Conv(bias) + BN + linear: conv/linear weights, a conv bias, BN gamma/beta, a linear bias."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1, bias=True)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3 * 4 * 4, 2)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x))).flatten(1))


class TinyResidual(nn.Module):
    """Stem, two residual branches (inner widths 3 and 4), linear: two removable filter groups of unequal MACs."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 2, 3, padding=1, bias=False)
        self.branches = nn.ModuleList()
        for width, kernel in ((3, 1), (4, 3)):
            self.branches.append(
                nn.ModuleDict(
                    {
                        "conv1": nn.Conv2d(2, width, 3, 1, 1, bias=False),
                        "bn1": nn.BatchNorm2d(width),
                        "conv2": nn.Conv2d(width, 2, kernel, 1, kernel // 2, bias=False),
                        "bn2": nn.BatchNorm2d(2),
                    }
                )
            )
        self.fc = nn.Linear(2, 3)

    def forward(self, x):
        out = self.stem(x)
        for b in self.branches:
            out = F.relu(out + b["bn2"](b["conv2"](F.relu(b["bn1"](b["conv1"](out))))))
        return self.fc(out.mean((2, 3)))

    def filter_groups(self):
        pairs = [(b["conv1"], b["bn1"], b["conv2"]) for b in self.branches]
        return filter_groups_for(self, pairs, (1, 2, 4, 4))


def _seeded(model_cls, seed=0):
    torch.manual_seed(seed)
    model = model_cls().double()
    for m in model.modules():  # non-trivial BN parameters so gamma/beta terms matter
        if isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.3)
            nn.init.normal_(m.bias, 0.0, 0.3)
    return model


def _backward(model, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 2, 4, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 2, (6,), generator=gen)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()


def _hand_step(params, grads, masks, buffers, decays):
    """The published rule written out: Z <- beta Z + eta_p W + mask * g; W <- W - alpha Z."""
    for name, w in params.items():
        z = BETA * buffers.get(name, torch.zeros_like(w)) + decays[name] * w + masks.get(name, 1.0) * grads[name]
        buffers[name] = z
        params[name] = w - LR * z


def _snapshot(model):
    return (
        {n: p.detach().clone() for n, p in model.named_parameters()},
        {n: p.grad.detach().clone() for n, p in model.named_parameters()},
    )


def test_unstructured_step_equals_hand_written_update():
    model = _seeded(TinyNet)
    weights = ["conv.weight", "fc.weight"]
    total = sum(dict(model.named_parameters())[n].numel() for n in weights)
    keep = int(0.4 * total)
    opt = GlobalSparseMomentum(model, LR, keep=keep, momentum=BETA, decay=ETA)
    expected, buffers = None, {}
    for step in range(3):
        _backward(model, seed=step)
        params, grads = _snapshot(model)
        if expected is not None:
            for n in params:
                torch.testing.assert_close(params[n], expected[n], **CLOSE)
        scores = {n: (grads[n] * params[n]).abs() for n in weights}
        threshold = torch.cat([s.flatten() for s in scores.values()]).sort(descending=True).values[keep - 1]
        masks = {n: (scores[n] >= threshold).double() for n in weights}
        assert sum(int(m.sum()) for m in masks.values()) == keep
        passive_with_gradient = sum(int(((1 - masks[n]) * grads[n]).ne(0).sum()) for n in weights)
        assert passive_with_gradient > 0  # the mask really removes gradients here
        decays = {n: (ETA if n in weights else 0.0) for n in params}  # biases and BN: no decay
        _hand_step(params, grads, masks, buffers, decays)
        expected = params
        opt.step()
        for n in weights:
            assert torch.equal(opt.last_masks[id(dict(model.named_parameters())[n])], masks[n].bool())
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[n], **CLOSE)


def test_mask_is_global_across_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6, bias=False), nn.Linear(6, 4, bias=False)).double()
    with torch.no_grad():
        model[1].weight.mul_(1000.0)  # huge scores: the second layer takes all of Q
    opt = GlobalSparseMomentum(model, LR, keep=model[1].weight.numel(), momentum=BETA, decay=ETA)
    first, second = model[0].weight.detach().clone(), model[1].weight.detach().clone()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    assert not opt.last_masks[id(model[0].weight)].any()
    assert opt.last_masks[id(model[1].weight)].all()
    torch.testing.assert_close(model[0].weight.detach(), first - LR * ETA * first, **CLOSE)  # decay only
    torch.testing.assert_close(model[1].weight.detach(), second - LR * (ETA * second + 1.0), **CLOSE)


def test_passive_weight_shrinks_geometrically():
    lr, beta, eta, steps = 0.01, 0.98, 1e-4, 3000
    model = nn.Linear(4, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[5.0, 5.0, 1.0, -1.0]]))
    opt = GlobalSparseMomentum(model, lr, keep=2, momentum=beta, decay=eta)
    # Active weights grow (their scores stay on top); passive ones have a gradient that the mask must remove.
    gradient = torch.tensor([[-1.0, -1.0, 0.01, 0.01]], dtype=torch.float64)
    w, z = torch.tensor([1.0, -1.0], dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    history = []
    for _ in range(steps):
        model.weight.grad = gradient.clone()
        opt.step()
        z = beta * z + eta * w
        w = w - lr * z
        torch.testing.assert_close(model.weight.detach()[0, 2:], w, **CLOSE)
        history.append(model.weight.detach()[0, 2:].clone())
    assert opt.last_masks[id(model.weight)].tolist() == [[True, True, False, False]]
    shrink = lr * eta / (1 - beta)
    start, end = 1000, steps - 1  # beta^1000 ~ 2e-9: the transient is gone
    per_step = (history[end] / history[start]) ** (1.0 / (end - start))
    np.testing.assert_allclose(per_step.numpy(), 1 - shrink, rtol=0, atol=0.01 * shrink)
    # the exact dominant root of the (W, Z) recursion, which the approximation stands for
    s = 1 + beta - lr * eta
    root = (s + math.sqrt(s * s - 4 * beta)) / 2
    np.testing.assert_allclose(per_step.numpy(), root, rtol=1e-9)


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.6])
def test_structured_step_equals_hand_written_update(ratio):
    model = _seeded(TinyResidual)
    groups = model.filter_groups()
    total_macs = conv_linear_macs(model, (1, 2, 4, 4))
    opt = GlobalSparseMomentum.structured(model, LR, ratio, groups, total_macs, momentum=BETA, decay=ETA)
    names = {id(p): n for n, p in model.named_parameters()}
    group_names = [[names[id(p)] for p in g[:3]] for g in groups]
    filter_macs = [g.macs_per_filter for g in groups for _ in range(g.conv_weight.shape[0])]
    budget = sum(filter_macs) - math.ceil(ratio * total_macs)
    conv_linear = {"stem.weight", "fc.weight"} | {f"branches.{i}.conv{k}.weight" for i in (0, 1) for k in (1, 2)}
    expected, buffers, seen_passive = None, {}, 0
    for step in range(3):
        _backward(model, seed=10 + step)
        params, grads = _snapshot(model)
        if expected is not None:
            for n in params:
                torch.testing.assert_close(params[n], expected[n], **CLOSE)
        scores = torch.cat(
            [
                ((grads[c] * params[c]).flatten(1).sum(1) + grads[g] * params[g] + grads[b] * params[b]).abs()
                for c, g, b in group_names
            ]
        )
        first, offset = [], 0
        for c, _, _ in group_names:  # each layer's best filter is always active (the engine never empties a layer)
            first.append(offset + int(scores[offset : offset + params[c].shape[0]].argmax()))
            offset += params[c].shape[0]
        ranking = first + [i for i in scores.argsort(descending=True).tolist() if i not in first]
        active, used = torch.zeros(len(filter_macs), dtype=torch.bool), 0
        for index in ranking:  # longest prefix within the budget
            if used + filter_macs[index] > budget:
                break
            used += filter_macs[index]
            active[index] = True
        seen_passive += int((~active).sum())
        masks, offset = {}, 0
        for c, g, b in group_names:
            unit = active[offset : offset + params[c].shape[0]].double()
            offset += params[c].shape[0]
            masks[c], masks[g], masks[b] = unit.view(-1, 1, 1, 1), unit, unit
        decays = {n: (ETA if n in conv_linear or n in masks else 0.0) for n in params}  # group gamma/beta decay too
        _hand_step(params, grads, masks, buffers, decays)
        expected = params
        opt.step()
        assert int(round(opt.last_active_macs.item())) == used <= budget
    assert seen_passive > 0
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[n], **CLOSE)


def test_structured_finalize_leaves_exact_zero_groups():
    model = _seeded(TinyResidual)
    groups = model.filter_groups()
    total_macs = conv_linear_macs(model, (1, 2, 4, 4))
    opt = GlobalSparseMomentum.structured(model, 0.1, 0.5, groups, total_macs)
    for step in range(20):
        _backward(model, seed=step)
        opt.step()
    summary = opt.finalize()
    assert summary.mode == "structured"
    assert summary.macs_removed >= math.ceil(0.5 * total_macs)
    removed_macs, zero_count = 0, 0
    for group in groups:
        name = opt.names[id(group.conv_weight)]
        zero = summary.zero_filters[name]
        keep = [j for j in range(group.conv_weight.shape[0]) if j not in zero]
        for p in (group.conv_weight, group.bn_weight, group.bn_bias):
            assert torch.count_nonzero(p.detach()[zero]) == 0  # exact zeros
            assert torch.count_nonzero(opt.state[p]["momentum_buffer"][zero]) == 0
        assert all(torch.count_nonzero(group.conv_weight.detach()[j]) > 0 for j in keep)
        assert summary.layer_sparsity[name] == len(zero) / group.conv_weight.shape[0]
        removed_macs += len(zero) * group.macs_per_filter
        zero_count += len(zero)
    assert summary.macs_removed == removed_macs and summary.zeroed == zero_count > 0


def test_unstructured_finalize_zeroes_outside_top_q():
    model = _seeded(TinyNet)
    opt = build_gsm_optimizer(model, "unstructured", 0.75, LR)
    for step in range(3):
        _backward(model, seed=step)
        opt.step()
    weights = [model.conv.weight, model.fc.weight]
    magnitudes = torch.cat([w.detach().abs().flatten() for w in weights])
    threshold = magnitudes.sort(descending=True).values[opt.keep - 1]
    summary = opt.finalize()
    total = magnitudes.numel()
    assert opt.keep == round(0.25 * total)
    assert sum(int(torch.count_nonzero(w)) for w in weights) == opt.keep
    for w, m in ((model.conv.weight, magnitudes[: model.conv.weight.numel()]),):
        assert torch.equal(w.detach().ne(0).flatten(), m >= threshold)
    assert summary.zeroed == total - opt.keep and summary.total == total
    assert summary.layer_sparsity["conv.weight"] == float((model.conv.weight == 0).sum()) / model.conv.weight.numel()
    assert set(summary.layer_sparsity) == {"conv.weight", "fc.weight"}
    assert summary.note == UNSTRUCTURED_NOTE and "ONNX Runtime" in summary.as_dict()["note"]
    assert model.conv.bias.ne(0).all()  # biases untouched


def test_cifar_resnet_groups_count_removed_consumer_slice():
    model = cifar_resnet("resnet20")
    groups = cifar_resnet_filter_groups(model)
    assert len(groups) == 9
    assert all(isinstance(g, FilterGroup) and g.bn_weight.shape == (g.conv_weight.shape[0],) for g in groups)
    per_filter = [g.macs_per_filter for g in groups]
    assert per_filter[0] == 16 * 9 * 32 * 32 + 16 * 9 * 32 * 32  # own MACs + conv2's input slice
    assert per_filter[3] == 16 * 9 * 16 * 16 + 32 * 9 * 16 * 16  # stride-2 conv1 of stage 2
    assert per_filter[8] == 64 * 9 * 8 * 8 * 2
    # every block conv (stem and linear aside) is counted exactly once by the groups
    stem_and_fc = 3 * 9 * 16 * 32 * 32 + 64 * 10
    assert conv_linear_macs(model) == sum(g.macs_per_filter * g.conv_weight.shape[0] for g in groups) + stem_and_fc


def test_ratio_out_of_reach_and_bad_mode_raise():
    model = cifar_resnet("resnet20")
    with pytest.raises(CompressorError, match="removable filters"):
        build_gsm_optimizer(model, "structured", 0.995, 0.1)
    with pytest.raises(CompressorError, match="unknown GSM mode"):
        build_gsm_optimizer(model, "blocks", 0.5, 0.1)
    with pytest.raises(CompressorError):
        GlobalSparseMomentum(model, 0.1)


def test_optimizer_state_round_trips():
    model = _seeded(TinyResidual)
    opt = GlobalSparseMomentum.structured(model, LR, 0.3, model.filter_groups(), conv_linear_macs(model, (1, 2, 4, 4)))
    _backward(model, seed=0)
    opt.step()
    clone = copy.deepcopy(model)
    other = GlobalSparseMomentum.structured(clone, LR, 0.3, clone.filter_groups(), conv_linear_macs(clone, (1, 2, 4, 4)))
    other.load_state_dict(opt.state_dict())
    assert [g["role"] for g in other.param_groups] == ["gsm", "active", "dense"]
    for p, q in zip(model.parameters(), clone.parameters()):
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], other.state[q]["momentum_buffer"])


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
def test_engine_removes_structured_gsm_zeros_exactly(tmp_path):
    torch.manual_seed(0)
    model = cifar_resnet("resnet20")
    ratio = 0.9
    opt = build_gsm_optimizer(model, "structured", ratio, 0.1)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.randn(8, 3, 32, 32, generator=gen)
        y = torch.randint(0, 10, (8,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    summary = opt.finalize()
    model.eval()
    path = tmp_path / "gsm.onnx"
    x = torch.randn(2, 3, 32, 32, generator=gen)
    torch.onnx.export(
        model, (x,), str(path), dynamo=False, input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
    )
    result = compressor.compress(str(path), method="zeros")
    report = result.report
    assert report["macs_before"] == conv_linear_macs(model)  # the ratio means what the engine measures
    assert report["macs_before"] - report["macs_after"] == summary.macs_removed >= ratio * report["macs_before"]
    widths = {opt.names[id(g.conv_weight)]: g.conv_weight.shape[0] for g in opt.filter_groups}
    assert all(0 < len(zero) < widths[name] for name, zero in summary.zero_filters.items())  # one kept per layer
    assert any(len(zero) == widths[name] - 1 for name, zero in summary.zero_filters.items())  # that case occurs here
    session = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    (slim,) = session.run(None, {"input": x.numpy()})
    with torch.no_grad():
        expected = model(x).numpy()
    assert_close_to_scale(slim, expected, 1e-5)
