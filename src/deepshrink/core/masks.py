"""Pruning masks, held inside the module by ``torch.nn.utils.parametrize``.

``attach_masks`` registers a parametrization on each masked parameter: ``module.weight`` is then
recomputed as ``where(mask, original, 0)`` on every access, so every training loop — ours, yours,
a Hugging Face ``Trainer``, any optimizer with momentum or weight decay — sees exactly-zero pruned
weights and gets a zero gradient for them: nothing revives a pruned weight, and nothing has to
re-apply a mask after a step. Masks are keyed by parameter name as the plain module spells it
(``"hidden.0.weight"``), whatever the parametrization renames.

The mask is a buffer of the parametrization (``hidden.0.parametrizations.weight.0.mask`` in the
state dict), so a state dict saved from a masked model carries its masks: ``load_state_dict``
into a masked copy, or ``load_masked_state_dict`` into a model that has none yet.
``detach_masks`` (``pruning.finalize``) removes the parametrizations and leaves a plain module
(its own class again) whose pruned weights are exact zeros.
"""
from __future__ import annotations

import contextlib
import re
from typing import Iterator, Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize

_MASK_KEY = re.compile(r"^(?:(.*)\.)?parametrizations\.([^.]+)\.0\.mask$")


class MaskParametrization(nn.Module):
    """``weight = where(mask, original, 0)``: pruned entries read as +0.0 and get no gradient."""

    def __init__(self, mask: torch.Tensor, order: list[str] | None = None) -> None:
        super().__init__()
        self.register_buffer("mask", mask.to(torch.bool))
        self.order = order   # the module's parameter names, in order, before the mask took one out

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        return torch.where(self.mask, original, original.new_zeros(()))


def _split(name: str) -> tuple[str, str]:
    module, _, param = name.rpartition(".")
    return module, param


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    module_name, param = _split(name)
    try:
        module = model.get_submodule(module_name) if module_name else model
    except AttributeError:
        raise KeyError(f"mask for {name!r} has no parameter of that name") from None
    if parametrize.is_parametrized(module, param):
        return module, param
    if not isinstance(module._parameters.get(param), torch.Tensor):
        raise KeyError(f"mask for {name!r} has no parameter of that name")
    return module, param


def _mask_of(module: nn.Module, param: str) -> MaskParametrization | None:
    if not parametrize.is_parametrized(module, param):
        return None
    found = [p for p in module.parametrizations[param] if isinstance(p, MaskParametrization)]
    return found[0] if found else None


def _original(module: nn.Module, param: str) -> torch.Tensor:
    if parametrize.is_parametrized(module, param):
        return module.parametrizations[param].original
    return module._parameters[param]


def raw_parameter(model: nn.Module, name: str) -> nn.Parameter:
    """The trained tensor behind ``name`` (``"hidden.0.weight"``): the parameter itself, or the
    original a parametrization reads. Write here to change a masked weight (its pruned entries
    are 0 and stay 0, whatever is written there)."""
    module, param = _owner(model, name)
    return _original(module, param)


def attach_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Hold each ``{parameter name: keep-mask}`` in its module (True = kept); a parameter that has
    a mask already gets the new one instead. The pruned entries of the trained tensor are zeroed."""
    owners = {}
    for name, mask in masks.items():
        module, param = _owner(model, name)
        original = _original(module, param)
        if tuple(mask.shape) != tuple(original.shape):
            raise ValueError(f"mask for {name!r} has shape {tuple(mask.shape)}, parameter {tuple(original.shape)}")
        if parametrize.is_parametrized(module, param) and _mask_of(module, param) is None:
            raise ValueError(f"{name!r} already has a parametrization ({type(module.parametrizations[param][0]).__name__}); "
                             "pruning masks go on a plain parameter: remove it first")
        owners[name] = (module, param, original)
    for name, (module, param, original) in owners.items():
        keep = masks[name].detach().to(device=original.device, dtype=torch.bool)
        with torch.no_grad():
            # the trained tensor holds 0 where pruned, so a plain read of it (or a lost mask) still shows the zeros
            original.masked_fill_(~keep, 0)
        existing = _mask_of(module, param)
        if existing is not None:
            existing.mask = keep.clone()
        else:
            parametrize.register_parametrization(module, param, MaskParametrization(keep.clone(), list(module._parameters)))


def get_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{parameter name: keep-mask}`` of every masked parameter, in module order."""
    found = {}
    for module_name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for param in module.parametrizations:
            mask = _mask_of(module, param)
            if mask is not None:
                found[f"{module_name}.{param}" if module_name else param] = mask.mask
    return found


def has_masks(model: nn.Module) -> bool:
    return isinstance(model, nn.Module) and any(
        isinstance(m, MaskParametrization) for m in model.modules())


def detach_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Remove the masks and return them: the module is plain again, its pruned weights exact zeros
    (the same ``Parameter`` objects, so an optimizer holding them keeps working)."""
    masks = get_masks(model)
    for name in masks:
        module, param = _owner(model, name)
        if len(module.parametrizations[param]) != 1:
            raise ValueError(f"{name!r} has other parametrizations on top of its pruning mask; remove them first")
        order = module.parametrizations[param][0].order or []
        parametrize.remove_parametrizations(module, param, leave_parametrized=True)
        # the parameter goes back where it was (state-dict order as before pruning), not last
        params = module._parameters
        ordered = [k for k in order if k in params] + [k for k in params if k not in order]
        module._parameters = type(params)((k, params[k]) for k in ordered)
    return masks


@contextlib.contextmanager
def without_masks(model: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """The masks lifted for the duration (a plain module with zeros: its state dict has plain
    names, it exports, it takes other parametrizations), then put back."""
    masks = detach_masks(model)
    try:
        yield masks
    finally:
        if masks:
            attach_masks(model, masks)


def masks_in_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The pruning masks a masked model's state dict carries, by parameter name."""
    found = {}
    for key, value in state.items():
        match = _MASK_KEY.match(key)
        if match and value.dtype == torch.bool:
            found[f"{match[1]}.{match[2]}" if match[1] else match[2]] = value
    return found


def load_masked_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], *, strict: bool = True):
    """``model.load_state_dict(state)`` where ``state`` came from a masked model and ``model``
    may have no masks yet: the masks it carries are attached first, so keys match."""
    masks = masks_in_state_dict(state)
    if masks:
        attach_masks(model, masks)
    return model.load_state_dict(state, strict=strict)


__all__ = ["MaskParametrization", "attach_masks", "get_masks", "has_masks", "detach_masks",
           "without_masks", "raw_parameter", "masks_in_state_dict", "load_masked_state_dict"]
