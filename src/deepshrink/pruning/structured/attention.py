"""Find the prunable units of a transformer: attention heads and feed-forward neurons, by convention.

A *block* is one attention module (its units are heads) or one feed-forward pair (its units are
the hidden neurons). Each block lists the weight slices coupled to every unit (``UnitSlice``), so
scoring and masking are generic; only the surgery that narrows the layers (``heads``) knows the
convention. Recognised, by the module's children and attributes (no trace needed):

- attention with named projections: Linear children ``query``/``key``/``value`` (Hugging Face
  BERT, RoBERTa, ViT...) or ``q_proj``/``k_proj``/``v_proj`` (BART, OPT, LLaMA-style without
  grouped-query attention), and an int ``num_attention_heads`` or ``num_heads``; head size
  ``attention_head_size`` or ``head_dim`` (else out features / heads). The output projection is
  the module's own ``o_proj``/``out_proj`` child, else its parent's ``output.dense`` (HF
  ``BertAttention`` -> ``BertSelfOutput.dense``). The forward must reshape heads with the
  attributes (``num_attention_heads``, ``all_head_size``, ``num_heads``), ``-1`` or the
  projections' widths, which pruning updates;
- ``nn.MultiheadAttention`` (packed or separate q/k/v weights, without ``add_bias_kv`` /
  ``add_zero_attn``): pruning replaces it by ``mha.PrunedMultiheadAttention``;
- feed-forward: Linear pairs ``intermediate.dense`` -> ``output.dense`` (HF BERT), ``fc1`` ->
  ``fc2``, ``linear1`` -> ``linear2`` (``nn.TransformerEncoderLayer``), ``up_proj`` ->
  ``down_proj`` with an optional gate ``gate_proj`` (LLaMA MLP), the first's outputs the second's
  inputs; what lies between must act on every neuron alone (GELU, ReLU, dropout, a gate product).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from deepshrink.core.errors import ConfigError
from deepshrink.core.selection import matches

CONVENTIONS = ("attention: children query/key/value or q_proj/k_proj/v_proj with num_attention_heads or num_heads, "
               "output o_proj/out_proj or the parent's output.dense; nn.MultiheadAttention; feed-forward: "
               "intermediate.dense->output.dense, fc1->fc2, linear1->linear2, up_proj(+gate_proj)->down_proj")
_PROJECTIONS = (("query", "key", "value"), ("q_proj", "k_proj", "v_proj"))
_HEAD_COUNTS = ("num_attention_heads", "num_heads")
_HEAD_SIZES = ("attention_head_size", "head_dim")
_OWN_OUTPUTS = ("o_proj", "out_proj")
_FEED_FORWARD = (("intermediate.dense", "output.dense", None), ("fc1", "fc2", None), ("linear1", "linear2", None),
                 ("up_proj", "down_proj", "gate_proj"))


@dataclass(frozen=True)
class UnitSlice:
    """Indices ``dim`` of ``module.param`` carry units: index ``i`` belongs to unit
    ``(i % period) // unit_size`` (``period``: the length of one of q/k/v in a packed tensor)."""

    module: str
    param: str
    dim: int
    unit_size: int = 1
    period: int | None = None

    def unit_of(self, length: int) -> torch.Tensor:
        index = torch.arange(length)
        if self.period is not None:
            index = index % self.period
        return index // self.unit_size


@dataclass(frozen=True)
class Block:
    """One attention module (units = heads) or feed-forward pair (units = neurons).

    ``roles``: qualified names of the modules it narrows (``query``/``key``/``value``/``output``,
    ``mha``, or ``up``/``down``/``gate``); ``convention``: ``"projections"``, ``"mha"`` or ``"ffn"``.
    """

    name: str
    kind: Literal["heads", "neurons"]
    convention: str
    units: int
    unit_size: int
    roles: dict[str, str] = field(default_factory=dict)
    slices: tuple[UnitSlice, ...] = ()

    def members(self) -> list[str]:
        return list(dict.fromkeys(self.roles.values()))


