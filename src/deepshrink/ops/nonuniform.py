"""Non-uniform (codebook) weight quantization: each weight becomes an index into a few levels.

Every fitter returns ``(codebook, indices)``:

- ``codebook``: 1-D float tensor (dtype of ``w``) of at most ``2^bits`` levels, sorted
  ascending, so index order is value order. It is shorter when there is less to encode
  (fewer distinct values than levels, or everything pruned).
- ``indices``: ``uint8`` tensor of ``w``'s shape; ``decode(codebook, indices)`` rebuilds ``w``.

Pruned weights. Each fitter takes an optional boolean ``mask`` of ``w``'s shape (True = weight
present). Pruned weights are left out of the fit -- thousands of exact zeros would otherwise
pull one or more levels onto 0 -- and are not encoded: their indices are 0 and mean nothing,
because the sparse storage format keeps the positions separately (Deep Compression stores
CSR positions and codebook indices for the survivors only). ``decode(..., mask=mask)`` puts the
zeros back. Passing a 1-D tensor of the surviving values with ``mask=None`` is equivalent.

Int8 grid. ``grid_scales``, ``snap_to_grid`` and ``decode_on_grid`` put one layer-wide codebook
on the symmetric int8 grid of each output channel ``c`` (axis 0): ``scale_c = max|w_c| / 127``
(``ops.quant_math.choose_qparams``, the per-channel formula of the int8 runtime weights), and
level ``j`` of channel ``c`` becomes ``codes[c, j] * scale_c`` with
``codes[c, j] = clamp(round(codebook[j] / scale_c), -127, 127)``. Indices stay layer-wide; each
channel has its own (at most ``2^bits``) integer levels, a function of the codebook and its scale.
Decoding multiplies an int8 code (as float32) by its float32 scale, one rounding, as
``dequantize_affine`` does, so a runtime given ``(codes[c, index], scale_c)`` holds the same floats.
"""
from __future__ import annotations

import torch

from deepshrink.core.errors import ConfigError
from deepshrink.ops.quant_math import choose_qparams

KMEANS_INITS = ("linear", "density")
GRID_QMAX = 127   # symmetric int8: codes -127..127, scale = max|w| / 127


def equal_population_codebook(
    w: torch.Tensor, bits: int, *, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Levels at the means of ``2^bits`` bins holding equally many weights (counts differ by <= 1).

    The bins are cut at rank quantiles of ``w``: weights are sorted (stable, so ties keep flat
    index order) and the weight of rank ``r`` goes to bin ``floor(r * k / n)``. Cutting by rank
    rather than by value keeps the counts exact when many weights are tied -- a value
    threshold would have to put all copies of a tied value in one bin. The price is that
    copies of one value may land in two neighbouring bins and decode to different levels.
    """
    _check_bits(bits, 1)
    values = _present_values(w, mask)
    n = values.numel()
    if n == 0:
        return _empty_fit(w)
    k = min(2 ** bits, n)
    order = torch.sort(values.double(), stable=True).indices
    rank_bin = torch.arange(n, dtype=torch.int64) * k // n
    bin_of = torch.empty(n, dtype=torch.int64)
    bin_of[order] = rank_bin
    counts = torch.bincount(rank_bin, minlength=k).double()
    sums = torch.zeros(k, dtype=torch.float64).index_add_(0, bin_of, values.double())
    codebook = (sums / counts).to(_float_dtype(w))
    return codebook, _scatter_indices(w, mask, bin_of)


def kmeans_codebook(
    w: torch.Tensor,
    bits: int,
    *,
    init: str = "linear",
    iters: int = 100,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D k-means (Lloyd) with ``2^bits`` centroids; deterministic, no random state.

    ``init="linear"`` spaces centroids evenly between min and max, which Deep Compression
    (Han et al. 2016, sec. 3.2) found best because it keeps centroids on the rare large
    weights that matter most; ``"density"`` starts from the equal-population levels.
    Iterates until no assignment changes or ``iters`` updates have run (``iters=0`` returns
    the initial levels with nearest assignment). A centroid left empty by an update is moved
    onto the weight with the largest current error, so no level is wasted. With no more
    distinct values than levels, the codebook is those values and the error is zero.
    """
    _check_bits(bits, 1)
    if init not in KMEANS_INITS:
        raise ConfigError(f"init: {init!r} is not allowed; choose one of " + ", ".join(map(repr, KMEANS_INITS)))
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ConfigError(f"iters: {iters!r} must be an integer >= 0, e.g. 100")
    values = _present_values(w, mask).double()
    if values.numel() == 0:
        return _empty_fit(w)
    k = 2 ** bits
    distinct, inverse = torch.unique(values, sorted=True, return_inverse=True)
    if distinct.numel() <= k:
        return distinct.to(_float_dtype(w)), _scatter_indices(w, mask, inverse)

    # In 1-D with sorted centroids, every cluster is a contiguous run of the sorted values, so
    # an update is k differences of one cumulative sum: O(k log n) per iteration, and the same
    # floating-point sums on every run and device.
    sorted_values = torch.sort(values).values
    cumsum = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(sorted_values, 0)])
    if init == "linear":
        centroids = torch.linspace(sorted_values[0].item(), sorted_values[-1].item(), k, dtype=torch.float64)
    else:
        centroids = equal_population_codebook(values, bits)[0].double()
    cuts = None
    for _ in range(iters):
        new_cuts = _cluster_cuts(sorted_values, centroids)
        if cuts is not None and torch.equal(new_cuts, cuts):
            break
        cuts = new_cuts
        starts = torch.cat([torch.zeros(1, dtype=torch.int64), cuts[:-1]])
        counts = cuts - starts
        filled = counts > 0
        centroids = centroids.clone()
        centroids[filled] = (cumsum[cuts] - cumsum[starts])[filled] / counts[filled].double()
        if not bool(filled.all()):
            centroids = _reseed_empty(sorted_values, centroids, filled)
        centroids = torch.sort(centroids).values
    idx = torch.bucketize(values, _midpoints(centroids))
    return centroids.to(_float_dtype(w)), _scatter_indices(w, mask, idx)


