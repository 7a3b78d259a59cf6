"""Pruning masks as training state attached to a module.

Masks live beside the module (not as parameters or buffers), so the model's state dict and
exports never carry them. Pruning attaches them, training re-applies them after every optimizer
step so pruned weights stay exactly zero, and finalizing removes them.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

_ATTR = "_deepshrink_masks"


def attach_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        if name not in params:
            raise KeyError(f"mask for {name!r} has no parameter of that name")
        if mask.shape != params[name].shape:
            raise ValueError(f"mask for {name!r} has shape {tuple(mask.shape)}, parameter {tuple(params[name].shape)}")
    merged = dict(get_masks(model))
    merged.update({k: v.to(torch.bool) for k, v in masks.items()})
    object.__setattr__(model, _ATTR, merged)
    apply_masks(model)


def get_masks(model: nn.Module) -> Mapping[str, torch.Tensor]:
    return getattr(model, _ATTR, {})


@torch.no_grad()
def apply_masks(model: nn.Module) -> None:
    masks = get_masks(model)
    if not masks:
        return
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        params[name].mul_(mask.to(params[name].dtype))


def detach_masks(model: nn.Module) -> Mapping[str, torch.Tensor]:
    """Remove the masks (the zeros stay in the weights) and return them."""
    masks = get_masks(model)
    if hasattr(model, _ATTR):
        object.__delattr__(model, _ATTR)
    return masks
