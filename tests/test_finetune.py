"""`compress finetune`: converter glue and write-back, the KD loss, a CPU smoke run, and bad data."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import compressor
from cli.main import main
from compressor.engine.cost import model_cost

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")
pytest.importorskip("onnx2torch")
Image = pytest.importorskip("PIL.Image")

import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from compressor.training.distill import distillation_loss  # noqa: E402
from compressor.training.export import export_onnx, onnx_logits  # noqa: E402
from compressor.training.onnx_module import convert_onnx, write_back  # noqa: E402

CLASSES = ("cat", "dog", "fish")
SIZE = 16


class TinyNet(nn.Module):
    """Two residual stages and a linear head; the mean over H, W is ReduceMean in the dynamo export."""

    def __init__(self, classes: int = len(CLASSES)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(16, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU(),
                                  nn.Conv2d(24, 16, 3, padding=1), nn.BatchNorm2d(16))
        self.head = nn.Linear(16, classes)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(x + self.body(x))
        return self.head(x.mean((2, 3)))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """TinyNet as ONNX (TorchScript, dynamic batch) and its l1 --ratio 0.5 compression."""
    work = tmp_path_factory.mktemp("finetune-models")
    torch.manual_seed(0)
    original = work / "tiny.onnx"
    export_onnx(TinyNet().eval(), original, dynamo=False, image_size=SIZE)
    slim = work / "tiny.slim.onnx"
    compressor.compress(str(original), method="l1", ratio=0.5).save(slim)
    return original, slim


def _write_images(root: Path, classes=CLASSES, per_class: int = 6, seed: int = 0) -> Path:
    """An ImageFolder tree of small PNGs whose class is visible in the colour (so training can learn it)."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 80, (SIZE + 4, SIZE + 8, 3), dtype=np.uint8)
            pixels[..., label % 3] += 150
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def _run(args: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


# ------------------------------------------------------------------------------------------------ converter glue
@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_converted_module_matches_ort_and_writes_back_trained_values(tmp_path, dynamo):
    torch.manual_seed(1)
    path = tmp_path / "tiny.onnx"
    export_onnx(TinyNet().eval(), path, dynamo=dynamo, image_size=SIZE)
    if dynamo:
        assert any(n.op_type == "ReduceMean" for n in onnx.load(str(path)).graph.node)
    converted = convert_onnx(str(path))
    images = torch.randn(5, 3, SIZE, SIZE)
    with torch.no_grad():
        before = converted.module.eval()(images).numpy()
    reference = onnx_logits(str(path), images.numpy())
    assert np.max(np.abs(before - reference)) <= 1e-5 * np.max(np.abs(reference))
    assert converted.frozen == [] and converted.trainable_elements() > 0
    # every trainable tensor changes; the written graph must follow it exactly
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in converted.module.parameters():
            param.mul_(1 + 0.2 * torch.randn(param.shape, generator=generator))
        after = converted.module(images).numpy()
    written = write_back(converted)
    assert [n.op_type for n in written.graph.node] == [n.op_type for n in converted.proto.graph.node]
    actual = onnx_logits(written, images.numpy())
    assert np.max(np.abs(after - before)) > 1e-2 * np.max(np.abs(before))
    assert np.max(np.abs(actual - after)) <= 1e-5 * np.max(np.abs(after))


# ------------------------------------------------------------------------------------------------------- KD loss
def test_kd_loss_is_zero_when_student_equals_teacher():
    logits = torch.randn(8, 5) * 3
    assert distillation_loss(logits, logits.clone(), temperature=4.0).abs().item() < 1e-6
    labels = torch.full((8,), -1)
    assert distillation_loss(logits, logits.clone(), labels, temperature=2.0, alpha=0.5).abs().item() < 1e-6


def test_kd_gradient_pulls_student_towards_teacher():
    temperature, batch = 3.0, 4
    teacher = torch.randn(batch, 6) * 2
    student = torch.randn(batch, 6, requires_grad=True)
    loss = distillation_loss(student, teacher, temperature=temperature)
    loss.backward()
    expected = temperature * (F.softmax(student.detach() / temperature, 1) - F.softmax(teacher / temperature, 1)) / batch
    assert torch.allclose(student.grad, expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()))
    stepped = distillation_loss(student.detach() - 0.5 * student.grad, teacher, temperature=temperature)
    assert stepped < loss


