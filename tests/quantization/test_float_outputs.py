"""``Int8Static(float_outputs=True)``: the layers that compute the model's outputs keep int8 weights,
quantize their input at run time and give float results, so near-equal scores do not tie."""
import pytest
import torch
from torch import nn

import deepshrink as ds
from deepshrink.deploy import export
from deepshrink.quantization.graph_passes import float_graph
from deepshrink.quantization.quantizer import output_layers

pytestmark = pytest.mark.usefixtures("one_thread")


def _near_tie_head() -> nn.Module:
    """A scorer whose neighbouring outputs differ by about 0.1 % of their range: pitch bins, say."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 40), nn.Sigmoid()).eval()
    with torch.no_grad():
        head = model[2]
        head.weight[1::2] = head.weight[0::2] + 2e-3 * torch.randn(20, 64)
        head.bias[1::2] = head.bias[0::2]
    return model


def _data(n: int = 64):
    g = torch.Generator().manual_seed(1)
    samples = [torch.randn(32, generator=g) for _ in range(n)]
    return ds.data.from_samples(calib=samples, eval=samples), torch.stack(samples)


class TwoHeads(nn.Module):
    """A detector's shape: a shared trunk, a box head and a score head, plus a residual output."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk, self.boxes, self.scores = nn.Linear(8, 16), nn.Linear(16, 4), nn.Linear(16, 3)

    def forward(self, x):
        h = torch.relu(self.trunk(x))
        return self.boxes(h).reshape(-1, 2, 2), torch.softmax(self.scores(h), -1), h + x.sum(-1, keepdim=True)


def test_output_layers_are_the_last_conv_or_linear_on_each_path_through_single_input_ops():
    graph, _ = float_graph(TwoHeads().eval(), torch.randn(4, 8), max_batch=None, dynamic=False)
    names = {n.name: n.meta["nn_module_stack"] for n in graph.graph.nodes if n.name in output_layers(graph)}
    # the residual output joins two tensors: the trunk behind it is not an output layer
    assert sorted(next(reversed(stack.values()))[0] for stack in names.values()) == ["boxes", "scores"]


def test_float_outputs_remove_the_ties_static_int8_makes_and_keep_the_file_as_small(tmp_path):
    model, (data, x) = _near_tie_head(), _data()
    with torch.no_grad():
        ref = model(x)
    results = {}
    for float_outputs in (False, True):
        q = ds.quantize(model, ds.Int8Static(float_outputs=float_outputs, int8_layout="s8s8-guarded"), data=data)
        with torch.no_grad():
            out = q(x)
        top2 = out.topk(2, -1).values
        files = {s: export(q, tmp_path / f"{float_outputs}{s}", example_input=x[:4]) for s in (".pte", ".onnx")}
        assert all(f.parity_passed for f in files.values())
        results[float_outputs] = {"ties": int((top2[:, 0] == top2[:, 1]).sum()),
                                  "agree": float((out.argmax(-1) == ref.argmax(-1)).float().mean()),
                                  "err": float((out - ref).abs().max()), "bytes": {s: f.file_bytes for s, f in files.items()}}
    static, floating = results[False], results[True]
    assert static["ties"] >= 5 and floating["ties"] == 0
    assert floating["agree"] > static["agree"]
    assert floating["err"] < static["err"]
    assert floating["bytes"][".pte"] <= static["bytes"][".pte"]
    assert floating["bytes"][".onnx"] <= static["bytes"][".onnx"] + 2048   # the run-time quantization ops


def test_the_last_linear_reads_a_run_time_quantized_input_and_nothing_quantizes_its_output():
    model, (data, _) = _near_tie_head(), _data(16)
    q = ds.quantize(model, ds.Int8Static(float_outputs=True), data=data)
    linears = [n for n in q.graph.nodes if n.target == torch.ops.aten.linear.default]
    first, last = linears
    quantize = last.args[0].args[0]                      # linear <- dequantize <- quantize(x, scale, zero point)
    assert str(quantize.target) == "quantized_decomposed.quantize_per_tensor.tensor"
    assert str(quantize.args[1].args[0].target) == "quantized_decomposed.choose_qparams.tensor"   # computed at run time
    assert [str(u.target) for u in last.users] == ["aten.sigmoid.default"]
    relu = next(iter(first.users))                       # the hidden layer stays static: a constant scale
    assert [str(u.target) for u in relu.users] == ["quantized_decomposed.quantize_per_tensor.default"]
