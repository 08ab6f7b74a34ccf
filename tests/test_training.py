"""Training side: data on the device, augmentation, schedules, the loop and its hooks, DDP, export, masks, CLI."""

from __future__ import annotations

import json
import math
import os
import socket
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn

from compressor.errors import CompressorError, VerificationError
from compressor.training.data import CifarData, load_cifar10_data, random_crop_flip
from compressor.training.distributed import DistContext
from compressor.training.export import check_outputs, export_and_slim, export_onnx, onnx_logits, onnxscript_available, torch_logits
from compressor.training.loop import TrainConfig, TrainHooks, evaluate, learning_rate, train
from compressor.training.masks import MaskHooks, conv_bn_pairs, plan_masks
from compressor.training.models import build_model, load_checkpoint
from compressor.training.pipeline import TrainJob, out_prefix, run_job

SHARED = Path(os.environ.get("COMPRESSOR_SHARED", Path(__file__).resolve().parents[2] / "shared"))
DATA_DIR = SHARED / "data" / "cifar10"
RESNET56 = next(iter(sorted((SHARED / "models" / "cifar10-resnet").glob("resnet56-*.th"))), None) \
    if (SHARED / "models" / "cifar10-resnet").is_dir() else None
needs_data = pytest.mark.skipif(not (DATA_DIR / "cifar10-test.tar.xz").is_file(), reason="shared CIFAR-10 data absent")
needs_dynamo = pytest.mark.skipif(not onnxscript_available(), reason="onnxscript (dynamo exporter) not installed")


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread: on a shared 2-core machine two threads spin against other processes (20x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def synthetic_data(n_train: int = 96, n_val: int = 32, n_test: int = 32, seed: int = 0) -> CifarData:
    """Random uint8 images whose label is decided by the mean of one colour channel (learnable, tiny)."""
    g = torch.Generator().manual_seed(seed)

    def split(n):
        labels = torch.randint(0, 10, (n,), generator=g)
        images = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
        images[:, 0] = (labels * 25).to(torch.uint8)[:, None, None]
        return images, labels

    return CifarData(*split(n_train), *split(n_val), *split(n_test))


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine parameters, so that folding BN is not an identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


# --- data ----------------------------------------------------------------------------------------------------------


def test_random_crop_flip_matches_per_image_reference():
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (6, 3, 32, 32), generator=g, dtype=torch.uint8)
    offsets = torch.randint(0, 9, (6, 2), generator=g)
    flips = torch.tensor([True, False, True, False, False, True])
    got = random_crop_flip(images, offsets, flips, 4)
    for i in range(6):
        padded = torch.nn.functional.pad(images[i], (4, 4, 4, 4))
        crop = padded[:, offsets[i, 0]:offsets[i, 0] + 32, offsets[i, 1]:offsets[i, 1] + 32]
        expected = crop.flip(2) if flips[i] else crop
        assert torch.equal(got[i], expected)


def test_train_batches_shard_the_global_batches_across_ranks():
    data = synthetic_data(n_train=40)
    single = list(data.train_batches(3, 8, seed=5, augment=False))
    ranks = [list(data.train_batches(3, 8, seed=5, rank=r, world_size=2, augment=False)) for r in range(2)]
    assert len(single) == 5 and all(len(r) == 5 for r in ranks)
    for step, (x, y) in enumerate(single):
        merged_x = torch.empty_like(x)
        merged_y = torch.empty_like(y)
        for r in range(2):
            merged_x[r::2], merged_y[r::2] = ranks[r][step]
        assert torch.equal(merged_x, x) and torch.equal(merged_y, y)
    again = list(data.train_batches(3, 8, seed=5, augment=False))
    assert all(torch.equal(a[1], b[1]) for a, b in zip(single, again))
    other_epoch = list(data.train_batches(4, 8, seed=5, augment=False))
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(single, other_epoch))


@needs_data
def test_validation_split_is_carved_from_train_and_seeded():
    data = load_cifar10_data(DATA_DIR, limit=300, val_size=5000)
    assert data.sizes() == {"train": 240, "val": 60, "test": 300}
    again = load_cifar10_data(DATA_DIR, limit=300, seed=0)
    assert torch.equal(again.val_labels, data.val_labels) and torch.equal(again.val_images, data.val_images)
    other = load_cifar10_data(DATA_DIR, limit=300, seed=1)
    assert not torch.equal(other.val_images, data.val_images)


