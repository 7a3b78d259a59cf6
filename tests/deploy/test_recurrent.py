"""LSTMs unrolled into ops XNNPACK runs: the same values as nn.LSTM, one delegate in the .pte."""
import pytest
import torch
from torch import nn

from deepshrink.core.errors import ExportError
from deepshrink.deploy import export
from deepshrink.deploy.recurrent import UnrolledLSTM, unroll_lstms
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
def test_unrolled_lstm_equals_nn_lstm(kwargs):
    torch.manual_seed(1)
    lstm = nn.LSTM(5, 7, 3, **kwargs).eval()
    x = torch.randn(4, 9, 5) if kwargs.get("batch_first") else torch.randn(9, 4, 5)
    directions = 2 if kwargs.get("bidirectional") else 1
    hx = (torch.randn(3 * directions, 4, 7), torch.randn(3 * directions, 4, 7))
    for args in ((x,), (x, hx), (x[0] if kwargs.get("batch_first") else x[:, 0],)):   # zero state, given state, unbatched
        want_out, (want_h, want_c) = lstm(*args)
        out, (h, c) = UnrolledLSTM(lstm)(*args)
        for got, want in ((out, want_out), (h, want_h), (c, want_c)):
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_unroll_leaves_the_original_model_alone_and_unrolls_captured_graphs():
    model, x = Encoder().eval(), torch.randn(2, 8, 5)
    unrolled = unroll_lstms(model)
    assert type(model.body.lstm) is nn.LSTM and type(unrolled.body.lstm) is UnrolledLSTM
    assert unrolled.body.lstm.lstm.weight_ih_l0 is model.body.lstm.weight_ih_l0            # weights shared, not copied
    torch.testing.assert_close(unrolled(x), model(x), atol=1e-6, rtol=1e-5)
    graph = torch.export.export(model, (x,)).module()
    assert any(n.target is torch.ops.aten.lstm.input for n in graph.graph.nodes)
    unrolled_graph = unroll_lstms(graph)
    assert not any(n.target is torch.ops.aten.lstm.input for n in unrolled_graph.graph.nodes)
    assert any(n.target is torch.ops.aten.lstm.input for n in graph.graph.nodes)          # the original graph kept
    torch.testing.assert_close(unrolled_graph(x), model(x), atol=1e-6, rtol=1e-5)
    plain = nn.Linear(3, 3)
    assert unroll_lstms(plain) is plain


def test_lstm_pte_is_one_delegate_with_a_static_batch(tmp_path):
    model = Encoder().eval()
    samples = [torch.randn(8, 5) for _ in range(5)]
    result = export(model, tmp_path / "enc.pte", example_input=torch.stack(samples[:2]), parity_samples=samples,
                    static_batch=True)
    assert result.parity_passed and result.parity_max_abs_diff < 1e-5
    delegation = read_sidecar(tmp_path / "enc.pte")["delegation"]
    # all of the recurrence is inside XNNPACK: one delegate up to the model's own h[-1] (a select,
    # which XNNPACK lacks), one for fc; only that select and the zero state run outside
    assert delegation["delegate_calls"] == 2
    assert set(delegation["outside_delegate"]) <= {"full", "select_copy.int"}


def test_a_dynamic_time_dimension_is_refused_with_the_fix():
    from deepshrink.core.graph import capture

    with pytest.raises(ExportError, match="time dimension cannot be dynamic in a .pte.*export .onnx"):
        capture(unroll_lstms(Encoder().eval()), torch.randn(2, 6, 5), max_batch=4, dynamic={0: {1: (2, 16)}})
