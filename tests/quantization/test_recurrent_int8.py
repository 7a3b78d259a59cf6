"""LSTM and GRU weights int8 per output row through every int8 scheme, in both runtime files.

The .onnx keeps its LSTM/GRU op and reads the int8 codes through Cast x scale, which ONNX Runtime
folds when it loads the file; the .pte runs the cell as a scan over time of qd8-f32-qc8w linears (deploy.recurrent).
"""
import numpy as np
import pytest
import torch
from torch import nn

import deepshrink as ds
from deepshrink.deploy import export
from deepshrink.formats.sidecar import read_sidecar

STEPS, FEATURES, HIDDEN = 3, 6, 64


class Encoder(nn.Module):
    """A speaker encoder in small: a 2-layer cell over the frames, its last hidden state projected."""

    def __init__(self, cell: type = nn.LSTM, features: int = FEATURES) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.rnn, self.fc = cell(features, HIDDEN, 2, batch_first=True), nn.Linear(HIDDEN, 4)

    def forward(self, x):
        _, state = self.rnn(x)
        h = state[0] if isinstance(state, tuple) else state
        return self.fc(h[-1])


def _samples(n: int = 16, features: int = FEATURES) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(STEPS, features, generator=g) for _ in range(n)]



def _matrices(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.rnn.named_parameters() if n.startswith("weight")}


def _expected_codes(w: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 per output row, range ±127: what PerChannelMinMaxObserver + convert_pt2e store
    (``quantize_per_channel`` multiplies by the reciprocal scale, which rounds a few ties differently
    from dividing: 1 code of Resemblyzer's 262,144 in w_hh_l0)."""
    scale = torch.clamp(w.abs().amax(dim=1) / 127, min=2**-12)
    return torch.clamp(torch.round(w * (1.0 / scale[:, None])), -127, 127).to(torch.int8)


def _int8_tensors(model) -> list[torch.Tensor]:
    return [b for b in model.buffers() if b.dtype == torch.int8 and b.dim() == 2]


@pytest.fixture(scope="module")
def data():
    samples = _samples()
    return samples, ds.data.from_samples(calib=samples, eval=samples)


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU], ids=["lstm", "gru"])
@pytest.mark.parametrize("config", [ds.Int8Static(int8_layout="s8s8-reduced"), ds.Int8Dynamic(int8_layout="s8s8-reduced")],
                         ids=["static", "dynamic"])
def test_every_cell_weight_is_int8_per_row(data, cell, config):
    samples, splits = data
    model = Encoder(cell).eval()
    quantized = ds.quantize(model, config, data=splits)
    codes = {tuple(c.shape): [] for c in _int8_tensors(quantized)}
    for c in _int8_tensors(quantized):
        codes[tuple(c.shape)].append(c)
    for name, w in _matrices(model).items():   # each matrix once, as round(w / scale) exactly
        hits = [c for c in codes.get(tuple(w.shape), []) if torch.equal(c, _expected_codes(w))]
        assert len(hits) == 1, name
    gates = 4 if cell is nn.LSTM else 3
    cell_weights = gates * HIDDEN * (FEATURES + HIDDEN) + gates * HIDDEN * 2 * HIDDEN
    assert sum(c.numel() for c in _int8_tensors(quantized)) == cell_weights + 4 * HIDDEN   # the cell's and fc's
    x = torch.stack(samples)
    with torch.no_grad():
        diff = (quantized(x) - model(x)).abs().max().item()
    assert diff < 0.004, diff   # measured 0.0007 (LSTM) to 0.0017 (GRU static); outputs reach 0.09 / 0.18


def test_fp32_layers_keeps_the_cell_float(data):
    _, splits = data
    model = Encoder().eval()
    quantized = ds.quantize(model, ds.Int8Static(fp32_layers=("rnn",)), data=splits)
    assert [tuple(c.shape) for c in _int8_tensors(quantized)] == [(4, HIDDEN)]   # fc only
    floats = {tuple(p.shape) for p in [*quantized.parameters(), *quantized.buffers()] if p.dtype == torch.float32}
    assert {tuple(w.shape) for w in _matrices(model).values()} <= floats