def test_train_holds_out_the_same_validation_images_whatever_its_seed(tmp_path, monkeypatch):
    from compressor.training import pipeline
    from compressor.training.data import VALIDATION_SPLIT_SEED

    seen = []

    def record(*args, **kwargs):
        seen.append(kwargs["seed"])
        raise CompressorError("stop after the data split")

    monkeypatch.setattr(pipeline, "load_cifar10_data", record)
    for seed in (0, 3):
        job = TrainJob(model="resnet8", data=str(tmp_path), out=str(tmp_path / f"s{seed}"), device="cpu",
                       config=TrainConfig(epochs=1, seed=seed))
        with pytest.raises(CompressorError, match="stop after"):
            run_job(job, log=None)
    assert seen == [VALIDATION_SPLIT_SEED, VALIDATION_SPLIT_SEED]


# --- schedules, loop, hooks ----------------------------------------------------------------------------------------


def test_learning_rate_schedules():
    cosine = TrainConfig(epochs=10, lr=0.1, schedule="cosine")
    assert learning_rate(cosine, 0.0) == pytest.approx(0.1)
    assert learning_rate(cosine, 0.5) == pytest.approx(0.05)
    assert learning_rate(cosine, 1.0) == pytest.approx(0.0, abs=1e-12)
    warm = TrainConfig(epochs=10, lr=0.1, warmup_epochs=2)
    assert learning_rate(warm, 0.1) == pytest.approx(0.05)
    assert learning_rate(warm, 0.2) == pytest.approx(0.1)
    one = TrainConfig(epochs=10, lr=0.1, schedule="onecycle")
    assert learning_rate(one, 0.0) == pytest.approx(0.1 / 25)
    assert learning_rate(one, 0.25) == pytest.approx(0.1)
    assert learning_rate(one, 1.0) == pytest.approx(0.1 / 1e4)
    assert learning_rate(TrainConfig(lr=0.3, schedule="constant"), 0.7) == 0.3
    with pytest.raises(CompressorError):
        TrainConfig(schedule="step")


class RecordingHooks(TrainHooks):
    def __init__(self):
        self.lrs, self.penalty_calls = [], 0
        self.optimizer = None

    def make_optimizer(self, model, config):
        self.optimizer = torch.optim.SGD(model.parameters(), lr=config.lr)
        return self.optimizer

    def penalty(self, model):
        self.penalty_calls += 1
        return 0.0 * sum(p.sum() for p in model.parameters())

    def after_step(self, model, optimizer, lr):
        assert optimizer is self.optimizer
        self.lrs.append(lr)

    def after_training(self, model, optimizer):
        return {"recorded": len(self.lrs)}


def test_train_runs_hooks_and_learns():
    torch.manual_seed(0)
    data = synthetic_data(n_train=128)
    model = build_model("resnet8")
    before = evaluate(model, data, "val")
    hooks = RecordingHooks()
    config = TrainConfig(epochs=4, batch_size=32, lr=0.05, schedule="cosine")
    result = train(model, data, config, [hooks])
    assert result.steps == 16 and hooks.penalty_calls == 16 and result.extra == {"recorded": 16}
    assert hooks.lrs[0] == pytest.approx(0.05) and hooks.lrs == sorted(hooks.lrs, reverse=True)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert result.val_top1 == evaluate(model, data, "val") and 0 <= before <= 100


class ScheduleProbe(TrainHooks):
    """Records the learning rate and momentum each optimizer step runs with."""

    def __init__(self, momentum: float):
        self.momentum, self.seen, self.optimizer = momentum, [], None

    def make_optimizer(self, model, config):
        self.optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=self.momentum, nesterov=True)
        return self.optimizer

    def penalty(self, model):
        group = self.optimizer.param_groups[0]
        self.seen.append((group["lr"], group["momentum"]))
        return None


