"""After shrinking, record the new widths as the model's constructor arguments where possible.

A zoo model remembers how to rebuild its skeleton (``models.zoo.get_arch``); once its layers are
narrower, that record must carry the new widths or a ``.safetensors`` checkpoint would not load.
Widths come from a model's own ``structured_widths()`` method (``models.mobile.MobileNetTiny``
has one) or from the table below for zoo classes; the result is checked by building the
skeleton and comparing every tensor shape. When no widths can be given the record is dropped,
so ``save_checkpoint`` refuses ``.safetensors`` and says to save a ``.pt2`` program instead.
"""
from __future__ import annotations

from typing import Any, Callable

from torch import nn

WIDTHS: dict[str, Callable[[nn.Module], dict[str, Any]]] = {
    "lenet-5": lambda m: {"conv1": m.conv1.out_channels, "conv2": m.conv2.out_channels, "fc1": m.fc1.out_features},
    "lenet-300-100": lambda m: {"hidden": [layer.out_features for layer in m.hidden]},
    "seed-mlp": lambda m: {"hidden": [layer.out_features for layer in m.hidden]},
}


def record_widths(model: nn.Module) -> dict | None:
    """Update the model's architecture record with its current widths; the new record, or None
    (record dropped) when the widths cannot be expressed as constructor arguments."""
    from deepshrink.models.zoo import get_arch, set_arch

    arch = get_arch(model)
    if arch is None:
        return None
    widths = _widths(model, arch)
    updated = {**arch, "kwargs": {**arch.get("kwargs", {}), **widths}} if widths is not None else None
    if updated is not None and not _rebuilds(model, updated):
        updated = None
    set_arch(model, updated)
    return updated


def _widths(model: nn.Module, arch: dict) -> dict[str, Any] | None:
    method = getattr(model, "structured_widths", None)
    if callable(method):
        return dict(method())
    rule = WIDTHS.get(arch.get("zoo", ""))
    return rule(model) if rule is not None else None


def _rebuilds(model: nn.Module, arch: dict) -> bool:
    from deepshrink.models.loading import load_user_class
    from deepshrink.models.zoo import create

    try:
        if "zoo" in arch:
            skeleton = create(arch["zoo"], **arch.get("kwargs", {}))
        else:
            skeleton = load_user_class(f"{arch['file']}:{arch['class']}", **arch.get("kwargs", {}))
    except Exception:  # a constructor that rejects the widths: the record cannot describe this model
        return False
    mine, theirs = model.state_dict(), skeleton.state_dict()
    return mine.keys() == theirs.keys() and all(mine[k].shape == theirs[k].shape for k in mine)
