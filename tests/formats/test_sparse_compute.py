import copy

import torch

from deepshrink.formats.sparse_compute import CsrLinear, choose_sparse_compute, densify
from deepshrink.models import create


def sparse_mlp(sparsity: float) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create("lenet-300-100")
    with torch.no_grad():
        for layer in [*model.hidden, model.classifier]:
            layer.weight[torch.rand_like(layer.weight) < sparsity] = 0
    return model.eval()


def test_csr_linear_matches_dense():
    model = sparse_mlp(0.9)
    layer = model.hidden[0]
    x = torch.randn(5, 784)
    assert torch.allclose(CsrLinear(layer.weight, layer.bias)(x), layer(x), atol=1e-5)
    back = CsrLinear(layer.weight, layer.bias).to_dense_linear()
    assert torch.equal(back.weight, layer.weight) and torch.equal(back.bias, layer.bias)


def test_decisions_cover_every_linear_and_outputs_do_not_change():
    model = sparse_mlp(0.97)
    reference = copy.deepcopy(model)
    x = torch.randn(4, 1, 28, 28)
    decisions = choose_sparse_compute(model, x, runs=30)
    assert [d.layer for d in decisions] == ["hidden.0", "hidden.1", "classifier"]
    assert all(abs(d.sparsity - 0.97) < 0.02 for d in decisions)
    swapped = {n for n, m in model.named_modules() if isinstance(m, CsrLinear)}
    assert swapped == {d.layer for d in decisions if d.runs_sparse}
    assert torch.allclose(model(x), reference(x), atol=1e-5)
    densify(model)
    assert not any(isinstance(m, CsrLinear) for m in model.modules())
    assert torch.allclose(model(x), reference(x), atol=1e-5)


def test_dense_layers_are_not_candidates():
    model = sparse_mlp(0.0)
    decisions = choose_sparse_compute(model, torch.randn(1, 1, 28, 28), runs=10)
    assert not any(d.runs_sparse for d in decisions)
    # below min_sparsity a layer is not even timed: dense by rule, whatever one timing might say
    assert all(d.dense_us != d.dense_us and d.sparse_us != d.sparse_us for d in decisions)   # NaN
    assert not any(isinstance(m, CsrLinear) for m in model.modules())


def test_dsk_export_records_decisions_and_runner_applies_them(tmp_path, digits):
    from deepshrink.deploy import export
    from deepshrink.evaluation import evaluate
    from deepshrink.evaluation.runners import open_runner
    from deepshrink.formats.sidecar import read_sidecar

    model = sparse_mlp(0.97)
    result = export(model, tmp_path / "m.dsk", example_input=digits.example_input(8))
    assert result.parity_max_abs_diff < 1e-5
    decisions = read_sidecar(tmp_path / "m.dsk")["sparse_compute"]
    assert [d["layer"] for d in decisions] == ["hidden.0", "hidden.1", "classifier"]
    runner = open_runner(tmp_path / "m.dsk")
    sparse_layers = {n for n, m in runner.model.named_modules() if isinstance(m, CsrLinear)}
    assert sparse_layers == {d["layer"] for d in decisions if d["runs_sparse"]}
    metrics = evaluate(tmp_path / "m.dsk", digits.test, latency_runs=3, warmup=1)
    assert metrics.file_bytes == (tmp_path / "m.dsk").stat().st_size
    assert metrics.nonzero_params < 0.05 * 266_610 + 410  # weights 97 % zero; biases dense
