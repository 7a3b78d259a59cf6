"""LSTMs and GRUs as a scan over time of ops XNNPACK runs: the same values as nn.LSTM / nn.GRU, every op of the
cell delegated in the .pte, one step in the file whatever the number of frames."""
import pytest
import torch
from torch import nn

from deepshrink.core.errors import ExportError
from deepshrink.deploy import export
from deepshrink.deploy.recurrent import ScannedGRU, ScannedLSTM, foldable_recurrent_weights, scan_recurrent, scan_recurrent
from deepshrink.formats.sidecar import read_sidecar


class Encoder(nn.Module):
    """A speaker-encoder in small: LSTM over frames, the last hidden state projected."""

    def __init__(self, **lstm) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential()
        self.body.add_module("lstm", nn.LSTM(5, 6, 2, batch_first=True, **lstm))
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        _, (h, _) = self.body.lstm(x)
        return self.fc(h[-1])


@pytest.mark.parametrize("kwargs", [dict(batch_first=True), dict(batch_first=False), dict(bidirectional=True, batch_first=True),
                                    dict(bias=False, batch_first=False, bidirectional=True)])
def test_scanned_lstm_equals_nn_lstm(kwargs):
    torch.manual_seed(1)
    lstm = nn.LSTM(5, 7, 3, **kwargs).eval()
    x = torch.randn(4, 9, 5) if kwargs.get("batch_first") else torch.randn(9, 4, 5)
    directions = 2 if kwargs.get("bidirectional") else 1
    hx = (torch.randn(3 * directions, 4, 7), torch.randn(3 * directions, 4, 7))
    for args in ((x,), (x, hx), (x[0] if kwargs.get("batch_first") else x[:, 0],)):   # zero state, given state, unbatched
        want_out, (want_h, want_c) = lstm(*args)
        out, (h, c) = ScannedLSTM(lstm)(*args)
        for got, want in ((out, want_out), (h, want_h), (c, want_c)):
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kwargs", [dict(batch_first=True), dict(batch_first=False, bidirectional=True),
                                    dict(bias=False, batch_first=True)])
def test_scanned_gru_equals_nn_gru(kwargs):
    torch.manual_seed(2)
    gru = nn.GRU(5, 7, 2, **kwargs).eval()
    x = torch.randn(3, 6, 5) if kwargs.get("batch_first") else torch.randn(6, 3, 5)
    hx = torch.randn(2 * (2 if kwargs.get("bidirectional") else 1), 3, 7)
    for args in ((x,), (x, hx), (x[0] if kwargs.get("batch_first") else x[:, 0],)):
        want_out, want_h = gru(*args)
        out, h = ScannedGRU(gru)(*args)
        for got, want in ((out, want_out), (h, want_h)):
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_scan_recurrent_leaves_the_original_model_alone_and_rewrites_captured_graphs():
    model, x = Encoder().eval(), torch.randn(2, 8, 5)
    scanned = scan_recurrent(model)
    assert type(model.body.lstm) is nn.LSTM and type(scanned.body.lstm) is ScannedLSTM
    assert scanned.body.lstm.lstm.weight_ih_l0 is model.body.lstm.weight_ih_l0            # weights shared, not copied
    torch.testing.assert_close(scanned(x), model(x), atol=1e-6, rtol=1e-5)
    graph = torch.export.export(model, (x,)).module()
    assert any(n.target is torch.ops.aten.lstm.input for n in graph.graph.nodes)
    scanned_graph = scan_recurrent(graph)
    assert not any(n.target is torch.ops.aten.lstm.input for n in scanned_graph.graph.nodes)
    assert any(n.target is torch.ops.aten.lstm.input for n in graph.graph.nodes)          # the original graph kept
    torch.testing.assert_close(scanned_graph(x), model(x), atol=1e-6, rtol=1e-5)
    plain = nn.Linear(3, 3)
    assert scan_recurrent(plain) is plain


def test_lstm_pte_delegates_every_cell_op_and_holds_one_step_whatever_the_length(tmp_path):
    model = Encoder().eval()
    sizes = {}
    for frames in (8, 32):
        samples = [torch.randn(frames, 5) for _ in range(5)]
        result = export(model, tmp_path / f"enc{frames}.pte", example_input=torch.stack(samples[:2]), parity_samples=samples,
                        static_batch=True)
        assert result.parity_passed and result.parity_max_abs_diff < 1e-5
        delegation = read_sidecar(tmp_path / f"enc{frames}.pte")["delegation"]
        # the whole recurrence is inside XNNPACK: each layer's input projection and its step (the scan body, run at
        # every frame) are delegates, as is fc; only the model's own h[-1] (a select, which XNNPACK lacks) and the
        # zero states run outside
        assert delegation["delegate_calls"] == 6
        assert set(delegation["outside_delegate"]) <= {"full", "select_copy.int"}
        sizes[frames] = (tmp_path / f"enc{frames}.pte").stat().st_size
    assert sizes[8] == sizes[32], sizes   # one step in the file, not one per frame


def test_a_pte_takes_any_number_of_frames_within_the_exported_range(tmp_path):
    from deepshrink.evaluation.runners import open_runner

    model = Encoder().eval()
    samples = [torch.randn(6, 5) for _ in range(4)]
    result = export(model, tmp_path / "enc.pte", example_input=torch.stack(samples[:2]), parity_samples=samples,
                    static_batch=True, dynamic={0: {1: (2, 40)}})
    assert result.parity_passed
    runner = open_runner(tmp_path / "enc.pte")
    torch.manual_seed(3)
    for frames in (2, 17, 40):
        x = torch.randn(2, frames, 5)
        torch.testing.assert_close(runner.predict(x), model(x), atol=1e-5, rtol=1e-5)


