"""remove_dead_channels: exact (outputs unchanged), finds units dead across flatten, keeps
units it cannot prove unused, rounds to a multiple and carries pruning masks over."""
from __future__ import annotations

import torch

from deepshrink.core.masks import attach_masks, get_masks
from deepshrink.models.zoo import LeNet5, create
from deepshrink.models.zoo import get_arch
from deepshrink.pruning.structured.dead import remove_dead_channels


def _mlp() -> MLP:
    torch.manual_seed(0)
    return create("lenet-300-100", hidden=(16, 12), in_features=8, num_classes=4).eval()


@torch.no_grad()
def test_units_without_outgoing_weights_go_and_outputs_stay_exact():
    model = _mlp()
    model.hidden[1].weight[:, [1, 5, 7]] = 0          # hidden.0 units 1, 5, 7 are read by nobody
    model.classifier.weight[:, [0, 11]] = 0           # hidden.1 units 0, 11 likewise
    model.hidden[0].weight[3] = 0                     # no incoming weights, but read: a constant, stays
    x = torch.randn(32, 8)
    before = model(x)
    changed = remove_dead_channels(model, x[:4])
    assert changed == {"hidden.0": (16, 13), "hidden.1": (12, 10)}
    torch.testing.assert_close(model(x), before, rtol=0, atol=1e-6)  # exact but for summation order
    assert get_arch(model)["kwargs"]["hidden"] == [13, 10]


@torch.no_grad()
def test_conv_channels_dead_behind_a_flatten():
    torch.manual_seed(0)
    model = LeNet5().eval()
    fc1 = model.fc1.weight.view(500, 50, 16)
    fc1[:, 10:40, :] = 0                              # conv2 channels 10..39 feed fc1 only through zeros
    fc1[:, 41, 3] = 0                                 # one zero of channel 41 is not enough
    model.fc2.weight[:, 100:] = 0                     # fc1 units 100..499
    x = torch.randn(8, 1, 28, 28)
    before = model(x)
    assert remove_dead_channels(model, x[:2]) == {"conv2": (50, 20), "fc1": (500, 100)}
    torch.testing.assert_close(model(x), before, rtol=0, atol=1e-5)


@torch.no_grad()
def test_rounds_up_to_the_multiple_and_never_empties_a_layer():
    model = _mlp()
    model.hidden[1].weight[:, 3:] = 0                 # 3 of 16 units live
    model.classifier.weight.zero_()                   # no unit of hidden.1 is read
    x = torch.randn(16, 8)
    before = model(x)
    assert remove_dead_channels(model, x[:2], multiple=8) == {"hidden.0": (16, 8), "hidden.1": (12, 8)}
    torch.testing.assert_close(model(x), before, rtol=0, atol=1e-6)  # exact but for summation order
    model = _mlp()
    model.classifier.weight.zero_()
    assert remove_dead_channels(model, x[:2])["hidden.1"] == (12, 1)


def test_masks_follow_the_smaller_layers():
    model = _mlp()
    mask = torch.rand(12, 16, generator=torch.Generator().manual_seed(0)) > 0.5
    mask[:, 2] = False                                # hidden.0 unit 2 loses its readers through the mask
    attach_masks(model, {"hidden.1.weight": mask})
    remove_dead_channels(model, torch.randn(2, 8))
    masks = get_masks(model)
    assert masks["hidden.1.weight"].shape == (12, 15)
    assert torch.equal(masks["hidden.1.weight"], torch.cat([mask[:, :2], mask[:, 3:]], 1) & (model.hidden[1].weight != 0))
    assert int(masks["hidden.1.weight"].sum()) == int(mask.sum())
