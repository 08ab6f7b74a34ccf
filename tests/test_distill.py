"""Knowledge distillation: the KD loss, the hook in the training loop, and `compress train --distill`."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from compressor.errors import CompressorError
from compressor.training.distill import DistillHooks, distillation_loss
from compressor.training.loop import TrainConfig, evaluate, train
from compressor.training.models import build_model
from compressor.training.pipeline import TrainJob, run_job
from tests.test_training import one_torch_thread, synthetic_data  # noqa: F401 - the autouse fixture applies here too


def test_kd_loss_follows_the_formula():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(8, 10, generator=g), torch.randn(8, 10, generator=g) * 3
    labels = torch.randint(0, 10, (8,), generator=g)
    t, alpha = 3.0, 0.7
    p_teacher = torch.softmax(teacher / t, 1)
    kl = (p_teacher * (torch.log(p_teacher) - torch.log_softmax(student / t, 1))).sum(1).mean()
    expected = alpha * t * t * kl + (1 - alpha) * F.cross_entropy(student, labels)
    got = distillation_loss(student, teacher, labels, t, alpha)
    assert torch.allclose(got, expected, rtol=1e-5)
    assert float(distillation_loss(teacher, teacher, labels, t, 1.0)) == pytest.approx(0.0, abs=1e-6 * float(kl))
    assert torch.allclose(distillation_loss(student, teacher, labels, t, 0.0), F.cross_entropy(student, labels), rtol=1e-6)
    for bad in ((0.0, 0.5), (2.0, 1.5), (2.0, -0.1)):
        with pytest.raises(CompressorError):
            distillation_loss(student, teacher, labels, *bad)


class ConstantTeacher(nn.Module):
    """A teacher that is sure every image is class 3."""

    def forward(self, x):
        logits = torch.zeros(len(x), 10, device=x.device)
        logits[:, 3] = 10.0
        return logits


def test_distillation_hook_makes_the_student_follow_the_teacher_not_the_labels():
    torch.manual_seed(0)
    data = synthetic_data(n_train=128)
    model = build_model("resnet8")
    train(model, data, TrainConfig(epochs=3, batch_size=32, lr=0.05), [DistillHooks(ConstantTeacher(), 2.0, 1.0)])
    model.eval()
    with torch.no_grad():
        predictions = model(data.normalize(data.val_images)).argmax(1)
    assert float((predictions == 3).float().mean()) > 0.9
    assert evaluate(model, data, "val") < 50.0  # the labels are not class 3 for most images


def test_train_job_distills_from_a_teacher_checkpoint(tmp_path):
    torch.manual_seed(0)
    teacher = build_model("resnet8")
    teacher_path = tmp_path / "teacher.pt"
    torch.save({"state_dict": teacher.state_dict()}, teacher_path)
    job = TrainJob(model="resnet8", data="unused", out=str(tmp_path / "kd"), device="cpu", verify_images=16,
                   prune="l1", ratio=0.3, distill=str(teacher_path), kd_temperature=2.0, kd_weight=0.5,
                   config=TrainConfig(epochs=1, batch_size=32, lr=0.02))
    metrics = run_job(job, data=synthetic_data(n_train=64), log=None)
    assert metrics["distill"] == {"teacher": str(teacher_path), "temperature": 2.0, "weight": 0.5}
    assert math.isfinite(metrics["history"][0]["train_loss"])
    assert json.loads((tmp_path / "kd.json").read_text())["distill"]["weight"] == 0.5
    with pytest.raises(CompressorError, match="checkpoint not found"):
        run_job(TrainJob(model="resnet8", data="unused", out=str(tmp_path / "x"), distill=str(tmp_path / "none.pt")))
    with pytest.raises(CompressorError, match="distillation"):
        run_job(TrainJob(model="resnet8", data="unused", out=str(tmp_path / "x"), kd_weight=1.5))


def test_cli_distill_errors_are_one_line(tmp_path, capsys):
    from cli.main import main

    with pytest.raises(SystemExit) as done:
        main(["train", "--model", "resnet8", "--data", str(tmp_path), "-o", str(tmp_path / "o"),
              "--distill", str(tmp_path / "missing.pt")])
    err = capsys.readouterr().err.strip().splitlines()
    assert done.value.code != 0 and err[-1].startswith("error:") and "missing.pt" in err[-1]
    assert not any(tmp_path.glob("o*"))


def test_train_refuses_outputs_that_overwrite_its_checkpoints(tmp_path):
    """`-o OUT` writes OUT.pt: with --init OUT.pt (or --distill OUT.pt) that would destroy the input; refused first."""
    torch.manual_seed(0)
    checkpoint = tmp_path / "model.pt"
    torch.save({"state_dict": build_model("resnet8").state_dict()}, checkpoint)
    before = checkpoint.read_bytes()
    for job in (TrainJob(model="resnet8", data="unused", out=str(tmp_path / "model"), init=str(checkpoint)),
                TrainJob(model="resnet8", data="unused", out=str(tmp_path / "model.json"), distill=str(checkpoint))):
        with pytest.raises(CompressorError, match="inputs are never overwritten"):
            run_job(job, log=None)
    assert checkpoint.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]
