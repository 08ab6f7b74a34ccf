"""Knowledge distillation (Hinton et al., 2015): the student matches the teacher's temperature-softened outputs.

loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, labels)

The T^2 factor keeps the gradient scale of the soft term independent of T. Items labeled -1 (unlabeled data) count
in the KL term only; without labels the loss is the KL term alone. DistillHooks plugs this into the training loop
(compressor.training.loop) of `compress train` and `compress finetune`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from compressor.errors import CompressorError
from compressor.training.loop import TrainHooks

DEFAULT_TEMPERATURE = 4.0
DEFAULT_ALPHA = 0.9


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None = None,
                      temperature: float = DEFAULT_TEMPERATURE, alpha: float = DEFAULT_ALPHA) -> torch.Tensor:
    """The KD loss of a batch (fp32): alpha * T^2 * mean KL(teacher_T || student_T) + (1 - alpha) * cross-entropy
    on the items whose label is >= 0 (the KL term alone when `labels` is None or all are -1)."""
    if temperature <= 0 or not 0.0 <= alpha <= 1.0:
        raise CompressorError(f"bad distillation settings: temperature {temperature}, alpha {alpha}")
    student = student_logits.float()
    teacher_log_probs = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    student_log_probs = F.log_softmax(student / temperature, dim=1)
    soft = F.kl_div(student_log_probs, teacher_log_probs, reduction="batchmean", log_target=True) * temperature ** 2
    if labels is None or alpha == 1.0:
        return soft
    labeled = labels >= 0
    count = labeled.sum()
    hard = F.cross_entropy(student, labels.clamp(min=0), reduction="none")
    hard = (hard * labeled).sum() / count.clamp(min=1)
    # without any labeled item in the batch the soft term carries the whole weight
    has_labels = (count > 0).float()
    weight = alpha * has_labels + (1.0 - has_labels)
    return weight * soft + (1.0 - weight) * hard


class DistillHooks(TrainHooks):
    """Training hook that replaces the cross-entropy with distillation_loss against a frozen teacher, run on the
    same (augmented, normalized) batch under the same autocast."""

    def __init__(self, teacher: nn.Module, temperature: float = DEFAULT_TEMPERATURE, alpha: float = DEFAULT_ALPHA):
        if temperature <= 0 or not 0.0 <= alpha <= 1.0:
            raise CompressorError(f"bad distillation settings: temperature {temperature}, alpha {alpha}")
        self.teacher = teacher.eval().requires_grad_(False)
        self.temperature, self.alpha = float(temperature), float(alpha)

    def loss(self, images: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """KD loss of the student's logits against the teacher's on `images`."""
        with torch.no_grad():
            teacher_logits = self.teacher(images)
        return distillation_loss(logits, teacher_logits, labels, self.temperature, self.alpha)
