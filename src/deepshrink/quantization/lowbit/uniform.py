"""Post-training uniform weight quantization at 2..8 bits, each layer at its own width."""
from __future__ import annotations

from torch import nn

from deepshrink.quantization.lowbit.configs import UniformWeights
from deepshrink.quantization.lowbit.weights import fit_affine, layer_widths, set_quantized


def quantize_weights_(model: nn.Module, config: UniformWeights) -> nn.Module:
    """Put the selected Conv/Linear weights of ``model`` on their uniform grids, in place.

    Every layer is fitted before any is changed, so a bad layer (e.g. a group size that does
    not divide its rows) raises ``ConfigError`` and leaves the model untouched. Zero weights
    stay exactly zero (the range always contains 0).
    """
    widths = layer_widths(model, config.bits, config.layers, what=type(config).__name__)
    modules = dict(model.named_modules())
    fitted = {
        name: fit_affine(modules[name].weight, bits=bits, symmetric=config.symmetric,
                         granularity=config.granularity, group_size=config.group_size, layer=name)
        for name, bits in widths.items()
    }
    for name, qw in fitted.items():
        set_quantized(model, f"{name}.weight", modules[name].weight, qw)
    return model


__all__ = ["quantize_weights_"]
