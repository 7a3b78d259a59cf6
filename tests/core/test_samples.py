"""Inputs of any structure: tensors, tuples and dicts of any dtype, shapes varying between samples."""
import pytest
import torch
from torch import nn

from deepshrink.core import samples as S
from deepshrink.core.errors import DataError


class TwoInputs(nn.Module):
    def forward(self, input_ids, attention_mask=None):
        return input_ids.float() * (1 if attention_mask is None else attention_mask)


def test_take_and_unstack_rows_of_every_tensor():
    batch = {"input_ids": torch.arange(10).reshape(5, 2), "attention_mask": torch.arange(5)}
    part = S.take(batch, 1, 3)
    assert part["input_ids"].tolist() == [[2, 3], [4, 5]] and part["attention_mask"].tolist() == [1, 2]
    assert S.batch_size(S.take(batch, 0, 1)) == 1
    assert [s["attention_mask"].item() for s in S.unstack(batch)] == [0, 1, 2, 3, 4]


def test_structure_names_dtypes_and_ranks():
    sample = {"input_ids": torch.zeros(7, dtype=torch.int64), "attention_mask": torch.ones(7, dtype=torch.int64)}
    assert S.describe(sample) == "dict(input_ids: int64 rank 1, attention_mask: int64 rank 1)"
    assert S.structure(sample) == S.structure({k: v[:3] for k, v in sample.items()})   # length is not structure


def test_a_sample_whose_structure_changes_is_named():
    good = {"input_ids": torch.zeros(4, dtype=torch.int64)}
    bad = {"input_ids": torch.zeros(4, dtype=torch.int32)}
    with pytest.raises(DataError, match=r"data.eval\[2\] is dict\(input_ids: int32 rank 1\) but data.eval\[0\] is "
                                        r"dict\(input_ids: int64 rank 1\)"):
        S.check_samples([good, good, bad], what="data.eval")
    with pytest.raises(DataError, match=r"data.calib\[1\]: an input must be a tensor, a tuple of tensors or a dict"):
        S.check_samples([torch.zeros(2), "text"], what="data.calib")


def test_dict_inputs_call_forward_positionally_in_its_order():
    model = TwoInputs()
    x = {"input_ids": torch.tensor([[1, 2]]), "attention_mask": torch.tensor([[1, 0]])}
    args, kwargs = S.as_call(x, model)
    assert kwargs == {} and [a.tolist() for a in args] == [[[1, 2]], [[1, 0]]]
    assert S.names(x, model) == ["input_ids", "attention_mask"]
    assert S.call(model, x).tolist() == [[1.0, 0.0]]
    swapped = {"attention_mask": x["attention_mask"], "input_ids": x["input_ids"]}
    assert S.as_call(swapped, model)[1] == swapped          # not forward's order: keyword arguments


def test_batches_group_one_shape_at_a_time_and_never_pad():
    samples = [torch.arange(n) for n in (3, 3, 5, 5, 5, 3)]
    sizes = [tuple(b.shape) for b in S.batches(samples, 2)]
    assert sizes == [(2, 3), (2, 5), (1, 5), (1, 3)]
    with pytest.raises(DataError, match="cannot stack samples of different shapes"):
        S.stack(samples)
    batch = S.stack([{"a": torch.zeros(2), "b": torch.ones(1, dtype=torch.int64)}] * 3)
    assert S.shapes(batch) == ((3, 2), (3, 1)) and S.batch_size(batch) == 3
    assert [S.shapes(s) for s in S.unstack(batch)] == [((2,), (1,))] * 3
