"""Low-bit models in the ``.dsk`` container: codes are stored, not floats; decoded on load.

Records (``formats.records``), for a weight ``W`` (a state-dict name such as ``fc1.weight``):

- codebook scheme: one record ``W`` holding the distinct nonzero levels and one entropy-coded
  index per weight; zeros (pruned, or on a 0 level) are positions or a +0.0 level, whichever
  the container finds smaller.
- affine scheme: ``W#codes``, the centered integer codes ``q - zero_point`` (exactly 0 where
  the weight is 0, so pruned weights cost positions only) as a codebook of the integers used
  plus entropy-coded indices; ``W#scale`` (float32, the qparams' shape); and for asymmetric
  grids ``W#zero_point`` (uint8), from which a runtime gets back ``q``. The weight is
  ``codes * scale``, bit for bit the float ``dequantize_affine`` gave before saving.
- int8-grid codebook scheme (``Codebook(grid="int8")``): ``W#levels``, the float levels before
  snapping, stored exactly as a codebook record ``W`` is, and ``W#scale`` (float32, one per output
  channel); the weight is ``clamp(round(level / scale), -127, 127) * scale`` per channel
  (``ops.nonuniform.decode_on_grid``), bit for bit what was saved. The record names differ from
  ``W`` so that a reader that knows only float codebooks refuses the file instead of loading
  unsnapped levels.
- every other tensor (biases, float layers, buffers): the cheapest of dense/sparse.

Metadata: ``{"format": "deepshrink.lowbit", "version": 1, "arch": models.zoo.get_arch(model),
"weights": {W: spec}}`` with ``spec`` ``{"scheme": "affine", "bits", "symmetric",
"granularity", "group_size"}`` or ``{"scheme": "codebook", "method", "bits"}`` (plus ``"grid": "int8"``
for an int8-grid codebook). Loading runs
no code from the file, except that an ``arch`` naming a user's ``file.py`` imports it, as
``models.loading.load_checkpoint`` does.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from deepshrink.core.errors import ArtifactError, ConfigError, ModelLoadError
from deepshrink.formats.container import read_container, record_for, write_container
from deepshrink.models.loading import build_from_arch, check_fits_weights
from deepshrink.models.zoo import get_arch
from deepshrink.ops.quant_math import dequantize_affine, integer_dtype, qrange
from deepshrink.quantization.lowbit.codebook import GridCodebookWeight
from deepshrink.quantization.lowbit.weights import (AffineWeight, CodebookWeight, quantized_weights, set_quantized)

FORMAT, VERSION = "deepshrink.lowbit", 1
_SEP = "#"


def save_compressed(model: nn.Module, path: str | os.PathLike, *, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write ``model`` (a zoo or user-file model, low-bit or not) as a ``.dsk`` file; returns its path.

    ``metadata`` adds free-form JSON under the key ``"user"``. Raises ``ConfigError`` if a
    low-bit weight no longer equals its codes (it was trained after quantizing: quantize again).
    """
    arch = get_arch(model)
    if arch is None:
        raise ModelLoadError(f"{path}: this module has no recorded architecture (build it with deepshrink.models.load "
                             f"or deepshrink.models.create) so it could not be rebuilt from the file")
    low = quantized_weights(model)
    state = model.state_dict()
    missing = [n for n in low if n not in state]
    if missing:
        raise ConfigError(f"save_compressed: {missing[0]} was quantized but is not in the model's state dict")
    records, specs = [], {}
    for name, tensor in state.items():
        qw = low.get(name)
        if qw is None:
            records.append(record_for(name, tensor))
            continue
        expected = qw.dequantize().to(tensor.dtype)
        if not torch.equal(expected, tensor):
            diff = (expected.float() - tensor.float()).abs().max().item()
            raise ConfigError(f"save_compressed: {name} differs from its {qw.spec()['scheme']} codes by up to {diff:.3g} "
                              f"(trained after quantizing?); quantize the model again before saving")
        records.extend(_records(name, qw))
        specs[name] = qw.spec()
    meta = {"format": FORMAT, "version": VERSION, "arch": arch, "weights": specs}
    if metadata:
        meta["user"] = dict(metadata)
    return write_container(path, records, meta)


