"""Embedding tables quantized int8 per row, in both runtimes: the bytes of a transformer's vocabulary."""
import pytest
import torch
from torch import nn

import deepshrink as ds
from deepshrink.deploy import export
from deepshrink.formats.sidecar import read_sidecar


class Bag(nn.Module):
    """A token model in small: a 1,000 x 64 table (256 KB of its 258 KB) and a head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.fc = nn.Embedding(1000, 64), nn.Linear(64, 8)

    def forward(self, ids):
        return self.fc(self.emb(ids).mean(1))


@pytest.fixture(scope="module")
def setup():
    samples = [torch.randint(0, 1000, (12,), generator=torch.Generator().manual_seed(i)) for i in range(16)]
    return Bag().eval(), samples, ds.data.from_samples(calib=samples, eval=samples)


def _int8_rows(model) -> int:
    return sum(b.numel() for b in model.buffers() if b.dtype == torch.int8)


@pytest.mark.parametrize("config", [ds.Int8Static(int8_layout="s8s8-reduced"), ds.Int8Dynamic(int8_layout="s8s8-reduced")],
                         ids=["static", "dynamic"])
def test_embedding_table_is_int8_in_both_files(setup, config, tmp_path):
    model, samples, data = setup
    quantized = ds.quantize(model, config, data=data)
    assert _int8_rows(quantized) == 1000 * 64 + 8 * 64                      # the table and the head
    # one symmetric scale per row: the lookup error is at most half a step of that row
    table = model.emb.weight.detach()
    step = table.abs().amax(dim=1) / 127
    ids = samples[0].unsqueeze(0)
    rows = quantized(ids)
    assert torch.allclose(rows, model(ids), atol=float(step.max()) * 64)
    example = torch.stack(samples[:4])
    for suffix in (".pte", ".onnx"):
        fp32 = export(model, tmp_path / f"fp32{suffix}", example_input=example)
        int8 = export(quantized, tmp_path / f"int8{suffix}", example_input=example, parity_samples=samples)
        assert int8.parity_passed
        if isinstance(config, ds.Int8Static):   # static grids: the runtime equals the simulation
            assert int8.parity_max_abs_diff < 1e-5
        assert int8.file_bytes <= 0.285 * fp32.file_bytes, (suffix, int8.file_bytes, fp32.file_bytes)
    outside = read_sidecar(tmp_path / "int8.pte")["delegation"]["outside_delegate"]
    assert outside.get("quantized_decomposed.embedding_byte") == 1 and "embedding" not in outside


def test_embeddings_false_and_fp32_layers_keep_the_table_float(setup):
    model, _, data = setup
    for config in (ds.Int8Static(embeddings=False), ds.Int8Static(fp32_layers=("emb",))):
        quantized = ds.quantize(model, config, data=data)
        assert _int8_rows(quantized) == 8 * 64
        assert any(p.shape == (1000, 64) and p.dtype == torch.float32 for p in [*quantized.parameters(), *quantized.buffers()])


class Positions(nn.Module):
    """Token and position tables, the position one looked up by a constant buffer (BERT's
    ``position_ids``), then a per-token head: 2,064 of its 2,128 rows are tables."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.pos, self.fc = nn.Embedding(1000, 64), nn.Embedding(32, 64), nn.Linear(64, 8)
        self.register_buffer("position_ids", torch.arange(32)[None], persistent=False)

    def forward(self, ids):
        return self.fc(self.emb(ids) + self.pos(self.position_ids[:, : ids.shape[1]]))


TABLE_WEIGHTS = (1000 + 32) * 64


@pytest.fixture(scope="module")
def positions(tmp_path_factory):
    """The float model, its samples and, per embedding width, the quantized model and its two files."""
    samples = [torch.randint(0, 1000, (12,), generator=torch.Generator().manual_seed(i)) for i in range(16)]
    model, data = Positions().eval(), ds.data.from_samples(calib=samples, eval=samples)
    example, out = torch.stack(samples[:4]), tmp_path_factory.mktemp("positions")
    files = {"fp32": {s: export(model, out / f"fp32{s}", example_input=example) for s in (".pte", ".onnx")}}
    quantized = {}
    for bits in (8, 4):
        quantized[bits] = ds.quantize(model, ds.Int8Static(int8_layout="s8s8-reduced", embeddings=bits), data=data)
        files[bits] = {s: export(quantized[bits], out / f"int{bits}{s}", example_input=example, parity_samples=samples)
                       for s in (".pte", ".onnx")}
    return model, samples, quantized, files, out


def _sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    return float(10 * torch.log10(reference.pow(2).sum() / (reference - approx).pow(2).sum()))


