"""Post-training repairs on the zoo ``mobile-cnn`` (ReLU6 and depthwise convs, as the TF-ported
MobileNet of the report), trained briefly on digits: CLE keeps the float function, no repair
lowers int8 top-1 agreement with the float model, and bias correction takes seconds."""
from __future__ import annotations

import pytest
import torch

from deepshrink.core.loops import TrainConfig
from deepshrink.models import zoo
from deepshrink.quantization import Int8Static, quantize
from deepshrink.quantization.bias_correction import calibration_batches, no_worse
from deepshrink.quantization.graph_passes import float_graph
from deepshrink.training import fit

# on mobile-cnn plain ``cle`` finds no pair (every one is clipped or feeds a residual add), so
# ``cle+bias_correction`` is bias correction alone
VARIANTS = {
    "none": {}, "cle": {"equalization": "cle"}, "cle_relu6_as_relu": {"equalization": "cle_relu6_as_relu"},
    "cle+bias_correction": {"equalization": "cle", "bias_correction": True},
}


@pytest.fixture(scope="module")
def trained(digits):
    """The trained float model, each variant's quantized model, and the outputs of all of them
    on the calibration samples and the test split."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # one core, as CI and the benchmarks run; the training is seeded
    try:
        torch.manual_seed(0)   # the initial weights, whatever ran before
        model = zoo.create("mobile-cnn")
        fit(model, digits, TrainConfig(epochs=2, lr=3e-3, batch_size=64, seed=0), progress=False)
        model.eval()
        quantized = {name: quantize(model, Int8Static(**kw), data=digits) for name, kw in VARIANTS.items()}
        inputs = {"calib": torch.cat(calibration_batches(digits, 256)),
                  "test": torch.stack([digits.test[i][0] for i in range(len(digits.test))])}
        with torch.no_grad():
            outputs = {split: {name: m(x) for name, m in [("float", model), *quantized.items()]} for split, x in inputs.items()}
    finally:
        torch.set_num_threads(threads)
    return model, quantized, outputs


def _agreement(outputs: dict, name: str) -> float:
    return float((outputs[name].argmax(1) == outputs["float"].argmax(1)).double().mean())


def test_cle_keeps_the_float_function_and_says_why_each_relu6_pair_is_skipped(trained):
    model, _, _ = trained
    x = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    equalized, rows = float_graph(model, x[:1], max_batch=1024, equalization="cle")
    with torch.no_grad():
        assert float((equalized(x) - model(x)).abs().max()) < 1e-5
    skipped = {r["first"]: r["reason"] for r in rows if r["second"] is None}
    assert "stem.0" in skipped and "block1.depthwise.0" in skipped and "not scale-equivariant" in skipped["block1.depthwise.0"]
    assert skipped["block2.project.0"] == "output used more than once"   # the residual add reads it too
    assert not [r for r in rows if r["second"] is not None]


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "none"])
def test_no_repair_lowers_int8_agreement(trained, variant):
    _, quantized, outputs = trained
    for split in ("calib", "test"):
        assert _agreement(outputs[split], variant) >= _agreement(outputs[split], "none"), split
    record = quantized[variant]._deepshrink_quant
    if "bias_correction" in record:   # what the guard saw on the calibration samples agrees with what it kept
        bias = record["bias_correction"]
        assert bias["kept"] == no_worse(bias["fidelity_after"], bias["fidelity_before"])


def test_relu6_as_relu_says_it_changes_the_float_model_and_is_kept_only_if_it_helps(trained):
    _, quantized, outputs = trained
    record = quantized["cle_relu6_as_relu"]._deepshrink_quant["equalization"]
    assert record["changes_float_model"] and all(r["activation"] == "relu6 replaced by relu" for r in record["pairs"])
    assert record["applied"] != torch.equal(outputs["calib"]["cle_relu6_as_relu"], outputs["calib"]["none"])
    if not record["applied"]:
        assert "lower" in record["reason"]


def test_bias_correction_removes_the_mean_error_of_every_layer(trained):
    """(Its speed is a benchmark's figure, not a timed test's: bench/results/repairs.md gives the
    quantize time with and without it.)"""
    _, quantized, _ = trained
    bias = quantized["cle+bias_correction"]._deepshrink_quant["bias_correction"]
    assert len(bias["layers"]) == 18
    for row in bias["layers"]:
        assert row["mean_abs_shift_after"] <= 1e-5 + 1e-2 * row["mean_abs_shift_before"]
