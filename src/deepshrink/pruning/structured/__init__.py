"""Structured (channel) pruning: remove whole channels so layers, files and latency really shrink.

``deepshrink.prune(model, ChannelPruning(ratio=0.5), example_input=x)`` traces the model, finds
every slice coupled to each output channel (next layers' inputs, BatchNorm, residual additions,
concatenations, depthwise convolutions, flatten into a Linear), scores the coupled groups,
rounds kept widths to the target's channel multiple and replaces the layers with smaller ones.
The steps are public on their own: ``analyze_channels``, the criteria in ``importance``,
``round_channels`` / ``local_counts`` / ``global_counts`` / ``top_channels``, and
``ChannelPlan`` with ``mask_channels`` (zeros, the reference) and ``shrink_channels``.
``remove_dead_channels`` cuts out, exactly, the units that unstructured pruning left unread.

Transformers: ``prune(model, TransformerPruning(heads=1, ffn=0.25), example_input=x)`` removes
whole attention heads and feed-forward neurons, found by convention (``attention``), scored in
``unit_scores``, applied by ``heads.shrink_units`` (``heads.mask_units``: the zeros reference);
``TransformerReport`` lists heads / neurons before -> after and per-block sensitivity.
"""
from deepshrink.pruning.structured.api import ShrinkError, StructuredReport, prune_channels, shrink_model
from deepshrink.pruning.structured.configs import ChannelPruning, TransformerPruning
from deepshrink.pruning.structured.dead import live_channels, remove_dead_channels
from deepshrink.pruning.structured.dependency import UnprunableLayerWarning, analyze_channels, describe_unsupported
from deepshrink.pruning.structured.graph import ChannelGraph, ChannelGroup, ParamSlice
from deepshrink.pruning.structured.importance import bn_scale_scores, magnitude_scores, taylor_scores
from deepshrink.pruning.structured.shrink import ChannelPlan, mask_channels, shrink_channels
from deepshrink.pruning.structured.widths import global_counts, local_counts, round_channels, top_channels
from deepshrink.pruning.structured.attention import Block, UnitSlice, find_blocks, select_blocks
from deepshrink.pruning.structured.heads import mask_units, shrink_units
from deepshrink.pruning.structured.mha import PrunedMultiheadAttention
from deepshrink.pruning.structured.transformer import (TransformerReport, block_sensitivity, output_change,
                                                        prune_transformer)  # registers TransformerPruning with prune

__all__ = [
    "ChannelPruning", "shrink_model", "prune_channels", "remove_dead_channels", "live_channels", "StructuredReport", "ShrinkError", "UnprunableLayerWarning",
    "analyze_channels", "describe_unsupported", "ChannelGraph", "ChannelGroup", "ParamSlice",
    "magnitude_scores", "bn_scale_scores", "taylor_scores",
    "ChannelPlan", "mask_channels", "shrink_channels",
    "round_channels", "local_counts", "global_counts", "top_channels",
    "TransformerPruning", "TransformerReport", "prune_transformer", "block_sensitivity", "output_change",
    "find_blocks", "select_blocks", "Block", "UnitSlice", "mask_units", "shrink_units", "PrunedMultiheadAttention",
]
