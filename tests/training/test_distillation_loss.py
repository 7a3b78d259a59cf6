"""``Distillation.loss``: KL of softened scores for classifiers, relative squared error for any
other output (embeddings, hidden states), chosen by ``auto`` from the teacher's output."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deepshrink.core.errors import ConfigError
from deepshrink.core.loops import Distillation, TrainConfig
from deepshrink.data.splits import from_samples
from deepshrink.training import fit
from deepshrink.training.loop import distillation_loss


def test_mse_is_the_squared_error_relative_to_the_teachers_energy():
    teacher = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    student = torch.tensor([[3.0, 5.0], [1.0, 0.0]])
    # (0 + 1 + 1 + 0) / (9 + 16) = 2 / 25
    assert float(distillation_loss(student, teacher, Distillation(loss="mse"))) == pytest.approx(0.08)


def test_auto_takes_kl_for_class_scores_and_mse_for_hidden_states():
    g = torch.Generator().manual_seed(0)
    scores_t, scores_s = torch.randn(6, 10, generator=g), torch.randn(6, 10, generator=g)
    t = 4.0
    kl = F.kl_div(F.log_softmax(scores_s / t, -1), F.log_softmax(scores_t / t, -1), log_target=True,
                  reduction="batchmean") * t * t
    assert float(distillation_loss(scores_s, scores_t, Distillation())) == pytest.approx(float(kl), rel=1e-6)

    hidden_t, hidden_s = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    relative = (hidden_s - hidden_t).pow(2).sum() / hidden_t.pow(2).sum()
    assert float(distillation_loss(hidden_s, hidden_t, Distillation())) == pytest.approx(float(relative), rel=1e-6)

    unit_t = F.normalize(torch.randn(4, 16, generator=g), dim=-1)   # embeddings: rows of unit norm
    unit_s = F.normalize(torch.randn(4, 16, generator=g), dim=-1)
    assert float(distillation_loss(unit_s, unit_t, Distillation())) == pytest.approx(
        float((unit_s - unit_t).pow(2).sum() / unit_t.pow(2).sum()), rel=1e-6)


def test_a_loss_that_is_not_one_of_them_is_refused_by_name():
    with pytest.raises(ConfigError, match=r"loss: 'l1' is not one of auto, kl, mse"):
        Distillation(loss="l1")


class Encoder(nn.Module):
    """[batch, seq, 8] hidden states from [batch, seq, 4] frames."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 8))

    def forward(self, x):
        return self.net(x)


def _relative_error(student: nn.Module, teacher: nn.Module, samples) -> float:
    with torch.no_grad():
        x = torch.stack(samples)
        return float((student(x) - teacher(x)).pow(2).sum() / teacher(x).pow(2).sum())


def _distilled_error(loss: str) -> tuple[float, float]:
    g = torch.Generator().manual_seed(1)
    samples = [torch.randn(6, 4, generator=g) for _ in range(64)]
    data = from_samples(calib=samples, eval=samples[:8])
    teacher, student = Encoder(seed=0).eval(), Encoder(seed=1)
    before = _relative_error(student, teacher, samples)
    fit(student, data, TrainConfig(epochs=30, lr=1e-2, batch_size=16, distill=Distillation(loss=loss), seed=0),
        teacher=teacher, progress=False)
    return before, _relative_error(student, teacher, samples)


def test_unlabelled_hidden_states_are_learned_closer_with_mse_than_with_kl():
    before, mse = _distilled_error("mse")
    _, kl = _distilled_error("kl")
    assert before > 1.0                 # 2.54 here: the student starts far off
    assert mse < 0.02 * before          # 0.025: what the loss measures falls a hundredfold
    assert kl > 5 * mse                 # 0.30: softmax over features ignores each row's mean and scale
