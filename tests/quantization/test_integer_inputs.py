"""Integer tensors stay integer through int8 quantization: token ids, masks, index arithmetic."""
import torch
from torch import nn

from deepshrink.data import from_samples
from deepshrink.deploy import export
from deepshrink.evaluation.runners import open_runner
from deepshrink.quantization import Int8Static, quantize


class PositionalTokens(nn.Module):
    """Embedding of ids plus a position table indexed by ``arange(seq) + 1`` — integer arithmetic
    that XNNPACK's own scalar pass turned into floats (an IndexError at calibration)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.tokens = nn.Embedding(40, 8)
        self.positions = nn.Embedding(40, 8)
        self.fc = nn.Linear(8, 5)

    def forward(self, input_ids):
        positions = torch.arange(input_ids.shape[1]) + 1
        return self.fc(self.tokens(input_ids) + self.positions(positions)[None]).mean(1)


def test_index_arithmetic_survives_quantization_and_export(tmp_path):
    g = torch.Generator().manual_seed(0)
    samples = [torch.randint(0, 40, (int(n),), generator=g) for n in torch.randint(2, 20, (40,), generator=g)]
    data = from_samples(calib=samples[:24], eval=samples[24:])
    model = PositionalTokens().eval()
    q = quantize(model, Int8Static(), data=data)
    for suffix in (".pte", ".onnx"):
        result = export(q, tmp_path / f"m{suffix}", example_input=data.example_input(2), parity_samples=data.inputs("test"))
        assert result.parity_passed
        out = open_runner(tmp_path / f"m{suffix}").predict(torch.randint(0, 40, (1, 19)))
        assert out.shape == (1, 5)