def load_compressed(path: str | os.PathLike, *, code: str | None = None) -> nn.Module:
    """The eager module saved by ``save_compressed``, weights decoded, in eval mode.

    Any ``.dsk`` whose metadata has an ``arch`` loads (e.g. a pruned model stored sparsely);
    low-bit weights are remembered again, so saving the result writes the same codes.
    """
    tensors, meta = read_container(path)
    arch = meta.get("arch")
    if not isinstance(arch, dict) or not ("zoo" in arch or "file" in arch):
        raise ArtifactError(f"{path}: the metadata has no 'arch' saying how to rebuild the model "
                            f"(write it with deepshrink.quantization.lowbit.save_compressed)")
    specs = meta.get("weights", {})
    if not isinstance(specs, dict):
        raise ArtifactError(f"{path}: metadata 'weights' must be an object of per-weight specs")
    state, quantized = {}, {}
    for name, tensor in tensors.items():
        if _SEP not in name:
            state[name] = tensor
    for name, spec in specs.items():
        qw = _decode_weight(path, name, spec, tensors)
        quantized[name] = qw
        state[name] = qw.dequantize()
    check_fits_weights(arch, state, where=str(path))
    model = build_from_arch(arch, where=str(path), code=code)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ModelLoadError(f"model: weights in {path} do not fit {arch}: {str(err).splitlines()[0]}") from None
    params = dict(model.named_parameters())
    for name, qw in quantized.items():
        set_quantized(model, name, params[name], qw)
    return model.eval()


def _records(name: str, qw: AffineWeight | CodebookWeight | GridCodebookWeight) -> list:
    if isinstance(qw, GridCodebookWeight):
        values = qw.level_values()
        levels, indices = _canonical_codebook(values)
        return [record_for(f"{name}{_SEP}levels", values, codebook=levels, indices=indices),
                record_for(f"{name}{_SEP}scale", qw.scale.float(), kind="dense")]
    if isinstance(qw, CodebookWeight):
        values = qw.dequantize()
        levels, indices = _canonical_codebook(values)
        return [record_for(name, values, codebook=levels, indices=indices)]
    codes = qw.centered_codes()
    levels, indices = torch.unique(codes, sorted=True, return_inverse=True)
    out = [record_for(f"{name}{_SEP}codes", codes, codebook=levels, indices=indices),
           record_for(f"{name}{_SEP}scale", qw.scale.float(), kind="dense")]
    if not qw.symmetric:
        out.append(record_for(f"{name}{_SEP}zero_point", qw.zero_point.to(torch.uint8), kind="dense"))
    return out


