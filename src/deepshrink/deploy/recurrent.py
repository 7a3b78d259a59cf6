"""LSTMs written out step by step in ops XNNPACK runs, so a recurrent model lowers to one delegate.

ExecuTorch 1.5.1 has no LSTM kernel: ``to_edge`` decomposes ``aten.lstm`` per time step into
``squeeze``/``unsqueeze``/``split_with_sizes``/``select`` copies that XNNPACK does not take, so a
3-layer LSTM over 160 frames becomes hundreds of small delegates (about 4 s of lowering per frame
and a slow file). ``unroll_lstms`` replaces every LSTM — ``nn.LSTM`` modules of an eager model,
``aten.lstm.input`` nodes of a captured (e.g. quantized) graph — with the same recurrence written
in ``linear``, ``slice``, ``view``, ``sigmoid``, ``tanh``, ``mul``, ``add`` and ``cat``, all of which
XNNPACK delegates. The values are those of ``aten.lstm`` up to float rounding (the parity gate
checks the file). The time dimension must be static: an unrolled loop has one length.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from deepshrink.core.errors import ExportError


def lstm_unrolled(x, hx, params, has_biases: bool, num_layers: int, dropout: float, train: bool,
                  bidirectional: bool, batch_first: bool):
    """``aten.lstm.input`` (same arguments, same ``(output, h_n, c_n)``) as straight-line ops.
    ``params`` per layer and direction: ``w_ih [4H, in], w_hh [4H, H]`` and, with biases,
    ``b_ih, b_hh [4H]``; projections (``proj_size``) are not supported."""
    per = 4 if has_biases else 2
    directions = 2 if bidirectional else 1
    if len(params) != per * num_layers * directions:
        raise ExportError("LSTM with proj_size cannot be unrolled for the .pte; export .onnx, or use proj_size=0")
    h0, c0 = hx
    hidden = h0.shape[-1]
    steps = x.shape[1] if batch_first else x.shape[0]
    if not isinstance(steps, int):
        raise ExportError("an LSTM's time dimension cannot be dynamic in a .pte (the recurrence is unrolled): "
                          "export with a fixed sequence length, or export .onnx, whose LSTM op takes any length")
    seq = x if batch_first else x.transpose(0, 1)                          # [B, T, in]
    h_n, c_n = [], []
    for layer in range(num_layers):
        outputs = []
        for direction in range(directions):
            k = layer * directions + direction
            w_ih, w_hh, *biases = params[k * per:(k + 1) * per]
            projected = F.linear(seq, w_ih, biases[0] if has_biases else None)   # every step's input gates at once
            if has_biases:   # added, not folded: XNNPACK's linear needs its bias a constant, not b_ih + b_hh
                projected = projected + biases[1]
            h, c = h0[k:k + 1].reshape(-1, hidden), c0[k:k + 1].reshape(-1, hidden)   # slices: XNNPACK has no select
            order = range(steps - 1, -1, -1) if direction else range(steps)
            hs: list = [None] * steps
            for t in order:
                gates = projected[:, t:t + 1, :].reshape(-1, 4 * hidden) + F.linear(h, w_hh)
                i = torch.sigmoid(gates[:, :hidden])
                f = torch.sigmoid(gates[:, hidden:2 * hidden])
                g = torch.tanh(gates[:, 2 * hidden:3 * hidden])
                o = torch.sigmoid(gates[:, 3 * hidden:])
                c = f * c + i * g
                h = o * torch.tanh(c)
                hs[t] = h.reshape(-1, 1, hidden)
            outputs.append(torch.cat(hs, dim=1))
            h_n.append(h.reshape(1, -1, hidden))
            c_n.append(c.reshape(1, -1, hidden))
        seq = outputs[0] if directions == 1 else torch.cat(outputs, dim=2)
        if train and dropout and layer < num_layers - 1:
            seq = F.dropout(seq, dropout, training=True)
    out = seq if batch_first else seq.transpose(0, 1)
    return out, torch.cat(h_n, dim=0), torch.cat(c_n, dim=0)


class UnrolledLSTM(nn.Module):
    """An ``nn.LSTM``'s parameters (shared, not copied) with the unrolled forward."""

    def __init__(self, lstm: nn.LSTM) -> None:
        super().__init__()
        if lstm.proj_size:
            raise ExportError("LSTM with proj_size cannot be unrolled for the .pte; export .onnx, or use proj_size=0")
        self.lstm = lstm

    def forward(self, x, hx=None):
        lstm = self.lstm
        unbatched = x.dim() == 2
        if unbatched:
            x = x.unsqueeze(0 if lstm.batch_first else 1)
        batch = x.shape[0] if lstm.batch_first else x.shape[1]
        if hx is None:
            zeros = x.new_zeros(lstm.num_layers * (2 if lstm.bidirectional else 1), batch, lstm.hidden_size)
            hx = (zeros, zeros)
        elif unbatched:
            hx = tuple(h.unsqueeze(1) for h in hx)
        out, h, c = lstm_unrolled(x, hx, lstm._flat_weights, lstm.bias, lstm.num_layers, lstm.dropout,
                                  self.training, lstm.bidirectional, lstm.batch_first)
        if unbatched:
            out, h, c = out.squeeze(0 if lstm.batch_first else 1), h.squeeze(1), c.squeeze(1)
        return out, (h, c)


def unroll_lstms(model: nn.Module) -> nn.Module:
    """``model`` with every LSTM unrolled (a shallow copy; ``model`` itself is unchanged), or
    ``model`` when it has none."""
    if isinstance(model, torch.fx.GraphModule):
        nodes = [n for n in model.graph.nodes if n.op == "call_function" and n.target is torch.ops.aten.lstm.input]
        if not nodes:
            return model
        graph = torch.fx.Graph()
        graph._codegen = model.graph._codegen                 # an exported module's pytree in/out specs
        graph.output(graph.graph_copy(model.graph, {}))
        for node in graph.nodes:
            if node.op == "call_function" and node.target is torch.ops.aten.lstm.input:
                node.target = lstm_unrolled
        return torch.fx.GraphModule(model, graph)             # shares the weights, owns the new graph
    names = [name for name, m in model.named_modules() if type(m) is nn.LSTM]
    if not names:
        return model
    swapped = copy.copy(model)
    _replace(swapped, names)
    return swapped


def _replace(root: nn.Module, names: list[str]) -> None:
    """Swap the LSTMs at ``names`` for unrolled ones, copying (shallowly) each module on the path so
    the original tree is left as it was."""
    root._modules = dict(root._modules)
    for name in names:
        parent, path = [root], name.split(".")
        for part in path[:-1]:
            child = copy.copy(parent[-1]._modules[part])
            child._modules = dict(child._modules)
            parent[-1]._modules[part] = child
            parent.append(child)
        parent[-1]._modules[path[-1]] = UnrolledLSTM(parent[-1]._modules[path[-1]])
