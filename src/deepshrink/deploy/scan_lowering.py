"""Lowering ``scan`` loops (the time loop of a recurrent cell, ``deploy.recurrent``) into XNNPACK.

ExecuTorch 1.5.1 runs ``torch.ops.higher_order.scan`` as a loop of its own instructions around
one step's graph (the scan body), so a cell over any number of frames is one step in the file.
Three things keep that body from XNNPACK as the stock lowering stands, and this module supplies them:

- XNNPACK's partitioner tags the top-level graph only; ``ScanPartitioner`` also runs it on each
  scan body (the backend API lowers tagged nodes in bodies already).
- A body reads the cell's weights as inputs of the loop (``torch.export`` lifts what the step
  function closes over), and XNNPACK's linear takes only constant weights: ``constants_into_bodies``
  makes each such input that is a constant of the program a constant of the body, and drops the
  copy a step makes of its new state (``scan`` forbids a step's outputs aliasing each other;
  XNNPACK refuses a delegate output that is also its input).
- The program then still lists those weights as its own, unused: ``drop_unused_constants`` removes
  them before serialization, so the file stores each weight once (in the delegate).

The weights' linear must also survive decomposition inside a body, where its weight is still a loop
input: ``ScanPartitioner.ops_to_not_decompose`` keeps it when that input is a program constant (so
the rewrite above makes it a constant XNNPACK takes; any other linear is decomposed as usual).
"""
from __future__ import annotations

import copy

import torch
from torch.export.graph_signature import InputKind

_CONSTANT_KINDS = (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)
_SCAN = torch.ops.higher_order.scan


def has_scan(program: torch.export.ExportedProgram) -> bool:
    return any(n.op == "call_function" and n.target is _SCAN for n in program.graph_module.graph.nodes)


def program_constants(program: torch.export.ExportedProgram) -> dict[str, torch.Tensor]:
    """The program's parameters, buffers and constant tensors, by the name of their placeholder."""
    out = {}
    for spec in program.graph_signature.input_specs:
        if spec.kind in _CONSTANT_KINDS and spec.target is not None:
            tensor = program.state_dict.get(spec.target)
            out[spec.arg.name] = tensor if tensor is not None else program.constants[spec.target]
    return out


def _scan_bodies(graph_module: torch.fx.GraphModule):
    """``(body graph module, [(body placeholder, outer argument)] of its loop-invariant inputs, scan node)``."""
    for node in graph_module.graph.nodes:
        if node.op == "call_function" and node.target is _SCAN:
            body = getattr(graph_module, node.args[0].target)
            _, init, xs, extra = node.args
            inputs = [n for n in body.graph.nodes if n.op == "placeholder"][len(init) + len(xs):]
            yield body, list(zip(inputs, extra)), node


def constants_into_bodies(constants: dict[str, torch.Tensor]):
    """A transform pass (``to_edge_transform_and_lower(transform_passes=...)``): in every scan body,
    each loop-invariant input that is one of ``constants`` (by placeholder name) becomes a constant
    of the body, and a copy whose only use is the body's output is dropped."""
    from torch.fx.passes.infra.pass_base import PassResult

    def run(graph_module: torch.fx.GraphModule) -> PassResult:
        changed = False
        for body, inputs, node in list(_scan_bodies(graph_module)):
            kept = []
            for placeholder, outer in inputs:
                if not (isinstance(outer, torch.fx.Node) and outer.op == "placeholder" and outer.name in constants):
                    kept.append(outer)
                    continue
                name = f"_deepshrink_{placeholder.name}"
                body.register_buffer(name, constants[outer.name])
                with body.graph.inserting_before(placeholder):
                    attr = body.graph.get_attr(name)
                attr.meta = dict(placeholder.meta)
                placeholder.replace_all_uses_with(attr)
                body.graph.erase_node(placeholder)
                changed = True
            node.args = (*node.args[:3], kept)
            output = next(n for n in body.graph.nodes if n.op == "output")
            for copy_node in [n for n in body.graph.nodes if n.op == "call_function" and "clone" in str(n.target)]:
                if set(copy_node.users) == {output}:
                    copy_node.replace_all_uses_with(copy_node.args[0])
                    body.graph.erase_node(copy_node)
                    changed = True
            body.recompile()
        graph_module.recompile()
        return PassResult(graph_module, changed)

    return run


def drop_unused_constants(program: torch.export.ExportedProgram) -> int:
    """Remove, in place, the parameters, buffers and constants no node of ``program`` reads any more
    (moved into scan bodies, and from there into delegates). Returns how many."""
    graph = program.graph_module.graph
    placeholders = {n.name: n for n in graph.nodes if n.op == "placeholder"}
    mutated = {spec.target for spec in program.graph_signature.output_specs}
    dropped = 0
    for spec in list(program.graph_signature.input_specs):
        node = placeholders.get(spec.arg.name)
        if spec.kind not in _CONSTANT_KINDS or node is None or node.users or spec.target in mutated:
            continue
        program.graph_signature.input_specs.remove(spec)
        (program._state_dict if spec.target in program.state_dict else program._constants).pop(spec.target)
        graph.erase_node(node)
        dropped += 1
    program.graph_module.recompile()
    return dropped


def scan_partitioner(make_partitioner, constants: dict[str, torch.Tensor]):
    """A partitioner that tags what ``make_partitioner()`` tags in the program and in each of its
    scan bodies (see the module docstring)."""
    from executorch.exir.backend.partitioner import Partitioner, PartitionResult

    class ScanPartitioner(Partitioner):
        def __init__(self) -> None:
            self.top = make_partitioner()
            super().__init__(self.top.delegation_spec)

        def ops_to_not_decompose(self, ep):
            ops, keep = self.top.ops_to_not_decompose(ep)
            constant_inputs = {placeholder for _, inputs, _ in _scan_bodies(ep.graph_module) for placeholder, outer in inputs
                               if isinstance(outer, torch.fx.Node) and outer.name in constants}

            def keep_in_bodies(node: torch.fx.Node) -> bool:
                if node.target is torch.ops.aten.linear.default and node.graph is not ep.graph_module.graph:
                    weight = node.args[1]
                    while isinstance(weight, torch.fx.Node) and weight.op == "call_function" and "dequantize" in str(weight.target):
                        weight = weight.args[0]
                    return weight in constant_inputs
                return bool(keep(node)) if keep is not None else False
            return ops, keep_in_bodies

        def partition(self, ep):
            tags = dict(self.top.partition(ep).partition_tags)
            for k, (body, _, _) in enumerate(_scan_bodies(ep.graph_module)):
                view = copy.copy(ep)   # the program seen through one body: what the configs read of it
                view._graph_module = body
                for tag, spec in make_partitioner().partition(view).partition_tags.items():
                    for n in body.graph.nodes:
                        if n.meta.get("delegation_tag") == tag:
                            n.meta["delegation_tag"] = f"scan{k}_{tag}"
                    tags[f"scan{k}_{tag}"] = spec
            return PartitionResult(tagged_exported_program=ep, partition_tags=tags)

    return ScanPartitioner()