def _onnx_int8_initializers(path) -> list[np.ndarray]:
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    return [numpy_helper.to_array(i) for i in graph.initializer if i.data_type == onnx.TensorProto.INT8]


def _folded_cell_inputs(path) -> set[str]:
    """Op types that still feed a cell's W/R after ONNX Runtime optimised the session: none, when
    the weights folded to constants."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(path) + ".optimized.onnx"
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    graph = onnx.load(options.optimized_model_filepath).graph
    producers = {out: node.op_type for node in graph.node for out in node.output}
    return {producers[name] for node in graph.node if node.op_type in ("LSTM", "GRU")
            for name in node.input[1:3] if name in producers}


@pytest.mark.parametrize("cell,config", [(nn.LSTM, ds.Int8Static(int8_layout="s8s8-reduced")),
                                         (nn.GRU, ds.Int8Dynamic(int8_layout="s8s8-reduced"))], ids=["lstm-static", "gru-dynamic"])
def test_int8_cell_in_both_files(data, cell, config, tmp_path):
    samples, splits = data
    model = Encoder(cell).eval()
    quantized = ds.quantize(model, config, data=splits)
    example, x = torch.stack(samples[:2]), torch.stack(samples)
    with torch.no_grad():
        reference = model(x)
    float_bytes = 4 * sum(p.numel() for p in model.parameters())
    # .onnx: the cell op, its codes stored once (no float copy), folded to constants when loaded
    fp32 = export(model, tmp_path / "fp32.onnx", example_input=example, parity_samples=samples)
    int8 = export(quantized, tmp_path / "int8.onnx", example_input=example, parity_samples=samples)
    # ONNX Runtime computes the float LSTM/GRU the graph computes: equal up to float rounding (at most one
    # output code apart where the static graph quantizes its output)
    check = int8.parity[0]
    assert int8.parity_passed and (check.max_steps < 1.001 if check.max_steps is not None else check.max_abs_diff < 1e-5)
    stored = _onnx_int8_initializers(tmp_path / "int8.onnx")
    for name, w in _matrices(model).items():
        assert sum(np.array_equal(a, _expected_codes(w).numpy()) for a in stored) == 1, name
    assert int8.file_bytes < 0.34 * fp32.file_bytes, (int8.file_bytes, fp32.file_bytes)   # measured 0.318 / 0.332
    assert _folded_cell_inputs(tmp_path / "int8.onnx") == set()
    # .pte: each layer's projection and step delegated (the step a scan over time), qd8-f32-qc8w linears; the
    # weights stored once
    pte = export(quantized, tmp_path / "int8.pte", example_input=example, parity_samples=samples, static_batch=True)
    assert pte.parity_passed
    blob = (tmp_path / "int8.pte").read_bytes()
    for name, w in _matrices(model).items():
        codes = _expected_codes(w)
        if name == "weight_ih_l0":   # computed in float in the .pte: its dequantized codes, stored once
            scale = torch.clamp(w.abs().amax(dim=1) / 127, min=2**-12)
            assert blob.count((codes.float() * scale[:, None]).numpy().tobytes()) == 1
            assert blob.count(codes.numpy().tobytes()) == 0
        else:                        # one constant, read by the step's linear at every frame
            assert blob.count(codes.numpy().tobytes()) == 1, name
    # of 4 bytes a parameter (the fp32 file holds at least that): measured 0.392 (LSTM) / 0.411 (GRU); the
    # rest of the int8 file is the graph (one step per layer), the scales and biases, the first layer's float
    # input weights
    assert pte.file_bytes < 0.45 * float_bytes, (pte.file_bytes, float_bytes)
    delegation = read_sidecar(tmp_path / "int8.pte")["delegation"]
    assert delegation["delegate_calls"] == 6 and set(delegation["outside_delegate"]) <= {"full", "select_copy.int"}
    from deepshrink.evaluation.runners import open_runner

    # to the fp32 model, in each runtime: measured 0.0007 (LSTM .onnx) to 0.0015 (GRU .onnx); .pte 0.0008 / 0.0014
    for path in (tmp_path / "int8.onnx", tmp_path / "int8.pte"):
        produced = torch.cat([open_runner(path).predict_all(s[None])[0] for s in samples])
        assert (produced - reference).abs().max().item() < 0.004, path.name


def test_the_first_layer_input_projection_is_int8_in_groups_of_8_features(tmp_path, monkeypatch):
    """With 16 input features (a multiple of 8, more than 8), layer 0's input weights stay int8 in the .pte:
    two 8-column groups, the input rounded per row of each group, instead of a float copy of the matrix."""
    samples = [s * torch.logspace(0, 3, 16) for s in _samples(features=16)]   # features spanning three decades
    model = Encoder(nn.LSTM, features=16).eval()
    quantized = ds.quantize(model, ds.Int8Static(int8_layout="s8s8-reduced"), data=ds.data.from_samples(calib=samples, eval=samples))
    pte = export(quantized, tmp_path / "int8.pte", example_input=torch.stack(samples[:2]), parity_samples=samples,
                 static_batch=True)
    assert pte.parity_passed
    blob = (tmp_path / "int8.pte").read_bytes()
    [codes] = [c for c in _int8_tensors(quantized) if tuple(c.shape) == (4 * HIDDEN, 16)]   # as rounded (GPTQ here)
    for g in range(2):   # each group's codes stored once, and not the whole matrix
        assert blob.count(codes[:, 8 * g:8 * (g + 1)].contiguous().numpy().tobytes()) == 1, g
    assert blob.count(codes.numpy().tobytes()) == 0
    import deepshrink.deploy.recurrent as recurrent

    monkeypatch.setattr(recurrent, "INPUT_GROUP", 32)   # 16 features in no group of 32: the float matrix instead
    floated = export(quantized, tmp_path / "float-input.pte", example_input=torch.stack(samples[:2]), static_batch=True)
    # 4 bytes a weight against 1 (12,288 B here), less the second group's linear, add and rounding nodes: measured 9,856 B
    saved = floated.file_bytes - pte.file_bytes
    assert 3 * codes.numel() - 3000 <= saved <= 3 * codes.numel(), saved
    from deepshrink.evaluation.runners import open_runner

    x = torch.stack(samples)
    with torch.no_grad():
        reference = model(x)
    produced = torch.cat([open_runner(tmp_path / "int8.pte").predict_all(s[None])[0] for s in samples])
    err = (produced - reference).abs().max().item()
    assert err < 0.05 * reference.abs().max().item(), (err, reference.abs().max().item())


def test_an_lstm_with_a_projection_stays_float_instead_of_failing():
    """proj_size adds a w_hr per layer, so the parameters are not (w_ih, w_hh, b_ih, b_hh): the
    per-row observers once landed on a bias and calibration failed (IndexError in the observer)."""

    class Projected(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.rnn, self.fc = nn.LSTM(FEATURES, HIDDEN, 2, batch_first=True, proj_size=8), nn.Linear(8, 4)

        def forward(self, x):
            out, _ = self.rnn(x)
            return self.fc(out[:, -1])

    samples = _samples()
    model = Projected().eval()
    quantized = ds.quantize(model, ds.Int8Static(), data=ds.data.from_samples(calib=samples, eval=samples))
    assert [tuple(c.shape) for c in _int8_tensors(quantized)] == [(4, 8)]   # fc only: the cell stays float
    assert ds.quantize_report(quantized)["recurrent_rounding"] == {"applied": False, "cells": 0}
    x = torch.stack(samples)
    with torch.no_grad():
        assert (quantized(x) - model(x)).abs().max().item() < 0.01