def test_onecycle_torch_schedule_is_torchs_onecyclelr_step_by_step():
    data = synthetic_data(n_train=64)
    probe = ScheduleProbe(momentum=0.9)
    result = train(build_model("resnet8"), data, TrainConfig(epochs=5, batch_size=16, lr=0.1, schedule="onecycle-torch"),
                   [probe])
    reference_optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1, momentum=0.9, nesterov=True)
    reference = torch.optim.lr_scheduler.OneCycleLR(reference_optimizer, max_lr=0.1, total_steps=result.steps)
    expected = []
    for step in range(result.steps):
        group = reference_optimizer.param_groups[0]
        expected.append((group["lr"], group["momentum"]))
        if step + 1 < result.steps:
            reference_optimizer.step()
            reference.step()
    assert result.steps == 20 and len(probe.seen) == len(expected)
    assert [v for pair in probe.seen for v in pair] == pytest.approx([v for pair in expected for v in pair])
    lrs, momenta = zip(*probe.seen)
    assert max(lrs) == pytest.approx(0.1) and lrs[0] == pytest.approx(0.1 / 25) and min(momenta) < 0.86 < 0.94 < momenta[0]
    with pytest.raises(CompressorError):
        train(build_model("resnet8"), data, TrainConfig(epochs=1, batch_size=16, schedule="onecycle-torch", momentum=0.0))


def test_two_optimizer_replacements_are_refused():
    data = synthetic_data(n_train=32)
    with pytest.raises(CompressorError):
        train(build_model("resnet8"), data, TrainConfig(epochs=1, batch_size=16), [RecordingHooks(), RecordingHooks()])


# --- DDP (gloo, 2 processes on the CPU) ----------------------------------------------------------------------------


