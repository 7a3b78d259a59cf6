"""Importance criteria: each returns one score per weight, higher = more important.

A criterion is a small callable ``(weights: {name: Parameter}) -> {name: scores}``; scoring,
selecting (``ops.masks``) and applying (``core.masks``) are separate steps.
"""
from __future__ import annotations

from typing import Mapping

import torch


def magnitude_scores(weights: Mapping[str, torch.Tensor], norm: str = "l1") -> dict[str, torch.Tensor]:
    power = 1 if norm == "l1" else 2
    return {n: w.detach().abs().pow(power) for n, w in weights.items()}
