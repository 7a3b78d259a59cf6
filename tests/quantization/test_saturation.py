"""The x86-without-VNNI emulation: exact where nothing overflows, saturating where ORT's AVX2 kernel does.

Every assertion here holds on any CPU: the emulation is arithmetic, not the machine's kernel.
The real-kernel check (ONNX Runtime on this CPU) branches on the features read from the machine.
"""
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from deepshrink.core.cpu import cpu_info
from deepshrink.core.targets import INT8_LAYOUTS, SATURATION_SAFE_LAYOUTS
from deepshrink.data import from_datasets
from deepshrink.quantization import Int8Static, quantize
from deepshrink.quantization.saturation import count_saturations, emulate_x86_without_vnni


class Mixed(nn.Module):
    """Padded strided conv, grouped conv, depthwise conv, conv1d and linear: every path of the emulator."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.conv1d = nn.Conv1d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 16, 10)

    def forward(self, x):
        x = torch.relu(self.depthwise(torch.relu(self.grouped(torch.relu(self.conv(x))))))
        x = torch.relu(self.conv1d(x.flatten(2)))
        return self.fc(x.flatten(1))


def saturating(seed: int = 0) -> tuple[nn.Module, object]:
    """Near-equal positive weights and inputs near the top of their range: every u8 x s8 pair is
    about 255 * 127 * 2 = 64,770 in a full-range layout, whatever the kernel's pairing order. The
    weights are off any coarse grid (equal weights would be one code, which the int8 observer
    keeps: ``quantization.observers``)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10)).eval()
    with torch.no_grad():
        model[0].weight.copy_(0.05 - torch.rand(8, 4, 3, 3) * 5e-4)   # codes 126..127
        model[0].bias.zero_()
        model[3].weight.copy_(torch.rand(10, 288) * 0.01 + 0.02)   # equal sign, near-equal size
    x = torch.rand(96, 4, 8, 8) * 0.1 + 0.9
    x[:, :, 0, 0] = 0.0                        # 0 inside the calibrated range, so the top of it is code 127
    y = model(x).argmax(1)
    return model, from_datasets(TensorDataset(x[:64], y[:64]), TensorDataset(x[64:], y[64:]), val=TensorDataset(x[64:], y[64:]),
                                num_classes=10, calib_size=64)


def labelled(model, shape, n=96):
    x = torch.randn(n, *shape, generator=torch.Generator().manual_seed(0))
    y = model(x).argmax(1)
    return from_datasets(TensorDataset(x[:64], y[:64]), TensorDataset(x[64:], y[64:]), val=TensorDataset(x[64:], y[64:]),
                         num_classes=10, calib_size=64)


@pytest.mark.parametrize("layout", INT8_LAYOUTS)
def test_without_saturation_the_emulation_is_the_graph_itself(layout):
    torch.manual_seed(0)
    model = Mixed().eval()
    data = labelled(model, (3, 8, 8))
    q = quantize(model, Int8Static(int8_layout=layout, calibration="minmax"), data=data, target="onnxruntime")
    x = torch.stack([data.test[i][0] for i in range(16)])
    exact, report = emulate_x86_without_vnni(q, x, saturate=False)
    with torch.no_grad():
        assert torch.equal(exact, q(x))
    # conv, grouped, conv1d and fc run the GEMM kernel; the depthwise conv and u8 x u8 never saturate
    counted = {name for name, pairs in report.pairs.items() if pairs}
    assert len(counted) == (0 if layout == "u8u8" else 4)


def test_full_range_weights_saturate_and_the_safe_layouts_cannot():
    model, data = saturating()
    x = torch.stack([data.test[i][0] for i in range(8)])
    results = {}
    for layout in INT8_LAYOUTS:
        q = quantize(model, Int8Static(int8_layout=layout, calibration="minmax"), data=data, target="onnxruntime")
        saturated, report = emulate_x86_without_vnni(q, x)
        with torch.no_grad():
            simulated = q(x)
        step = q._deepshrink_quant["activation_ranges"][-1]["scale"]
        results[layout] = (report.total_saturated, report.total_pairs, float((saturated - simulated).abs().max() / step))
    for layout in SATURATION_SAFE_LAYOUTS:
        assert results[layout][0] == 0 and results[layout][2] == 0.0
    for layout in ("s8s8", "u8s8"):
        saturated, pairs, steps = results[layout]
        assert saturated > 0.5 * pairs        # most pairs overflow (all of the conv's)
        assert steps > 10                     # and the output moves by many quantization steps