def find_blocks(model: nn.Module) -> list[Block]:
    """Every recognised attention and feed-forward block of ``model``, in module order."""
    blocks: list[Block] = []
    for name, module in model.named_modules():
        attention = _attention(model, name, module)
        if attention is not None:
            blocks.append(attention)
        ffn = _feed_forward(name, module)
        if ffn is not None:
            blocks.append(ffn)
    return blocks


def why_not_a_block(model: nn.Module, name: str) -> str:
    """Why module ``name`` is not a prunable block (for the error a user sees)."""
    module = model.get_submodule(name)
    for trio in _PROJECTIONS:
        if all(isinstance(getattr(module, c, None), nn.Linear) for c in trio):
            reason = _attention_problem(model, name, module, trio)
            if reason:
                return reason
    if isinstance(module, nn.MultiheadAttention):
        return _mha_problem(module) or "an unsupported nn.MultiheadAttention"
    return f"a {type(module).__name__}, neither an attention block nor a feed-forward"


def _child(module: nn.Module, path: str) -> nn.Module | None:
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _head_count(module: nn.Module) -> int | None:
    for attr in _HEAD_COUNTS:
        value = getattr(module, attr, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _output_of(model: nn.Module, name: str, module: nn.Module) -> str | None:
    for child in _OWN_OUTPUTS:
        if isinstance(getattr(module, child, None), nn.Linear):
            return _join(name, child)
    parent = name.rpartition(".")[0]
    if name and isinstance(_child(model.get_submodule(parent) if parent else model, "output.dense"), nn.Linear):
        return _join(parent, "output.dense")
    return None


def _attention_problem(model: nn.Module, name: str, module: nn.Module, trio: tuple[str, ...]) -> str | None:
    q, k, v = (getattr(module, c) for c in trio)
    heads = _head_count(module)
    if heads is None:
        return f"has {'/'.join(trio)} but no int {' or '.join(_HEAD_COUNTS)} attribute"
    if heads < 1 or q.out_features % heads:
        return f"has {heads} heads, which do not divide {trio[0]}'s {q.out_features} outputs"
    kv_heads = getattr(module, "num_key_value_heads", heads)
    if kv_heads != heads or k.out_features != q.out_features or v.out_features != q.out_features:
        return "uses grouped-query attention (fewer key/value heads), which is not supported"
    size = _head_size(module, q, heads)
    if size * heads != q.out_features:
        return f"has {heads} heads of size {size}, which do not make {trio[0]}'s {q.out_features} outputs"
    out = _output_of(model, name, module)
    if out is None:
        return f"has {'/'.join(trio)} but no output projection (a child o_proj/out_proj or the parent's output.dense)"
    if model.get_submodule(out).in_features != q.out_features:
        return f"its output projection {out} takes {model.get_submodule(out).in_features} inputs, not {q.out_features}"
    return None


def _head_size(module: nn.Module, query: nn.Linear, heads: int) -> int:
    for attr in _HEAD_SIZES:
        value = getattr(module, attr, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return query.out_features // heads


def _attention(model: nn.Module, name: str, module: nn.Module) -> Block | None:
    if isinstance(module, nn.MultiheadAttention):
        return _mha(name, module) if _mha_problem(module) is None else None
    for trio in _PROJECTIONS:
        if not all(isinstance(getattr(module, c, None), nn.Linear) for c in trio):
            continue
        if _attention_problem(model, name, module, trio) is not None:
            return None
        heads = _head_count(module)
        size = _head_size(module, getattr(module, trio[0]), heads)
        out = _output_of(model, name, module)
        roles = {role: _join(name, child) for role, child in zip(("query", "key", "value"), trio)}
        roles["output"] = out
        slices = [UnitSlice(_join(name, child), p, 0, size) for child in trio for p in ("weight", "bias")
                  if getattr(getattr(module, child), p) is not None]
        slices.append(UnitSlice(out, "weight", 1, size))
        return Block(name, "heads", "projections", heads, size, roles, tuple(slices))
    return None


def _mha_problem(module: nn.MultiheadAttention) -> str | None:
    if module.bias_k is not None or module.bias_v is not None:
        return "an nn.MultiheadAttention with add_bias_kv=True, which is not supported"
    if module.add_zero_attn:
        return "an nn.MultiheadAttention with add_zero_attn=True, which is not supported"
    return None


def _mha(name: str, module: nn.MultiheadAttention) -> Block:
    size, embed = module.head_dim, module.embed_dim
    if module._qkv_same_embed_dim:
        slices = [UnitSlice(name, "in_proj_weight", 0, size, period=embed)]
    else:
        slices = [UnitSlice(name, p, 0, size) for p in ("q_proj_weight", "k_proj_weight", "v_proj_weight")]
    if module.in_proj_bias is not None:
        slices.append(UnitSlice(name, "in_proj_bias", 0, size, period=embed))
    slices.append(UnitSlice(_join(name, "out_proj"), "weight", 1, size))
    return Block(name, "heads", "mha", module.num_heads, size, {"mha": name, "output": _join(name, "out_proj")}, tuple(slices))


def _feed_forward(name: str, module: nn.Module) -> Block | None:
    for up_path, down_path, gate_path in _FEED_FORWARD:
        up, down = _child(module, up_path), _child(module, down_path)
        if not (isinstance(up, nn.Linear) and isinstance(down, nn.Linear)) or up.out_features != down.in_features:
            continue
        paths = {"up": up_path, "down": down_path}
        gate = _child(module, gate_path) if gate_path else None
        if isinstance(gate, nn.Linear) and gate.out_features == up.out_features:
            paths["gate"] = gate_path
        roles = {role: _join(name, path) for role, path in paths.items()}
        slices = [UnitSlice(roles[r], p, 0) for r in ("up", "gate") if r in paths for p in ("weight", "bias")
                  if getattr(_child(module, paths[r]), p) is not None]
        slices.append(UnitSlice(roles["down"], "weight", 1))
        return Block(name, "neurons", "ffn", up.out_features, 1, roles, tuple(slices))
    return None


def _aliases(block: Block) -> set[str]:
    """Names that select ``block``: its own, its ancestors', its members' and theirs up to the block's parent."""
    names = set()
    for full in (block.name, *block.members()):
        parts = full.split(".")
        names.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return names


def select_blocks(model: nn.Module, blocks: list[Block], layers: tuple[str, ...], skip: tuple[str, ...],
                  *, who: str = "TransformerPruning") -> list[Block]:
    """The blocks ``layers`` (empty: all) chooses, less those ``skip`` names. A pattern selects a block
    when it matches the block's name, a member's, or an ancestor's (``encoder.layer.0`` selects both
    blocks of that layer). A pattern that selects nothing is a ``ConfigError`` naming the module."""
    if not blocks:
        raise ConfigError(f"{who}: found no attention block or feed-forward in {type(model).__name__}; "
                          f"recognised conventions: {CONVENTIONS}")
    aliases = {b.name: _aliases(b) for b in blocks}

    def chosen(patterns: tuple[str, ...], key: str) -> set[str]:
        hits: set[str] = set()
        for pattern in patterns:
            found = {b.name for b in blocks if any(matches(pattern, a) for a in aliases[b.name])}
            if not found:
                raise ConfigError(f"{who}.{key}: {_not_a_block(model, pattern, blocks)}")
            hits |= found
        return hits

    keep = chosen(layers, "layers") if layers else {b.name for b in blocks}
    keep -= chosen(skip, "skip")
    return [b for b in blocks if b.name in keep]


def _not_a_block(model: nn.Module, pattern: str, blocks: list[Block]) -> str:
    found = ", ".join(f"{b.name} ({b.kind})" for b in blocks)
    modules = dict(model.named_modules())
    if pattern in modules:
        return (f"{pattern!r} is {why_not_a_block(model, pattern)}; recognised: {CONVENTIONS}; "
                f"the blocks found are {found}")
    return f"{pattern!r} matches no attention block or feed-forward; the blocks found are {found}"