def test_kd_loss_mixes_cross_entropy_on_labeled_items_only():
    student, teacher = torch.randn(6, 4), torch.randn(6, 4)
    labels = torch.tensor([0, 1, -1, 3, -1, 2])
    soft = distillation_loss(student, teacher, None, temperature=2.0)
    mixed = distillation_loss(student, teacher, labels, temperature=2.0, alpha=0.25)
    keep = labels >= 0
    hard = F.cross_entropy(student[keep], labels[keep])
    assert torch.allclose(mixed, 0.25 * soft + 0.75 * hard, rtol=1e-5)
    assert torch.allclose(distillation_loss(student, teacher, torch.full((6,), -1), 2.0, alpha=0.25), soft, rtol=1e-5)
    assert torch.allclose(distillation_loss(student, teacher, labels, alpha=0.0), hard, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------- smoke run
def test_finetune_trains_checks_and_keeps_the_macs(models, tmp_path, capsys):
    original, slim = models
    hashes = {path: _sha(path) for path in (original, slim)}
    train_dir = _write_images(tmp_path / "train")
    val_dir = _write_images(tmp_path / "val", per_class=3, seed=1)
    out, report_path = tmp_path / "tuned.onnx", tmp_path / "tuned.json"
    with pytest.raises(SystemExit) as exit_info:
        main(["finetune", str(slim), "--teacher", str(original), "--data", str(train_dir), "--val", str(val_dir),
              "-o", str(out), "--report", str(report_path), "--epochs", "3", "--batch-size", "6", "--lr", "0.05",
              "--device", "cpu", "--warmup-epochs", "0"])
    captured = capsys.readouterr()
    assert exit_info.value.code in (0, None), captured.err
    assert "epoch 3/3" in captured.err and "top-1" in captured.out
    assert {path: _sha(path) for path in hashes} == hashes
    import json

    report = json.loads(report_path.read_text())
    assert model_cost(str(out)).macs == model_cost(str(slim)).macs == report["macs"]
    assert model_cost(str(out)).macs < model_cost(str(original)).macs
    assert report["check"]["max_abs_diff"] <= report["check"]["tolerance"]
    assert report["images"] == {"train": 18, "val": 9, "test": 9}
    assert report["top1_before"] is not None and report["top1_after"] is not None
    assert report["batchnorms_inserted"] == sum(n.op_type == "Conv" for n in onnx.load(str(slim)).graph.node)
    assert len(report["history"]) == 3 and all(np.isfinite(r["train_loss"]) for r in report["history"])
    tuned, start = onnx.load(str(out)), onnx.load(str(slim))
    assert [(n.op_type, list(n.input)) for n in tuned.graph.node] == [(n.op_type, list(n.input)) for n in start.graph.node]
    changed = [init.name for init, old in zip(tuned.graph.initializer, start.graph.initializer)
               if not np.array_equal(numpy_helper.to_array(init), numpy_helper.to_array(old))]
    assert changed, "training changed no weight"


# ------------------------------------------------------------------------------------------------------ bad data
def _bad_data_case(models, tmp_path, capsys, data_dir: Path, extra: list[str] = ()) -> str:
    original, slim = models
    out = tmp_path / "out.onnx"
    code, _, err = _run(["finetune", str(slim), "--teacher", str(original), "--data", str(data_dir), "-o", str(out),
                         "--epochs", "1", "--device", "cpu", *extra], capsys)
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert "Traceback" not in err and not out.exists()
    return lines[0]


def test_empty_folder_is_one_error(models, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert "no images" in _bad_data_case(models, tmp_path, capsys, tmp_path / "empty")
    (tmp_path / "classes" / "cat").mkdir(parents=True)
    assert "no valid file" in _bad_data_case(models, tmp_path, capsys, tmp_path / "classes").lower()


def test_unreadable_image_is_one_error(models, tmp_path, capsys):
    data = _write_images(tmp_path / "train", per_class=2)
    (data / "dog" / "broken.jpg").write_bytes(b"not a jpeg at all")
    line = _bad_data_case(models, tmp_path, capsys, data)
    assert "cannot read image" in line and "broken.jpg" in line


def test_label_count_mismatch_is_one_error(models, tmp_path, capsys):
    data = _write_images(tmp_path / "train", classes=("cat", "dog"), per_class=2)
    line = _bad_data_case(models, tmp_path, capsys, data)
    assert "2 classes" in line and "3 outputs" in line


def test_output_path_equal_to_an_input_is_refused(models, tmp_path, capsys):
    original, slim = models
    data = _write_images(tmp_path / "train", per_class=1)
    before = _sha(slim)
    code, _, err = _run(["finetune", str(slim), "--teacher", str(original), "--data", str(data), "-o", str(slim),
                         "--device", "cpu"], capsys)
    assert code != 0 and err.startswith("error:") and "is the input" in err
    assert _sha(slim) == before


# ------------------------------------------------------------------------------------ shared with compress train
def test_distill_hook_replaces_the_cross_entropy_in_the_shared_loop():
    from compressor.training.distill import DistillHooks
    from compressor.training.loop import TrainConfig, train
    from compressor.training.models import build_model
    from tests.test_training import synthetic_data

    torch.manual_seed(0)
    model = build_model("resnet8").eval()  # eval: BN uses running stats, so student and teacher agree exactly
    teacher = build_model("resnet8")
    teacher.load_state_dict(model.state_dict())
    model.train = lambda mode=True: model  # keep eval-mode BN while the loop trains
    config = TrainConfig(epochs=1, batch_size=16, lr=0.0, momentum=0.0, weight_decay=0.0, eval_every=0)
    data = synthetic_data(n_train=32)
    distilled = train(model, data, config, [DistillHooks(teacher, alpha=1.0)])
    plain = train(model, data, config)
    assert distilled.history[0]["train_loss"] < 1e-6 < plain.history[0]["train_loss"]


def test_compress_train_distill_runs(tmp_path):
    from compressor.training.loop import TrainConfig
    from compressor.training.pipeline import TrainJob, run_job
    from tests.test_training import synthetic_data

    job = TrainJob(model="resnet8", data="unused", out=str(tmp_path / "kd"), device="cpu", verify_images=16,
                   prune="l1", ratio=0.3, distill=True, config=TrainConfig(epochs=1, batch_size=32, lr=0.02))
    metrics = run_job(job, data=synthetic_data(n_train=64), log=None)
    assert np.isfinite(metrics["history"][0]["train_loss"])
    assert metrics["export"]["slim_check"]["max_abs_diff"] <= metrics["export"]["slim_check"]["tolerance"]


def test_inserted_batchnorms_start_as_identity_and_fold_back_exactly(models):
    from compressor.training.conv_batchnorm import fold_batchnorms, insert_batchnorms

    _, slim = models
    converted = convert_onnx(str(slim), conv_biases=True)
    module = converted.module.eval()
    images = torch.randn(32, 3, SIZE, SIZE)
    with torch.no_grad():
        before = module(images)
    wrapped = insert_batchnorms(module, converted.convs, [images[:16], images[16:]])
    assert wrapped and set(wrapped) == set(converted.convs)
    with torch.no_grad():
        start = module(images)  # eval mode: running statistics = the calibration statistics, affine = identity
        module.train()
        module(images * 1.5 + 0.2)  # one training batch moves the running statistics
        module.eval()
        moved = module(images)
    assert torch.allclose(start, before, rtol=1e-4, atol=1e-4 * float(before.abs().max()))
    assert not torch.allclose(moved, start, rtol=1e-3, atol=1e-3 * float(start.abs().max()))
    fold_batchnorms(module, wrapped)
    with torch.no_grad():
        folded = module(images)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in module.modules())
    assert torch.allclose(folded, moved, rtol=1e-4, atol=1e-5 * float(moved.abs().max()))
    written = onnx_logits(write_back(converted), images.numpy())
    assert np.max(np.abs(written - folded.numpy())) <= 1e-5 * float(folded.abs().max())


def test_unlabeled_images_train_on_the_teacher_alone(models, tmp_path, capsys):
    original, slim = models
    flat = tmp_path / "flat"
    flat.mkdir()
    rng = np.random.default_rng(2)
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)).save(flat / f"{i}.jpg")
    out = tmp_path / "tuned.onnx"
    code, stdout, err = _run(["finetune", str(slim), "--teacher", str(original), "--data", str(flat), "-o", str(out),
                              "--epochs", "1", "--batch-size", "4", "--device", "cpu"], capsys)
    assert code in (0, None), err
    assert out.is_file() and model_cost(str(out)).macs == model_cost(str(slim)).macs
    code, _, err = _run(["finetune", str(slim), "--data", str(flat), "-o", str(tmp_path / "x.onnx"), "--device", "cpu"],
                        capsys)
    assert code != 0 and err.startswith("error:") and "teacher" in err