def _canonical_codebook(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted distinct nonzero values, index of each weight; 0 where the weight is 0).

    What is stored for a codebook weight, whatever codebook it was fitted with: unused levels
    and a level at 0 cost bytes and decode to nothing (zeros are stored as positions, or as a
    +0.0 level the container adds), and the loader can rebuild exactly this from the tensor,
    so saving a loaded model writes the same bytes.
    """
    kept = values != 0
    levels, inverse = torch.unique(values[kept], sorted=True, return_inverse=True)
    if levels.numel() == 0:
        levels = torch.zeros(1, dtype=values.dtype)
    indices = torch.zeros(values.shape, dtype=torch.int64)
    indices[kept] = inverse
    return levels, indices


def _decode_weight(path, name: str, spec: Any, tensors: Mapping[str, torch.Tensor]) -> AffineWeight | CodebookWeight:
    where = f"{path}: weight {name!r}"
    if not isinstance(spec, dict) or spec.get("scheme") not in ("affine", "codebook"):
        raise ArtifactError(f"{where}: spec {spec!r:.80} must be an object with scheme 'affine' or 'codebook'")
    if spec["scheme"] == "codebook" and spec.get("grid") is not None:
        return _decode_grid_codebook(where, name, spec, tensors)
    if spec["scheme"] == "codebook":
        if name not in tensors:
            raise ArtifactError(f"{where}: no record of that name")
        w = tensors[name]
        if not w.is_floating_point():
            raise ArtifactError(f"{where}: a codebook weight must be floating point, got {w.dtype}")
        levels, indices = _canonical_codebook(w)
        if levels.numel() > 256:
            raise ArtifactError(f"{where}: {levels.numel()} distinct values do not fit a codebook of at most 256 levels")
        mask = w != 0
        return CodebookWeight(str(spec.get("method")), int(spec.get("bits", 8)), levels, indices.to(torch.uint8),
                              None if bool(mask.all()) else mask)
    try:
        bits, symmetric = int(spec["bits"]), bool(spec["symmetric"])
        granularity, group_size = spec["granularity"], spec["group_size"]
        codes, scale = tensors[f"{name}{_SEP}codes"], tensors[f"{name}{_SEP}scale"]
        qmin, qmax = qrange(bits, symmetric)
        zero_point = (tensors[f"{name}{_SEP}zero_point"].to(torch.int32) if not symmetric
                      else torch.zeros(scale.shape, dtype=torch.int32))
        layout = AffineWeight(bits, symmetric, granularity, group_size, codes, scale, zero_point).layout()
        # q = codes + zero_point, exact in float for codes and zero points below 2^24
        q = dequantize_affine(codes, torch.ones_like(scale), -zero_point, **layout)
    except (KeyError, TypeError, ValueError, ConfigError) as err:
        raise ArtifactError(f"{where}: affine records or spec are incomplete or inconsistent ({err})") from None
    if q.numel() and (q.min() < qmin or q.max() > qmax):
        raise ArtifactError(f"{where}: codes {int(q.min())}..{int(q.max())} fall outside {qmin}..{qmax}")
    return AffineWeight(bits, symmetric, granularity, group_size, q.to(integer_dtype(qmin, qmax)), scale, zero_point)


def _decode_grid_codebook(where: str, name: str, spec: dict, tensors: Mapping[str, torch.Tensor]) -> GridCodebookWeight:
    if spec["grid"] != GridCodebookWeight.grid:
        raise ArtifactError(f"{where}: grid {spec['grid']!r:.40} is not known to this deepshrink (it reads "
                            f"{GridCodebookWeight.grid!r}); upgrade deepshrink")
    values, scale = tensors.get(f"{name}{_SEP}levels"), tensors.get(f"{name}{_SEP}scale")
    if values is None or scale is None:
        raise ArtifactError(f"{where}: an int8-grid codebook needs records {name}{_SEP}levels and {name}{_SEP}scale")
    if not values.is_floating_point() or values.dim() < 1:
        raise ArtifactError(f"{where}: levels must be a floating tensor of the weight's shape, got {values.dtype} "
                            f"{list(values.shape)}")
    if scale.dtype != torch.float32 or list(scale.shape) != [values.shape[0]] or not bool((scale > 0).all()):
        raise ArtifactError(f"{where}: scale must be {values.shape[0]} positive float32 values (one per output "
                            f"channel), got {scale.dtype} {list(scale.shape)}")
    levels, indices = _canonical_codebook(values)
    if levels.numel() > 256:
        raise ArtifactError(f"{where}: {levels.numel()} distinct levels do not fit a codebook of at most 256 levels")
    mask = values != 0
    return GridCodebookWeight(str(spec.get("method")), int(spec.get("bits", 8)), levels, scale,
                              indices.to(torch.uint8), None if bool(mask.all()) else mask)


__all__ = ["save_compressed", "load_compressed", "FORMAT", "VERSION"]
