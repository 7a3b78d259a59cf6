"""The README's own-model snippet, on the token-id fixture: from_samples -> quantize -> export -> evaluate."""
import types
from pathlib import Path

import pytest
import torch

import deepshrink as ds

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "token_model.py"


def fixture_module():
    from deepshrink.core.errors import DataError
    from deepshrink.core.userfile import load_object

    names = ("pretrained", "calib", "evaluation", "labelled_eval")
    return types.SimpleNamespace(**{n: load_object(f"{FIXTURE}:{n}", what="test", error=DataError) for n in names})


def test_raw_token_ids_end_to_end_in_onnx_runtime(tmp_path):
    tm = fixture_module()
    model = tm.pretrained()
    data = ds.data.from_samples(calib=tm.calib, eval=tm.evaluation)
    assert not data.labelled and not data.fixed_shape and data.dynamic == {0: {1: (2, 32)}, 1: {1: (2, 32)}}
    q = ds.quantize(model, ds.Int8Static(), data=data, target="onnxruntime")
    assert q._deepshrink_quant["int8_layout"] == "u8s8-guarded" and q._deepshrink_quant["dynamic"]["0"] == {"1": [2, 32]}
    result = ds.export(q, tmp_path / "model.onnx", example_input=data.example_input(2), target="onnxruntime",
                       parity_samples=data.inputs("test", 40))
    assert result.parity_passed
    lengths = {shape[0][1] for shape in __import__("json").loads((tmp_path / "model.onnx.json").read_text())["parity_batches"]}
    assert len(lengths) >= 10                      # parity ran on many different lengths
    m = ds.evaluate(tmp_path / "model.onnx", data.test, reference=model, latency_runs=2, warmup=1)
    assert m.accuracy is None and m.fidelity["kind"] == "classification" and m.fidelity["top1_agreement"] >= 0.9
    assert m.fidelity["samples"] == 40


def test_batch_dim_samples_and_labels():
    tm = fixture_module()
    batched = [{k: v[None] for k, v in s.items()} for s in tm.calib()]
    samples, labels = tm.labelled_eval()
    data = ds.data.from_samples(calib=batched, eval=[{k: v[None] for k, v in s.items()} for s in samples], batch_dim=True,
                                labels={"calib": [0] * len(batched), "eval": labels})
    assert data.labelled and data.num_classes == 1 + max(labels + [0])
    m = ds.evaluate(tm.pretrained(), data.test, reference=tm.pretrained(), latency_runs=0)
    assert m.accuracy == 1.0 and m.fidelity["top1_agreement"] == 1.0     # labels are the model's own answers
    from deepshrink.core.errors import DataError

    with pytest.raises(DataError, match=r"data.calib\[0\]: batch_dim=True needs a leading dimension of 1, got shape \(7,\)"):
        ds.data.from_samples(calib=[{"input_ids": torch.zeros(7, dtype=torch.int64)}], eval=batched, batch_dim=True)
