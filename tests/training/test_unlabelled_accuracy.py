"""Without labels, ``accuracy`` is agreement with the original: top-1 for a classifier's scores,
mean cosine similarity for any other output (hidden states, embeddings)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from deepshrink.data.splits import NO_LABEL
from deepshrink.training import accuracy


class Hidden(nn.Module):
    """[batch, seq, 8] hidden states, plus optional noise on the output."""

    def __init__(self, noise: float = 0.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj, self.noise = nn.Linear(4, 8), noise

    def forward(self, x):
        h = self.proj(x)
        return h + self.noise * torch.sin(13 * h)   # a deterministic change of every feature


def loader(n: int = 12) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    return DataLoader([(torch.randn(5, 4, generator=g), NO_LABEL) for _ in range(n)], batch_size=4)


def test_a_tensor_output_scores_by_cosine_similarity_not_by_an_argmax_over_features():
    reference, changed = Hidden().eval(), Hidden(noise=0.3).eval()
    assert accuracy(reference, loader(), reference=reference) == pytest.approx(1.0)
    with torch.no_grad():
        expected = torch.cat([F.cosine_similarity(changed(x).reshape(len(x), -1), reference(x).reshape(len(x), -1), dim=-1)
                              for x, _ in loader()]).mean()
    score = accuracy(changed, loader(), reference=reference)
    assert score == pytest.approx(float(expected), abs=1e-6)
    assert 0.5 < score < 0.999   # changed, and measured as changed


def test_a_classifier_still_scores_by_top1_agreement():
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Flatten(), nn.Linear(20, 6)).eval()
    flipped = nn.Sequential(nn.Flatten(), nn.Linear(20, 6)).eval()
    with torch.no_grad():
        flipped[1].weight.copy_(-reference[1].weight)
        flipped[1].bias.copy_(-reference[1].bias)
        expected = torch.cat([(flipped(x).argmax(-1) == reference(x).argmax(-1)).float() for x, _ in loader()]).mean()
    assert accuracy(flipped, loader(), reference=reference) == pytest.approx(float(expected))
    assert accuracy(reference, loader(), reference=reference) == 1.0


class WithDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj, self.drop = nn.Linear(4, 8), nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(self.proj(x))


def test_dropout_stays_off_in_both_models_and_every_module_gets_its_own_mode_back():
    """The BERT example's fidelity once read 94.8 % cosine for a 32.6 dB model: a wrapper built in
    train mode (``nn.Module``'s default) around an eval model had its flag restored to every
    module after the first score, switching dropout on in the reference and the model."""
    from deepshrink.core.outputs import SelectOutputs

    inner = WithDropout().eval()
    wrapped = SelectOutputs(inner, [0])
    assert wrapped.training is False   # the wrapped model's mode
    first = accuracy(wrapped, loader(), reference=wrapped)
    second = accuracy(wrapped, loader(), reference=inner)
    assert first == pytest.approx(1.0, abs=1e-6) and second == pytest.approx(1.0, abs=1e-6)
    assert not any(m.training for m in wrapped.modules())
    # a reference left in train mode is scored in eval mode and handed back in train mode
    teacher, student = WithDropout().train(), WithDropout().eval()
    student.proj.train()   # mixed modes: each module keeps its own
    assert accuracy(student, loader(), reference=teacher) == pytest.approx(1.0, abs=1e-6)
    assert all(m.training for m in teacher.modules())
    assert [m.training for m in student.modules()] == [False, True, False]