def test_saturation_is_counted_on_a_trained_conv_net(digits):
    """Not only adversarial weights: LeNet-5 after a short training saturates in its full-range layout."""
    from deepshrink.models import create
    from deepshrink.training import TrainConfig, fit

    torch.manual_seed(0)
    model = create("lenet-5")
    fit(model, digits, TrainConfig(epochs=1, lr=2e-3), progress=False)
    x = torch.stack([digits.test[i][0] for i in range(16)])
    full = quantize(model, Int8Static(int8_layout="s8s8"), data=digits)
    reduced = quantize(model, Int8Static(int8_layout="s8s8-reduced"), data=digits)
    assert count_saturations(full, x).total_saturated > 1000
    assert count_saturations(reduced, x).total_saturated == 0


def test_the_real_kernel_agrees_with_what_the_cpu_features_predict(tmp_path):
    """ONNX Runtime on this machine: exact on a VNNI CPU, saturated on x86 without VNNI — and the
    saturation-safe layout is right on both."""
    from deepshrink.deploy import export

    model, data = saturating()
    x = torch.stack([data.test[i][0] for i in range(16)])
    full = quantize(model, Int8Static(int8_layout="s8s8", calibration="minmax"), data=data, target="onnxruntime")
    result = export(full, tmp_path / "full.onnx", example_input=x, parity="warn")
    real, emulated = result.parity
    assert not emulated.passed                                       # on every CPU
    assert real.passed == (not cpu_info().int8_pairs_saturate)       # the machine's own kernel
    safe = quantize(model, Int8Static(calibration="minmax"), data=data, target="onnxruntime")
    safe_result = export(safe, tmp_path / "safe.onnx", example_input=x)
    assert safe._deepshrink_quant["int8_layout"] == "u8s8-guarded"     # the target's default
    real, emulated = safe_result.parity                                 # a guarded layout is checked by emulation too
    assert real.passed and emulated.passed


def test_the_gate_refuses_a_saturating_onnx_file_on_every_cpu(tmp_path):
    """The forced saturating configuration: full-range weights into an .onnx. On a VNNI CPU the
    file is right here, but the emulated AVX2 kernel is not, so export fails with one line."""
    from deepshrink.deploy import export
    from deepshrink.deploy.parity import EMULATED, ParityError

    model, data = saturating()
    x = torch.stack([data.test[i][0] for i in range(16)])
    full = quantize(model, Int8Static(int8_layout="s8s8", calibration="minmax"), data=data, target="onnxruntime")
    with pytest.raises(ParityError) as caught:
        export(full, tmp_path / "full.onnx", example_input=x)
    message = str(caught.value)
    assert "\n" not in message and "output steps" in message
    assert "int8 layout 's8s8' uses full-range weights" in message and "u8s8-reduced" in message
    if not cpu_info().int8_pairs_saturate:
        assert f"failed in {EMULATED}" in message        # this CPU computes it right; the CPUs it will meet do not
    assert not (tmp_path / "full.onnx").exists()


def test_the_sidecar_names_the_layers_that_saturate(tmp_path):
    """Kept with parity: warn, the file's sidecar says which layers saturate (the ones to fix), over every parity batch."""
    from deepshrink.deploy import export
    from deepshrink.formats.sidecar import read_sidecar

    model, data = saturating()
    samples = [data.test[i][0] for i in range(16)]
    full = quantize(model, Int8Static(int8_layout="s8s8", calibration="minmax"), data=data, target="onnxruntime")
    export(full, tmp_path / "full.onnx", example_input=torch.stack(samples[:4]), parity="warn", parity_samples=samples)
    record = read_sidecar(tmp_path / "full.onnx")["x86_saturation"]
    by_layer = record["saturated_by_layer"]
    assert record["can_saturate"] and sum(by_layer.values()) == record["total_saturated"] > 0
    assert "conv2d" in by_layer    # the conv's full-range weights overflow (its int16 pair sums); the fix names it
