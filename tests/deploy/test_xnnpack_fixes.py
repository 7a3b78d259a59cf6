"""Graphs ExecuTorch's XNNPACK lowering rejects as they are, lowered after an exact rewrite; what
runs outside the delegate is recorded; a static-batch file is fed one sample per call."""
import torch
from torch import nn

from deepshrink.deploy import export
from deepshrink.deploy.xnnpack_fixes import prelu_to_4d
from deepshrink.evaluation.runners import open_runner
from deepshrink.formats.sidecar import read_sidecar


class DenseWithPReLU(nn.Module):
    """MTCNN's ONet head in small: conv, ceil-mode pool, a Linear and a PReLU on [batch, features]."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.act = nn.Conv2d(3, 4, 3), nn.PReLU(4)
        self.pool = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.fc, self.fc_act, self.out = nn.Linear(4 * 3 * 3, 8), nn.PReLU(8), nn.Linear(8, 2)
        with torch.no_grad():
            self.fc_act.weight.copy_(torch.linspace(-0.5, 0.9, 8))   # slopes that differ per feature

    def forward(self, x):
        x = self.pool(self.act(self.conv(x)))
        return self.out(self.fc_act(self.fc(x.flatten(1))))


def test_prelu_rewrite_is_exact_and_only_touches_non_4d_prelus():
    model, x = DenseWithPReLU().eval(), torch.randn(5, 3, 8, 8)
    program = torch.export.export(model, (x,))
    assert prelu_to_4d(program) == 1                          # the conv's PReLU is 4-D already
    assert torch.equal(program.module()(x), model(x))


def test_pte_with_a_dense_prelu_lowers_and_records_what_ran_outside(tmp_path):
    model, x = DenseWithPReLU().eval(), torch.randn(4, 3, 8, 8)
    dynamic = export(model, tmp_path / "dynamic.pte", example_input=x)
    assert dynamic.parity_passed
    delegation = read_sidecar(tmp_path / "dynamic.pte")["delegation"]
    # with a dynamic batch XNNPACK refuses ceil-mode pooling: it runs on portable kernels
    assert delegation["outside_delegate"] == {"max_pool2d_with_indices": 1} and delegation["delegate_calls"] == 2
    static = export(model, tmp_path / "static.pte", example_input=x, static_batch=True)
    assert static.parity_passed
    assert read_sidecar(tmp_path / "static.pte")["delegation"] == {"delegate_calls": 1, "outside_delegate": {}}


def test_static_batch_files_run_a_batch_one_sample_per_call(tmp_path):
    model, x = DenseWithPReLU().eval(), torch.randn(6, 3, 8, 8)
    for suffix in (".pte", ".onnx"):
        path = tmp_path / f"static{suffix}"
        result = export(model, path, example_input=x, static_batch=True)
        assert result.parity_passed and len(read_sidecar(path)["parity_batches"]) == 6   # one parity call per sample
        runner = open_runner(path)
        assert runner.max_batch == 1
        assert torch.allclose(runner.predict(x), model(x), atol=1e-5)