def test_a_dynamic_batch_writes_the_frames_out_and_refuses_a_dynamic_length_too(tmp_path):
    from deepshrink.core.graph import capture
    from deepshrink.evaluation.runners import open_runner

    model = Encoder().eval()
    samples = [torch.randn(8, 5) for _ in range(4)]
    result = export(model, tmp_path / "enc.pte", example_input=torch.stack(samples[:2]), parity_samples=samples)
    assert result.parity_passed
    runner = open_runner(tmp_path / "enc.pte")
    for batch in (1, 3):
        x = torch.randn(batch, 8, 5)
        torch.testing.assert_close(runner.predict(x), model(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(ExportError, match="both a dynamic batch and a dynamic time dimension.*static_batch: true"):
        capture(scan_recurrent(model), torch.randn(2, 6, 5), max_batch=4, dynamic={0: {1: (2, 16)}})


def _int8_graph(cell=nn.LSTM):
    """A 2-layer cell quantized by the int8 quantizer (weights int8 per row, weight-only)."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from deepshrink.core.graph import drop_unused_weights
    from deepshrink.quantization.quantizer import build_quantizer, quantization_config

    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("rnn", cell(5, 8, 2, batch_first=True))
    x = torch.randn(4, 6, 5)
    prepared = prepare_pt2e(torch.export.export(model.eval(), (x,)).module(),
                            build_quantizer(quantization_config(per_channel=True)))
    prepared(x)
    graph = convert_pt2e(prepared)
    drop_unused_weights(graph)
    return model, graph, x


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU], ids=["lstm", "gru"])
def test_int8_cells_become_per_row_int8_linears(cell):
    model, graph, x = _int8_graph(cell)
    scanned = scan_recurrent(graph)
    captured = torch.export.export(scanned, (x,)).graph_module
    nodes = [n for m in captured.modules() if isinstance(m, torch.fx.GraphModule) for n in m.graph.nodes]   # scan bodies too
    dq = [n for n in nodes if n.target is torch.ops.quantized_decomposed.dequantize_per_channel.default]
    # the 3 int8 matrices (layer 0's w_hh, layer 1's w_ih and w_hh), each dequantized by the one linear reading it
    # (layer 1's projection, and each layer's step), each linear's input rounded per row (then dequantize_affine)
    assert len(dq) == 3
    assert sum(n.target is torch.ops.torchao.dequantize_affine.default for n in nodes) == len(dq)
    # layer 0's input projection is float: the dequantized codes, exactly
    floats = [b for name, b in scanned.named_buffers() if name.startswith("_deepshrink_float_")]
    w = model.rnn.weight_ih_l0.detach()
    scale = torch.clamp(w.abs().amax(dim=1) / 127, min=2**-12)
    assert len(floats) == 1 and torch.equal(floats[0], torch.clamp(torch.round(w * (1.0 / scale[:, None])), -127, 127) * scale[:, None])
    assert not any(b.dtype == torch.int8 and b.shape == w.shape for b in scanned.buffers())   # its codes are not carried
    with torch.no_grad():   # the .pte's computation: activations rounded to int8 per row, bar layer 0's input
        diff = (scanned(x)[0] - graph(x)[0]).abs().max().item()
    assert 0 < diff < 0.02, diff


def test_onnx_cell_weights_become_foldable_constants():
    import numpy as np
    import onnx_ir as ir

    codes = ir.Value(name="codes", const_value=ir.tensor(np.array([[1, -2], [3, 4]], np.int8)))
    scale = ir.Value(name="scale", const_value=ir.tensor(np.array([0.5, 0.25], np.float32)))
    zero = ir.Value(name="zero", const_value=ir.tensor(np.zeros(2, np.int8)))
    dq = ir.node("DequantizeLinear", [codes, scale, zero], attributes={"axis": 0})
    gemm_dq = ir.node("DequantizeLinear", [codes, scale, zero], attributes={"axis": 0})
    x = ir.Value(name="x", shape=ir.Shape([1, 1, 2]), type=ir.TensorType(ir.DataType.FLOAT))
    w = ir.node("Unsqueeze", [dq.outputs[0], ir.Value(name="axes", const_value=ir.tensor(np.array([0], np.int64)))])
    lstm = ir.node("LSTM", [x, w.outputs[0], w.outputs[0]], attributes={"hidden_size": 1})
    gemm = ir.node("Gemm", [x, gemm_dq.outputs[0]])
    graph = ir.Graph([x], [*lstm.outputs[:1], gemm.outputs[0]], nodes=[dq, gemm_dq, w, lstm, gemm],
                     initializers=[codes, scale, zero, w.inputs[1]], opset_imports={"": 21})
    model = ir.Model(graph, ir_version=10)
    assert foldable_recurrent_weights(model) == 1          # the Gemm's weight stays a QDQ pair ORT fuses
    ops = [n.op_type for n in model.graph]
    assert ops.count("DequantizeLinear") == 1 and "Cast" in ops and "Mul" in ops
    mul = next(n for n in model.graph if n.op_type == "Mul")
    np.testing.assert_array_equal(mul.inputs[1].const_value.numpy(), np.array([[0.5], [0.25]], np.float32))
    assert "codes" in model.graph.initializers                                  # still the int8 codes on disk