class NoBnNet(nn.Module):
    """Without BN the gradient of a split batch averaged over ranks equals the full batch's gradient."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, 2, 1)
        self.linear = nn.Linear(8, 10)

    def forward(self, x):
        return self.linear(torch.relu(self.conv(x)).mean((2, 3)))


def _ddp_worker(rank: int, world: int, port: int, result_path: str) -> None:
    import torch.distributed as dist

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = NoBnNet()
        ctx = DistContext(rank=rank, world_size=world, device=torch.device("cpu"))
        train(model, synthetic_data(n_train=64), TrainConfig(epochs=2, batch_size=16, lr=0.1, nesterov=False), [], ctx)
        acc = evaluate(model, synthetic_data(n_train=64), "val", batch_size=8, ctx=ctx)
        torch.save({"state": model.state_dict(), "val": acc}, f"{result_path}.{rank}")
        dist.barrier()  # neither rank tears gloo down while the other still talks to it (an abort under load)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_match_single_process(tmp_path):
    import torch.multiprocessing as mp

    result = str(tmp_path / "ddp")
    mp.spawn(_ddp_worker, args=(2, _free_port(), result), nprocs=2, join=True)
    torch.manual_seed(0)
    single = NoBnNet()
    data = synthetic_data(n_train=64)
    train(single, data, TrainConfig(epochs=2, batch_size=16, lr=0.1, nesterov=False))
    ranks = [torch.load(f"{result}.{r}") for r in range(2)]
    for name, value in single.state_dict().items():
        assert torch.equal(ranks[0]["state"][name], ranks[1]["state"][name])
        assert torch.allclose(ranks[0]["state"][name], value, atol=1e-5, rtol=1e-4)
    assert ranks[0]["val"] == ranks[1]["val"] == pytest.approx(evaluate(single, data, "val"))


# --- models, export, masks -----------------------------------------------------------------------------------------


def test_models_build_and_pair_conv_with_bn():
    assert build_model("vgg16_bn")(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    pairs = conv_bn_pairs(build_model("resnet8"))
    assert pairs["conv1"] == "bn1" and pairs["layer2.0.conv2"] == "layer2.0.bn2" and len(pairs) == 7
    assert len(conv_bn_pairs(build_model("vgg16_bn"))) == 13
    with pytest.raises(CompressorError):
        build_model("resnet7")


def test_torchvision_classifier_or_clear_error():
    try:
        model = build_model("tv:resnet18", 10)
    except CompressorError as exc:
        assert "torchvision" in str(exc)
        return
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 10)


@pytest.mark.parametrize("dynamo", [pytest.param(True, marks=needs_dynamo), False])
def test_export_names_and_bn_folding(tmp_path, dynamo):
    model = randomize_bn(build_model("resnet8"))
    exporter = export_onnx(model, tmp_path / "m.onnx", dynamo=dynamo)
    proto = onnx.load(str(tmp_path / "m.onnx"))
    ops = {n.op_type for n in proto.graph.node}
    names = {i.name for i in proto.graph.initializer}
    assert "BatchNormalization" not in ops  # both exporters fold BN into Conv in eval mode
    if dynamo:
        assert exporter == "dynamo" and {"layer1.0.conv1.weight", "layer1.0.conv1.weight_bias"} <= names
    else:
        assert exporter == "torchscript" and "layer1.0.conv1.weight" not in names  # TorchScript renames folded weights
    assert export_onnx(model, tmp_path / "k.onnx", keep_bn=True) == "torchscript-keep-bn"
    kept = onnx.load(str(tmp_path / "k.onnx"))
    assert "BatchNormalization" in {n.op_type for n in kept.graph.node}
    assert {"layer1.0.conv1.weight", "layer1.0.bn1.weight", "layer1.0.bn1.bias"} <= {i.name for i in kept.graph.initializer}
    images = torch.randn(8, 3, 32, 32)
    for path in (tmp_path / "m.onnx", tmp_path / "k.onnx"):
        check_outputs(torch_logits(model, images), onnx_logits(path, images.numpy()), path.name)


def test_check_outputs_fails_loudly():
    reference = np.ones((4, 10), dtype=np.float32)
    assert check_outputs(reference, reference + 1e-6, "same")["max_abs_diff"] < 2e-6
    with pytest.raises(VerificationError):
        check_outputs(reference, reference + 1e-2, "off")
    tiny = reference * 1e-6  # logits ~1e-6: an error as large as the output itself must fail (no absolute floor)
    with pytest.raises(VerificationError):
        check_outputs(tiny, tiny * 2, "tiny")


@pytest.mark.parametrize("keep_bn", [pytest.param(False, marks=needs_dynamo), True])
def test_plan_masks_map_back_and_zeros_removes_exactly_the_plan(tmp_path, keep_bn):
    torch.manual_seed(0)
    model = randomize_bn(build_model("resnet8"))
    masks, report = plan_masks(model, "l1", 0.4, keep_bn=keep_bn)
    assert report["plan_export"] == ("torchscript-keep-bn" if keep_bn else "dynamo")
    assert "layer1.0.bn1.weight" in masks.keep  # the BN of a pruned conv is masked too (folded in the dynamo export)
    masks.apply(model)
    slim = export_and_slim(model, tmp_path / "masked", torch.randn(16, 3, 32, 32), dynamo=None)
    assert slim["macs_after"] == report["macs_planned"]
    data = synthetic_data(n_train=32)
    train(model, data, TrainConfig(epochs=1, batch_size=16, lr=0.05), [MaskHooks(masks)])
    assert all(bool((p[~masks.keep[n]] == 0).all()) for n, p in model.named_parameters() if n in masks.keep)


# --- pipeline and CLI ----------------------------------------------------------------------------------------------


def test_out_prefix_accepts_any_of_the_output_names():
    assert out_prefix("runs/a.slim.onnx") == out_prefix("runs/a.onnx") == out_prefix("runs/a") == Path("runs/a")


def test_mask_ramp_shrinks_the_pruned_entries_linearly_then_zeroes_them():
    from compressor.training.masks import MaskHooks, ParameterMasks

    model = nn.Sequential(nn.Linear(4, 3))
    start = model[0].weight.detach().clone()
    keep = torch.ones(3, 4, dtype=torch.bool)
    keep[1] = False
    hooks = MaskHooks(ParameterMasks({"0.weight": keep}), ramp_steps=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    for step in range(1, 6):
        hooks.after_step(model, optimizer, 0.0)
        weight = model[0].weight.detach()
        assert torch.allclose(weight[1], start[1] * max(4 - step, 0) / 4, atol=1e-7)
        assert torch.equal(weight[[0, 2]], start[[0, 2]])
    assert torch.count_nonzero(model[0].weight[1]) == 0


def test_mask_ramp_fine_tune_ends_exact_and_is_refused_without_a_prune_mask(tmp_path):
    data = synthetic_data(n_train=64)
    job = TrainJob(model="resnet8", data="unused", out=str(tmp_path / "ramp"), device="cpu", verify_images=16,
                   prune="l1", ratio=0.3, mask_ramp_epochs=1.0, config=TrainConfig(epochs=2, batch_size=32, lr=0.02))
    metrics = run_job(job, data=data, log=None)
    assert metrics["mask_ramp"] == {"epochs": 1.0, "steps": 2} and metrics["macs_reduction"] > 0.2
    assert metrics["export"]["slim_check"]["max_abs_diff"] <= metrics["export"]["slim_check"]["tolerance"]
    for bad in ({"mask_ramp_epochs": 1.0}, {"prune": "l1", "ratio": 0.3, "mask_ramp_epochs": 3.0},
                {"method": "gsm", "ratio": 0.3, "mask_ramp_epochs": 1.0}):
        with pytest.raises(CompressorError, match="mask-ramp-epochs"):
            TrainJob(model="resnet8", data="unused", out=str(tmp_path / "bad"), config=TrainConfig(epochs=2), **bad).validate()


@pytest.mark.parametrize("recipe", ["prune", "gsm"])
def test_pipeline_recipes_write_exact_slim_models(tmp_path, recipe):
    options = {"prune": {"prune": "l1", "ratio": 0.3},
               "gsm": {"method": "gsm", "ratio": 0.3, "gsm_epochs": 1, "gsm_lr": 0.01}}[recipe]
    job = TrainJob(model="resnet8", data="unused", out=str(tmp_path / recipe), device="cpu", verify_images=16,
                   config=TrainConfig(epochs=1, batch_size=32, lr=0.02), **options)
    metrics = run_job(job, data=synthetic_data(n_train=64), log=None)
    assert metrics["macs_reduction"] >= 0.3 - 1e-6 if recipe == "gsm" else metrics["macs_reduction"] > 0.2
    assert metrics["export"]["slim_check"]["max_abs_diff"] <= metrics["export"]["slim_check"]["tolerance"]
    saved = json.loads((tmp_path / f"{recipe}.json").read_text())
    assert saved["test_top1"] == metrics["test_top1"] and (tmp_path / f"{recipe}.slim.onnx").is_file()
    state = build_model("resnet8")
    load_checkpoint(state, tmp_path / f"{recipe}.pt")


@needs_data
@pytest.mark.skipif(RESNET56 is None, reason="shared ResNet-56 checkpoint absent")
def test_resnet56_checkpoint_scores_83_on_the_jpeg_test_set(tmp_path):
    from compressor.datasets import load_cifar10, normalize_nchw

    images, labels = load_cifar10(DATA_DIR, "test")
    model = build_model("resnet56")
    load_checkpoint(model, RESNET56)
    export_onnx(model, tmp_path / "r56.onnx", dynamo=False)  # ONNX Runtime scores 10k images ~2.5x faster than eager
    x = normalize_nchw(images)
    logits = onnx_logits(tmp_path / "r56.onnx", x, threads=1)
    check_outputs(torch_logits(model, torch.from_numpy(x[:200])), logits[:200], "ResNet-56 export")
    top1 = 100.0 * float(np.mean(logits.argmax(1) == labels))
    assert len(labels) == 10000 and abs(top1 - 83.0) <= 1.0


@pytest.mark.parametrize("schedule, warned", [("cosine", True), ("onecycle", False)])
def test_distilling_without_a_warmup_says_so(tmp_path, schedule, warned):
    from compressor.training.pipeline import NO_WARMUP_NOTE

    lines = []
    job = TrainJob(model="resnet8", data="unused", out=str(tmp_path / schedule), device="cpu", verify_images=8,
                   distill=True, config=TrainConfig(epochs=1, batch_size=32, lr=0.02, schedule=schedule))
    run_job(job, data=synthetic_data(n_train=32), log=lines.append)
    assert (NO_WARMUP_NOTE in lines) == warned


@needs_data
def test_compress_train_smoke_run(tmp_path):
    from cli.main import main

    out = tmp_path / "smoke"
    argv = ["train", "--model", "resnet8", "--data", str(DATA_DIR), "--epochs", "1", "--limit", "300",
            "--batch-size", "64", "--verify-images", "64", "-o", str(out)]
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code in (0, None)
    metrics = json.loads(out.with_suffix(".json").read_text())
    assert metrics["command"].startswith("compress train --model resnet8")
    assert metrics["data"] == {"train": 240, "val": 60, "test": 300} and len(metrics["history"]) == 1
    assert math.isfinite(metrics["history"][0]["train_loss"]) and 0 <= metrics["test_top1"] <= 100
    for suffix in (".pt", ".onnx", ".slim.onnx"):
        assert out.with_name(out.name + suffix).is_file()
