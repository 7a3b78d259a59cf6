"""GPTQ re-rounding of int8 LSTM/GRU matrices, with input scales on the first layer's w_ih
(quantization.recurrent_rounding): its codes, its guard, and the two runtime files."""
import pytest
import torch
from torch import nn

import deepshrink as ds
from deepshrink.deploy import export
from deepshrink.evaluation.runners import open_runner
from deepshrink.quantization.bias_correction import output_fidelity
from deepshrink.quantization.recurrent_rounding import Moments, gptq, output_error

STEPS, FEATURES, HIDDEN = 12, 10, 32


class Encoder(nn.Module):
    """A 2-layer cell over frames whose channels differ by three decades in magnitude (a power
    spectrum, as Resemblyzer's mel frames); its last output is the embedding. (With an int8
    projection after it, that layer's own rounding bounds the output SQNR near 47 dB, and the
    cell's re-rounding shows as 0.2-5 dB.)"""

    def __init__(self, cell: type = nn.LSTM, bidirectional: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.rnn = cell(FEATURES, HIDDEN, 2, batch_first=True, bidirectional=bidirectional)
        with torch.no_grad():   # weights sized for the input: large where the input is small
            self.rnn.weight_ih_l0.mul_(_channel_scale()[None, :] ** -0.5)

    def forward(self, x):
        out, _ = self.rnn(x)
        return out[:, -1]


def _channel_scale() -> torch.Tensor:
    return torch.logspace(0, -3, FEATURES)


def _samples(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(STEPS, FEATURES, generator=g) ** 2 * _channel_scale() for _ in range(n)]


def _sqnr(model, quantized, samples) -> float:
    x = torch.stack(samples)
    with torch.no_grad():
        return output_fidelity([model(x)], [quantized(x)])["sqnr_db"]


@pytest.fixture(scope="module")
def splits():
    return ds.data.from_samples(calib=_samples(64, 1), eval=_samples(32, 2))


def test_gptq_beats_nearest_rounding_on_correlated_inputs_and_keeps_the_grid():
    g = torch.Generator().manual_seed(0)
    mixing = torch.randn(16, 16, generator=g)
    x = torch.randn(400, 16, generator=g) @ mixing               # correlated input channels
    w = torch.randn(24, 16, generator=g)
    scales = w.abs().amax(1) / 127
    codes = gptq(w, x.T @ x, scales, -127, 127)
    nearest = torch.round(w / scales[:, None]).clamp(-127, 127)
    h = x.double().T @ x.double()
    ratio = output_error(w, codes.double() * scales[:, None], h) / output_error(w, nearest.double() * scales[:, None], h)
    assert codes.dtype == torch.int8 and int(codes.abs().max()) <= 127
    assert ratio < 0.6, ratio   # measured 0.49
    # a weight already on its grid is returned as its own codes: there is no error to spread
    on_grid = nearest * scales[:, None]
    assert torch.equal(gptq(on_grid, x.T @ x, scales, -127, 127).to(torch.float32), nearest)


def test_moments_split_the_samples_in_two_halves():
    seqs = [torch.randn(5, 3, 4), torch.randn(5, 2, 4)]   # 5 samples in two batches
    m = Moments(seqs)
    every = torch.cat([s.reshape(-1, 4) for s in seqs]).double()
    assert torch.allclose(m.full, every.T @ every)
    assert torch.allclose(m.folds[0] + m.folds[1], m.full)
    even = torch.cat([seqs[0][:, 0], seqs[0][:, 2], seqs[1][:, 1]]).double()   # samples 0, 2, 4
    assert torch.allclose(m.folds[0], even.T @ even)
    assert Moments([torch.randn(5, 1, 4)]).folds is None


@pytest.mark.parametrize("cell,bidirectional", [(nn.LSTM, False), (nn.GRU, False), (nn.LSTM, True)],
                         ids=["lstm", "gru", "bilstm"])
def test_re_rounding_raises_held_out_fidelity(splits, cell, bidirectional):
    model = Encoder(cell, bidirectional).eval()
    nearest = ds.quantize(model, ds.Int8Static(recurrent_rounding="nearest"), data=splits)
    rounded = ds.quantize(model, ds.Int8Static(), data=splits)
    record = ds.quantize_report(rounded)["recurrent_rounding"]
    assert record["applied"] and record["kept"]
    assert record["fidelity_after"]["sqnr_db"] > record["fidelity_before"]["sqnr_db"]
    assert len(record["matrices"]) == 4 * (2 if bidirectional else 1)
    first = [m for m in record["matrices"] if ".weight_ih_l0" in m["matrix"]]
    assert all(m["alpha"] > 0 for m in first), first   # the input channels span three decades
    assert any(n.name.startswith("_deepshrink_input_scale") for n in rounded.graph.nodes)
    assert "recurrent_rounding" not in ds.quantize_report(nearest) or not ds.quantize_report(nearest)["recurrent_rounding"]
    held_out = _samples(32, 2)   # the eval split: never calibrated on
    gain = _sqnr(model, rounded, held_out) - _sqnr(model, nearest, held_out)
    assert gain > 20.0, gain   # measured 30.0 (LSTM), 29.9 (GRU), 28.6 dB (bidirectional): 41-47 -> 71-77 dB


def test_a_fit_that_hurts_the_output_is_dropped():
    """48 rows of a 64-wide state: GPTQ shrinks each matrix's recorded error, the model's output
    SQNR falls, and nearest rounding stays (the codes are the observer's)."""
    torch.manual_seed(0)
    lstm = nn.LSTM(6, 64, 2, batch_first=True)

    class Last(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.fc = lstm, nn.Linear(64, 4)

        def forward(self, x):
            _, (h, _) = self.rnn(x)
            return self.fc(h[-1])

    model = Last().eval()
    g = torch.Generator().manual_seed(1)
    samples = [torch.randn(3, 6, generator=g) for _ in range(16)]
    data = ds.data.from_samples(calib=samples, eval=samples)
    quantized = ds.quantize(model, ds.Int8Static(int8_layout="s8s8-reduced"), data=data)
    record = ds.quantize_report(quantized)["recurrent_rounding"]
    assert record["applied"] and not record["kept"]
    assert record["fidelity_after"]["sqnr_db"] < record["fidelity_before"]["sqnr_db"]
    for name, w in model.rnn.named_parameters():
        if name.startswith("weight"):
            scale = torch.clamp(w.detach().abs().amax(dim=1) / 127, min=2**-12)
            expected = torch.clamp(torch.round(w.detach() * (1.0 / scale[:, None])), -127, 127).to(torch.int8)
            assert any(torch.equal(b, expected) for b in quantized.buffers() if b.dtype == torch.int8), name
    assert not any(n.name.startswith("_deepshrink_input_scale") for n in quantized.graph.nodes)


def test_input_scaled_cell_in_both_files(splits, tmp_path):
    model = Encoder().eval()
    quantized = ds.quantize(model, ds.Int8Static(), data=splits)
    assert any(n.name.startswith("_deepshrink_input_scale") for n in quantized.graph.nodes)
    samples = _samples(8, 3)
    x = torch.stack(samples)
    with torch.no_grad():
        graph_out = quantized(x)
    for suffix, kwargs in ((".onnx", {}), (".pte", {"static_batch": True})):
        path = tmp_path / f"int8{suffix}"
        result = export(quantized, path, example_input=x[:1], parity_samples=samples[:2], **kwargs)
        assert result.parity_passed, suffix
        runner = open_runner(path)
        produced = torch.cat([runner.predict_all(s[None])[0] for s in samples])
        # .onnx: the float cell on the same constants; .pte: the deeper layers' inputs rounded per row at run time
        assert (produced - graph_out).abs().max().item() < (1e-4 if suffix == ".onnx" else 0.02), suffix


def test_the_report_lists_every_matrix_and_the_check(splits):
    from deepshrink.report.html import render_report

    record = ds.quantize_report(ds.quantize(Encoder().eval(), ds.Int8Static(), data=splits))["recurrent_rounding"]
    stage = {"index": 0, "stage": {"quantize": {}}, "seconds": 1.0, "summary": {"line": "x", "recurrent_rounding": record}}
    html = render_report({"variants": {}, "shipped": None, "stages": [stage]}, title="t")
    assert "Recurrent cells: GPTQ rounding of the int8 weight matrices — kept" in html
    row = html[html.index("<td>lstm.weight_ih_l0</td>"):].split("</tr>")[0]
    first = record["matrices"][0]
    assert f"{first['alpha']:.4g}" in row and f"{first['error_ratio']:.4g}" in row and "GPTQ" in row


def test_the_setting_round_trips_and_an_unknown_one_is_refused():
    import yaml

    from deepshrink.core.config import from_dict, to_dict
    from deepshrink.core.errors import ConfigError
    from deepshrink.quantization.configs import Int8Static

    config = Int8Static(recurrent_rounding="nearest")
    assert from_dict(Int8Static, yaml.safe_load(yaml.safe_dump(to_dict(config)))) == config
    with pytest.raises(ConfigError, match="recurrent_rounding"):
        from_dict(Int8Static, {"recurrent_rounding": "adaround"})
