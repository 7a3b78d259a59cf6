"""Capturing a model as a ``torch.export`` graph with a dynamic batch dimension.

Quantization (PT2E) and every exporter start from this graph, so they all agree on it.
"""
from __future__ import annotations

import torch
from torch import nn

from deepshrink.core.errors import ExportError


def capture(model: nn.Module, example_input: torch.Tensor, *, max_batch: int = 1024) -> torch.export.ExportedProgram:
    """``torch.export`` of ``model`` with the batch dimension free in ``[1, max_batch]``."""
    # an example batch of 2: torch.export specialises dimensions of size 1
    example = example_input[:1].expand(2, *example_input.shape[1:]).contiguous()
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    try:
        if hasattr(model, "eval"):
            try:
                model.eval()
            except NotImplementedError:  # exported graph modules cannot switch modes
                pass
        return torch.export.export(model, (example,), dynamic_shapes=({0: batch},), strict=False)
    except Exception as err:  # torch.export raises many types; name the cause in one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ExportError(f"torch.export could not capture {type(model).__name__}: {first}") from err
