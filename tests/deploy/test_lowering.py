"""What the lowered files carry: weights and graph, no debug records, no leftover float copies."""
import onnx
import torch
from torch import nn

import deepshrink as ds
from deepshrink.deploy import export


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10)).eval()


def test_onnx_files_carry_no_exporter_debug_records(tmp_path):
    model, x = _mlp(), torch.randn(4, 256)
    export(model, tmp_path / "m.onnx", example_input=x)
    proto = onnx.load(tmp_path / "m.onnx")
    assert proto.graph.node
    assert all(not n.metadata_props and not n.doc_string for n in proto.graph.node)
    assert not [p.key for p in proto.graph.metadata_props if p.key.startswith("pkg.torch.")]   # no program signature copy
    assert __file__ not in (tmp_path / "m.onnx").read_bytes().decode("latin-1")   # no source paths of this machine


def test_int8_files_are_a_quarter_of_fp32_and_the_graph_keeps_no_float_copies(tmp_path):
    model = _mlp()
    samples = [torch.randn(256) for _ in range(32)]
    data = ds.data.from_samples(calib=samples, eval=samples)
    dense_weights = sum(m.weight.numel() for m in model if isinstance(m, nn.Linear))
    fp32 = {suffix: export(model, tmp_path / f"fp32{suffix}", example_input=torch.stack(samples[:4])).file_bytes
            for suffix in (".onnx", ".pte")}
    for config in (ds.Int8Static(int8_layout="s8s8-reduced"), ds.Int8Dynamic(int8_layout="s8s8-reduced")):
        quantized = ds.quantize(model, config, data=data)
        # the int8 weights as buffers, the biases float; the float originals gone
        assert sum(b.numel() for b in quantized.buffers() if b.dtype == torch.int8) == dense_weights
        assert sum(p.numel() for p in quantized.parameters()) == sum(m.bias.numel() for m in model if isinstance(m, nn.Linear))
        for suffix in (".onnx", ".pte"):
            int8 = export(quantized, tmp_path / f"int8{suffix}", example_input=torch.stack(samples[:4]))
            assert int8.parity_passed
            # 1 byte per weight (+ scales, biases, graph) against 4: at most 0.27x
            assert int8.file_bytes <= 0.27 * fp32[suffix], (type(config).__name__, suffix, int8.file_bytes, fp32[suffix])


def test_onnx_names_are_short_and_the_outputs_exactly_those_of_the_exporters_names(tmp_path, monkeypatch):
    import numpy as np
    import onnxruntime as ort

    from deepshrink.deploy import lowering

    model = _mlp()
    samples = [torch.randn(256) for _ in range(32)]
    quantized = ds.quantize(model, ds.Int8Static(), data=ds.data.from_samples(calib=samples, eval=samples), target="onnxruntime")
    x = torch.stack(samples[:4])
    compact = export(quantized, tmp_path / "compact.onnx", example_input=x)
    monkeypatch.setattr(lowering, "compact_names", lambda model: None)
    named = export(quantized, tmp_path / "named.onnx", example_input=x)
    proto, reference = onnx.load(tmp_path / "compact.onnx"), onnx.load(tmp_path / "named.onnx")
    # the public signature keeps its names; every node and inner value a short identifier
    assert [i.name for i in proto.graph.input] == [i.name for i in reference.graph.input]
    assert [o.name for o in proto.graph.output] == [o.name for o in reference.graph.output]
    names = [n.name for n in proto.graph.node]
    assert len(set(names)) == len(names) and all(len(n) <= 3 for n in names)   # unique: tools key nodes by name
    public = {v.name for v in (*proto.graph.input, *proto.graph.output)}
    weights = {t.name for t in proto.graph.initializer}
    assert weights == {t.name for t in reference.graph.initializer}   # the exporter's (see compact_names)
    inner = {n for node in proto.graph.node for n in (*node.input, *node.output) if n and n not in public | weights}
    assert inner and all(len(n) <= 3 and n[0].isalpha() for n in inner)
    assert len(proto.graph.value_info) == len(reference.graph.value_info)   # ONNX Runtime fuses on those shapes
    assert compact.file_bytes < named.file_bytes
    sessions = [ort.InferenceSession(str(tmp_path / f), providers=["CPUExecutionProvider"]) for f in ("compact.onnx", "named.onnx")]
    feed = {sessions[0].get_inputs()[0].name: x.numpy()}
    a, b = (s.run(None, feed)[0] for s in sessions)
    assert np.array_equal(a, b)


class _Encoder(nn.Module):
    """Token ids -> hidden states: embeddings, one attention block, LayerNorm (a BERT in miniature)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.pos = nn.Embedding(100, 32), nn.Embedding(16, 32)
        self.layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0)
        self.norm = nn.LayerNorm(32)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.norm(self.layer(self.emb(ids) + self.pos(torch.arange(ids.shape[1]).unsqueeze(0))))


def test_onnx_runtimes_own_quantizer_rewrites_our_fp32_file_into_one_it_loads(tmp_path):
    """Users hand our fp32 .onnx to other tools: ONNX Runtime's quantize_static rewrites one of a
    transformer into a file it loads and runs. (The two ways it failed on the tiny BERT example,
    nameless nodes and renamed initializers, do not show on this small encoder: bench/examples.py's
    ONNX Runtime row is where they would; compact_names.)"""
    import numpy as np
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    torch.manual_seed(0)
    model, ids = _Encoder().eval(), torch.randint(0, 100, (8, 12))
    export(model, tmp_path / "fp32.onnx", example_input=ids)
    name = ort.InferenceSession(str(tmp_path / "fp32.onnx"), providers=["CPUExecutionProvider"]).get_inputs()[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{name: ids[i:i + 1].numpy()} for i in range(8)])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(tmp_path / "fp32.onnx"), str(tmp_path / "ort.onnx"), Reader())
    session = ort.InferenceSession(str(tmp_path / "ort.onnx"), providers=["CPUExecutionProvider"])
    assert sum(n.op_type == "QuantizeLinear" for n in onnx.load(tmp_path / "ort.onnx").graph.node) >= 4
    out = session.run(None, {name: ids[:1].numpy()})[0]
    with torch.no_grad():
        reference = model(ids[:1]).numpy()
    assert out.shape == reference.shape
    # int8 of a LayerNorm'd output: close to fp32, far from garbage
    assert np.abs(out - reference).mean() < 0.25 * np.abs(reference).mean()
