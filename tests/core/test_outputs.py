"""Outputs of any structure: tensor, tuple, dict, dataclass (a transformers ModelOutput is a dict)."""
from collections import OrderedDict
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from deepshrink.core.errors import ConfigError
from deepshrink.core.outputs import SelectOutputs, output_tensors, primary


@dataclass
class Detection:
    boxes: torch.Tensor
    scores: torch.Tensor
    extra: torch.Tensor | None = None


def test_every_tensor_in_order():
    a, b, c = torch.zeros(1), torch.ones(2), torch.full((3,), 2.0)
    assert [t.shape[0] for t in output_tensors((a, [b, {"c": c}]))] == [1, 2, 3]
    assert [t.shape[0] for t in output_tensors(Detection(b, c))] == [2, 3]          # None fields skipped
    assert primary(OrderedDict(last_hidden_state=c, pooler_output=a)) is c
    with pytest.raises(ConfigError, match="str holds no tensors"):
        output_tensors("logits")


class Encoder(nn.Module):
    def forward(self, x):
        return OrderedDict(last_hidden_state=x * 2, pooler_output=x.mean(-1))


def test_select_outputs_by_name_index_or_function():
    x = torch.ones(2, 3)
    assert SelectOutputs(Encoder(), ["pooler_output"])(x).shape == (2,)
    both = SelectOutputs(Encoder(), [1, "last_hidden_state"])(x)
    assert [t.shape for t in both] == [(2,), (2, 3)]
    assert SelectOutputs(Encoder(), lambda out: out["last_hidden_state"] + 1)(x).sum() == 18
    with pytest.raises(ConfigError, match="has no tensor 'logits'; it has last_hidden_state, pooler_output"):
        SelectOutputs(Encoder(), ["logits"])(x)