def test_a_table_looked_up_by_a_constant_buffer_is_int8_too(positions):
    _, _, quantized, files, out = positions
    assert _int8_rows(quantized[8]) == TABLE_WEIGHTS + 8 * 64          # both tables and the head
    for suffix in (".pte", ".onnx"):
        int8, fp32 = files[8][suffix], files["fp32"][suffix]
        assert int8.parity_passed, suffix
        assert int8.file_bytes <= 0.3 * fp32.file_bytes, (suffix, int8.file_bytes, fp32.file_bytes)
    outside = read_sidecar(out / "int8.pte")["delegation"]["outside_delegate"]
    assert outside.get("quantized_decomposed.embedding_byte") == 2 and "embedding" not in outside


def test_4bit_tables_halve_the_table_bytes_in_both_files(positions):
    import onnx

    model, samples, quantized, files, out = positions
    # codes within [-7, 7], one symmetric scale per row: each row's largest weight maps to ±7
    tables = [b for b in quantized[4].buffers() if b.dtype == torch.int8 and b.shape in ((1000, 64), (32, 64))]
    assert len(tables) == 2
    for codes in tables:
        assert codes.abs().amax() == 7 and (codes.abs().amax(dim=1) == 7).all()
    ids = torch.stack(samples)
    simulated = quantized[4](ids)
    for suffix in (".pte", ".onnx"):
        int4, int8 = files[4][suffix], files[8][suffix]
        assert int4.parity_passed and int4.parity_max_abs_diff < 1e-5, suffix   # the packing is exact
        # two codes a byte: the file loses at least 95 % of half the table bytes
        assert int8.file_bytes - int4.file_bytes >= 0.95 * TABLE_WEIGHTS / 2, (suffix, int4.file_bytes, int8.file_bytes)
        assert int4.file_bytes <= 0.17 * files["fp32"][suffix].file_bytes
    outside = read_sidecar(out / "int4.pte")["delegation"]["outside_delegate"]
    assert outside.get("quantized_decomposed.embedding_4bit") == 2 and "quantized_decomposed.embedding_byte" not in outside
    initializers = onnx.load(str(out / "int4.onnx")).graph.initializer
    # the .onnx stores them as deploy.onnx_storage's 4-bit codes, unpacked when ONNX Runtime loads the file
    stored = read_sidecar(out / "int4.onnx")["stored_weights"]
    assert sorted((w["shape"], w["encoding"]) for w in stored) == [([32, 64], "4-bit"), ([1000, 64], "4-bit")]
    assert sorted(t.dims[0] for t in initializers if t.data_type == onnx.TensorProto.UINT8 and t.name.endswith(":codes")) == [1024, 32_000]
    assert not [t.name for t in initializers if t.data_type == onnx.TensorProto.INT8 and tuple(t.dims) in ((32, 64), (1000, 64))]
    # fidelity against the float model (int8 activations included): 35 dB with int8 tables, 19 with 4-bit
    with torch.no_grad():
        reference = model(ids)
        int4_db, int8_db = _sqnr_db(reference, simulated), _sqnr_db(reference, quantized[8](ids))
    assert int4_db > 18 and int8_db > int4_db + 10, (int4_db, int8_db)


def test_embedding_bits_round_trip_and_are_checked():
    from deepshrink.core.config import from_dict, to_dict
    from deepshrink.core.errors import ConfigError

    for value in (True, False, 4, 8):
        config = from_dict(ds.Int8Static, {"embeddings": value})
        assert config.embeddings == value and from_dict(ds.Int8Static, to_dict(config)) == config
    for bad in (2, 16, "4"):
        with pytest.raises(ConfigError, match="embeddings"):
            ds.Int8Dynamic(embeddings=bad)


def test_a_pte_with_an_int8_table_runs_in_a_process_that_did_not_export_it(setup, tmp_path):
    """ExecuTorch finds ``embedding_byte``'s kernel only once its quantized kernel library is
    imported; the exporting process has imported it, a fresh ``deepshrink evaluate`` had not, nor
    the worker that first loads a file apart (``isolate``)."""
    import subprocess
    import sys

    model, samples, data = setup
    quantized = ds.quantize(model, ds.Int8Static(int8_layout="s8s8-reduced"), data=data)
    example = torch.stack(samples[:4])
    export(quantized, tmp_path / "int8.pte", example_input=example)
    torch.save(example, tmp_path / "ids.pt")
    with torch.no_grad():
        expected = quantized(example)
    code = ("import sys, torch; from deepshrink.evaluation.runners import PteRunner; "
            "out = PteRunner(sys.argv[1], isolate=True).predict(torch.load(sys.argv[2])); torch.save(out, sys.argv[3])")
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path / "int8.pte"), str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert torch.allclose(torch.load(tmp_path / "out.pt"), expected, atol=1e-5)