def power_of_two_codebook(
    w: torch.Tensor, bits: int, *, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Levels ``0`` and ``±2^k`` for ``m = 2^(bits-1) - 1`` consecutive exponents ``k`` (``2^bits - 1`` levels).

    One bit is the sign and ``bits - 1`` bits the exponent, one exponent code meaning zero
    (so +0 and -0 share a level: 3 levels at 2 bits, 7 at 3, 15 at 4). As in INQ (Zhou et
    al. 2017) the top exponent is ``floor(log2(4/3 * max|w|))``, the power of two nearest to
    ``max|w|``; the others follow downward. Assignment is to the nearest level in the *linear*
    domain, i.e. minimum absolute error, which is what the layer output sees; log-domain
    rounding would map small weights far from zero onto needlessly large levels. The decision
    boundary between ``2^k`` and ``2^(k+1)`` is therefore ``1.5 * 2^k``, and between 0 and the
    smallest level ``2^k_min`` it is ``2^(k_min - 1)``; a weight exactly on a boundary takes
    the level of smaller value. An all-zero ``w`` gets the one-level codebook ``[0.]``.
    """
    _check_bits(bits, 2)
    values = _present_values(w, mask).double()
    if values.numel() == 0:
        return _empty_fit(w)
    amax = values.abs().max().item()
    if amax == 0.0:
        return _empty_fit(w)
    k_max = int(torch.floor(torch.log2(torch.tensor(4.0 / 3.0 * amax, dtype=torch.float64))).item())
    # Below 2^-126 float32 turns subnormal and then 0, which would duplicate the zero level.
    exponents = torch.arange(max(k_max - (2 ** (bits - 1) - 1) + 1, -126), k_max + 1, dtype=torch.float64)
    magnitudes = torch.pow(2.0, exponents)
    codebook = torch.cat([-magnitudes.flip(0), torch.zeros(1, dtype=torch.float64), magnitudes])
    idx = torch.bucketize(values, _midpoints(codebook))
    return codebook.to(_float_dtype(w)), _scatter_indices(w, mask, idx)


def decode(codebook: torch.Tensor, indices: torch.Tensor, *, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``codebook[indices]`` in the codebook's dtype; with ``mask``, pruned positions are exactly 0."""
    if codebook.dim() != 1 or codebook.numel() == 0:
        raise ConfigError(f"codebook: shape {list(codebook.shape)} must be 1-D and non-empty")
    idx = indices.long()
    if idx.numel() and (idx.min().item() < 0 or idx.max().item() >= codebook.numel()):
        raise ConfigError(
            f"indices: range {idx.min().item()}..{idx.max().item()} does not fit a codebook of "
            f"{codebook.numel()} levels; decode with the codebook the indices were fitted with"
        )
    out = codebook[idx]
    if mask is not None:
        _check_mask(mask, indices)
        out = torch.where(mask, out, torch.zeros((), dtype=out.dtype))
    return out


def centroid_gradients(
    grad_w: torch.Tensor,
    indices: torch.Tensor,
    n_levels: int,
    *,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gradient per codebook level: the sum of the gradients of the weights using it.

    This is Deep Compression's shared-weight update (Han et al. 2016, eq. 3): with
    ``w = codebook[indices]``, ``dL/dcodebook[j] = sum over {i : indices[i] = j} of dL/dw[i]``.
    Pruned positions (``mask`` False) are skipped, their indices being meaningless.
    Accumulated in float64 in a fixed order, so the result is reproducible; returned in
    ``grad_w``'s dtype with shape ``[n_levels]``.
    """
    if grad_w.shape != indices.shape:
        raise ConfigError(
            f"grad_w: shape {list(grad_w.shape)} differs from indices shape {list(indices.shape)}; "
            "pass the gradient of the weight the indices encode"
        )
    if isinstance(n_levels, bool) or not isinstance(n_levels, int) or n_levels < 1:
        raise ConfigError(f"n_levels: {n_levels!r} must be a positive integer, normally codebook.numel()")
    idx = indices.reshape(-1).long()
    grads = grad_w.detach().reshape(-1).double()
    if mask is not None:
        _check_mask(mask, indices)
        keep = mask.reshape(-1)
        idx, grads = idx[keep], grads[keep]
    if idx.numel() and (idx.min().item() < 0 or idx.max().item() >= n_levels):
        raise ConfigError(
            f"indices: range {idx.min().item()}..{idx.max().item()} does not fit n_levels={n_levels}; "
            "pass n_levels=codebook.numel()"
        )
    return torch.zeros(n_levels, dtype=torch.float64).index_add_(0, idx, grads).to(grad_w.dtype)


def grid_scales(w: torch.Tensor, *, mask: torch.Tensor | None = None) -> torch.Tensor:
    """float32 ``[w.shape[0]]``: ``max|w_c| / 127`` over the kept weights of each output channel
    (an all-zero or all-pruned channel gets ``choose_qparams``' smallest scale, eps)."""
    if not w.is_floating_point():
        raise ConfigError(f"w: dtype {w.dtype} is not floating point; pass the float weight tensor")
    if w.dim() < 1 or w.numel() == 0:
        raise ConfigError(f"w: shape {list(w.shape)} has no output channels to scale")
    kept = w.detach()
    if mask is not None:
        _check_mask(mask, w)
        kept = torch.where(mask, kept, torch.zeros((), dtype=kept.dtype))
    return choose_qparams(kept, bits=8, symmetric=True, granularity="per_channel", axis=0)[0]


def snap_to_grid(codebook: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 ``[channels, levels]``: ``clamp(round(codebook[j] / scale[c]), -127, 127)`` (half to even)."""
    if codebook.dim() != 1 or codebook.numel() == 0 or not codebook.is_floating_point():
        raise ConfigError(f"codebook: {codebook.dtype} of shape {list(codebook.shape)} must be a 1-D, non-empty float tensor")
    if scale.dim() != 1 or scale.numel() == 0 or scale.dtype != torch.float32 or not bool((scale > 0).all()):
        raise ConfigError(f"scale: {scale.dtype} of shape {list(scale.shape)} must be 1-D positive float32, "
                          "one per output channel (see grid_scales)")
    ratio = codebook.detach().float()[None, :] / scale[:, None]
    return torch.clamp(torch.round(ratio), -GRID_QMAX, GRID_QMAX).to(torch.int8)


def grid_codes(codes: torch.Tensor, indices: torch.Tensor, *, mask: torch.Tensor | None = None) -> torch.Tensor:
    """int8 codes of the weight's shape: ``codes[c, indices[c, ...]]``, 0 where ``mask`` is False."""
    if codes.dim() != 2 or indices.dim() < 1 or indices.shape[0] != codes.shape[0]:
        raise ConfigError(f"codes: shape {list(codes.shape)} must be [channels, levels] with channels = "
                          f"indices.shape[0] (indices shape {list(indices.shape)})")
    idx = indices.long().reshape(indices.shape[0], -1)
    if idx.numel() and (idx.min().item() < 0 or idx.max().item() >= codes.shape[1]):
        raise ConfigError(f"indices: range {idx.min().item()}..{idx.max().item()} does not fit {codes.shape[1]} levels; "
                          "pass the codes snapped from the codebook the indices were fitted with")
    q = codes.gather(1, idx).reshape(indices.shape)
    if mask is not None:
        _check_mask(mask, indices)
        q = torch.where(mask, q, torch.zeros((), dtype=q.dtype))
    return q


def decode_on_grid(codebook: torch.Tensor, scale: torch.Tensor, indices: torch.Tensor, *,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """float32 weight ``codes[c, indices] * scale[c]`` (``codes = snap_to_grid(codebook, scale)``);
    with ``mask``, pruned positions are exactly 0."""
    if indices.dim() < 1 or indices.shape[0] != scale.numel():
        raise ConfigError(f"scale: {scale.numel()} entries for indices of shape {list(indices.shape)}; "
                          "pass one scale per output channel (axis 0)")
    q = grid_codes(snap_to_grid(codebook, scale), indices, mask=mask)
    return q.float() * scale.reshape(-1, *([1] * (indices.dim() - 1)))


# ---------------------------------------------------------------- private helpers


def _midpoints(sorted_levels: torch.Tensor) -> torch.Tensor:
    """Nearest-level decision boundaries; ``bucketize`` sends ties to the lower level."""
    return (sorted_levels[:-1] + sorted_levels[1:]) / 2


def _cluster_cuts(sorted_values: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """End (exclusive) in ``sorted_values`` of each centroid's cluster, shape ``[k]``."""
    inner = torch.searchsorted(sorted_values, _midpoints(centroids), right=True)
    return torch.cat([inner, torch.tensor([sorted_values.numel()])])


def _reseed_empty(sorted_values: torch.Tensor, centroids: torch.Tensor, filled: torch.Tensor) -> torch.Tensor:
    """Move each empty centroid onto the worst-served value (largest error), one distinct value each."""
    live = torch.sort(centroids[filled]).values
    nearest = live[torch.bucketize(sorted_values, _midpoints(live))]
    error = (sorted_values - nearest).abs()
    centroids = centroids.clone()
    for j in torch.nonzero(~filled).flatten().tolist():
        worst = int(torch.argmax(error).item())  # first maximum: deterministic
        centroids[j] = sorted_values[worst]
        error[sorted_values == sorted_values[worst]] = 0.0
    return centroids


def _present_values(w: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if not w.is_floating_point():
        raise ConfigError(f"w: dtype {w.dtype} is not floating point; pass the float weight tensor")
    w = w.detach()
    if mask is None:
        return w.reshape(-1)
    _check_mask(mask, w)
    return w[mask]


def _scatter_indices(w: torch.Tensor, mask: torch.Tensor | None, idx_present: torch.Tensor) -> torch.Tensor:
    """uint8 indices of ``w``'s shape; pruned positions get 0 (meaningless, see module doc)."""
    if mask is None:
        return idx_present.to(torch.uint8).reshape(w.shape)
    out = torch.zeros(w.shape, dtype=torch.uint8)
    out[mask] = idx_present.to(torch.uint8)
    return out


def _empty_fit(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nothing to fit (all pruned or all zero): the one-level codebook ``[0.]``."""
    return torch.zeros(1, dtype=_float_dtype(w)), torch.zeros(w.shape, dtype=torch.uint8)


def _float_dtype(w: torch.Tensor) -> torch.dtype:
    return w.dtype if w.is_floating_point() else torch.float32


def _check_mask(mask: torch.Tensor, like: torch.Tensor) -> None:
    if mask.dtype != torch.bool or mask.shape != like.shape:
        raise ConfigError(
            f"mask: {mask.dtype} of shape {list(mask.shape)} must be torch.bool of shape {list(like.shape)} "
            "(True = weight present)"
        )


def _check_bits(bits: int, lowest: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not lowest <= bits <= 8:
        raise ConfigError(
            f"bits: {bits!r} is outside {lowest}..8; codebook indices are stored as uint8, use e.g. 4 or 5"
        )


__all__ = [
    "KMEANS_INITS",
    "equal_population_codebook",
    "kmeans_codebook",
    "power_of_two_codebook",
    "decode",
    "centroid_gradients",
    "GRID_QMAX",
    "grid_scales",
    "snap_to_grid",
    "grid_codes",
    "decode_on_grid",
]
