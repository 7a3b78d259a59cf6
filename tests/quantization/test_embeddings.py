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
