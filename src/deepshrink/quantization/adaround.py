"""AdaRound (Nagel et al. 2020, "Up or Down? Adaptive Rounding for Post-Training Quantization"):
learned up-or-down rounding of the int8 conv/linear weights of a converted PT2E graph.

Rounding every weight to its nearest grid point minimises each weight's own error, not the
layer's output error. AdaRound keeps each layer's grid (the weight observer's scale per channel,
unchanged) and learns, per weight, whether to take the grid point below or above: a continuous
relaxation ``w~ = s * clamp(floor(w / s) + h(V), qmin, qmax)`` with the rectified sigmoid ``h``,
``V`` initialised so ``h(V)`` is the fractional part of ``w / s`` (nearest rounding's starting
point), minimising ``||act(W~ x~ + b) - act(W x + b)||^2`` plus ``lambda * (1 - |2h - 1|^beta)``
over the weights (``beta`` annealed 20 -> 2 after a warm-up without it), which drives every ``h``
to 0 or 1 (the loss is normalised so its balance does not depend on the activations' size, see
``REGULARIZATION``).
``x~`` is the layer's input in the int8 model with the layers before it already re-rounded, ``x``
the float model's (the paper's asymmetric reconstruction); ``act`` is the ReLU or clip that follows
the layer when there is one (it is fused into the int8 kernel, so its clipped error is the error).

It works on the converted graph, not the prepared one: the integer codes are the ``get_attr``
constants ``convert_pt2e`` folded (``_frozen_paramN``, read through ``dequantize_per_channel``/
``dequantize_per_tensor``), so the chosen codes are written there directly. No weight observer
runs again and none can move a scale: the codes are exactly the ones learned, and what ONNX and
ExecuTorch export reads. The pass is layer-major like ``bias_correction.correct_layer_by_layer``
(each layer sees every calibration sample before the next layer runs): the float graph and the
int8 graph are interpreted in step, one layer at a time.

Each layer keeps the learned codes only if their reconstruction error on all calibration samples
is below nearest rounding's (so a layer never gets worse by its own measure); the whole result is
kept only if ``bias_correction.no_worse`` says the int8 model's top-1 agreement and SQNR against
the float model on the calibration samples did not drop.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator

import torch
from torch.fx import GraphModule, Node

from deepshrink.core import samples as S
from deepshrink.core.errors import ConfigError
from deepshrink.core.progress import progress
from deepshrink.quantization.bias_correction import channel_means, describe_fidelity, no_worse, output_fidelity
from deepshrink.quantization.equalization import RELU_TARGETS, clamp_bounds
from deepshrink.quantization.graph_passes import get_attr_tensor, set_attr_tensor, weighted_nodes
from deepshrink.quantization.quantizer import CLAMP_TARGETS, layer_name

log = logging.getLogger(__name__)

# the rectified sigmoid's stretch (Nagel et al. 2020, eq. 23): h reaches exactly 0 and 1
ZETA, GAMMA = 1.1, -0.1
# The loss is scale-free: the layer's mean squared error in units of nearest rounding's, plus
# REGULARIZATION times the penalty's mean over the weights. The paper's form (squared error plus
# 0.01 times the penalty's sum) ties the balance to the size of the activations: on a 64 -> 32
# linear layer with correlated inputs of order 1 on a 4-bit grid, 400 steps left h short of 0 and 1
# and the thresholded codes no better than nearest rounding (error ratio 1.00-1.01 of nearest's),
# with the same inputs 100x smaller 0.47-0.76; this form gives 0.46 and 0.47 (test_adaround.py).
# Steps and batch are sized for small nets on one core (mobile-cnn: 18 layers, 256 samples, 25-49 s
# on one thread of a shared 2-core machine); the paper runs 10,000 steps at lr 1e-3.
ITERATIONS = 400
BATCH_SIZE = 32
LEARNING_RATE = 3e-2
REGULARIZATION = 100.0
BETA_RANGE = (20.0, 2.0)
WARMUP = 0.2               # share of the iterations without the rounding penalty


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """``h(V) = clamp(sigmoid(V) * (ZETA - GAMMA) + GAMMA, 0, 1)``: 0 or 1 exactly at the ends, so
    the penalty can reach 0 and the gradient vanishes there."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def initial_logits(fraction: torch.Tensor) -> torch.Tensor:
    """``V`` with ``h(V) == fraction`` for ``fraction`` in ``[0, 1)`` (the fractional part of ``w / s``)."""
    p = (fraction - GAMMA) / (ZETA - GAMMA)
    return torch.log(p) - torch.log1p(-p)


def rounding_penalty(h: torch.Tensor, beta: float) -> torch.Tensor:
    """``mean(1 - |2h - 1|^beta)``: 0 when every ``h`` is 0 or 1; a large ``beta`` leaves ``h`` free
    except near 0 and 1, a small one pulls every ``h`` to its nearer end."""
    return (1 - (2 * h - 1).abs().pow(beta)).mean()


def beta_at(step: int, steps: int, *, warmup: float = WARMUP, beta_range: tuple[float, float] = BETA_RANGE) -> float | None:
    """The penalty's ``beta`` at ``step`` of ``steps``: ``None`` (no penalty) for the first
    ``warmup`` share, then linear from ``beta_range[0]`` to ``beta_range[1]`` at the last step."""
    first = int(warmup * steps)
    if step < first:
        return None
    start, end = beta_range
    return start + (end - start) * (step - first) / max(1, steps - 1 - first)


@torch.no_grad()
def mean_squared_error(layer: Callable, x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                       activation: Callable, chunk: int = 256) -> float:
    """Mean squared error per output element of ``activation(layer(x, weight))`` against ``target``
    over every sample of ``x``, in chunks of ``chunk`` samples."""
    total, count = 0.0, 0
    for start in range(0, x.shape[0], chunk):
        out = activation(layer(x[start:start + chunk], weight))
        total += float((out.double() - target[start:start + chunk].double()).pow(2).sum())
        count += out.numel()
    return total / max(count, 1)


def learn_rounding(weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int | torch.Tensor,
                   qmax: int | torch.Tensor,
                   layer: Callable, x: torch.Tensor, target: torch.Tensor, *, activation: Callable,
                   iterations: int = ITERATIONS, batch_size: int = BATCH_SIZE, lr: float = LEARNING_RATE,
                   regularization: float = REGULARIZATION, seed: int = 0) -> torch.Tensor:
    """Integer codes (a float tensor, ``weight``'s shape) of ``weight`` on the grid ``(code - zero_point)
    * scale`` (``scale``/``zero_point`` broadcastable to ``weight``), each ``floor`` or ``floor + 1`` of
    ``weight / scale + zero_point`` clamped to ``[qmin, qmax]``, chosen to bring ``activation(layer(x,
    w))`` close to ``target`` (``x``: ``[N, ...]`` inputs, ``target`` the float outputs for them).
    Mini-batches of ``batch_size`` samples are drawn with a generator seeded by ``seed``."""
    scaled = weight.detach() / scale + zero_point
    base = torch.floor(scaled)
    nearest = torch.clamp(torch.round(scaled), qmin, qmax)
    unit = mean_squared_error(layer, x, (nearest - zero_point) * scale, target, activation)
    if unit == 0:
        return nearest    # nothing to repair
    generator = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    with torch.enable_grad():   # whatever the caller's mode: this is training
        v = initial_logits(scaled - base).requires_grad_(True)
        optimizer = torch.optim.Adam([v], lr=lr)
        for step in range(iterations):
            pick = torch.randint(n, (min(batch_size, n),), generator=generator)
            h = rectified_sigmoid(v)
            soft = (torch.clamp(base + h, qmin, qmax) - zero_point) * scale
            loss = (activation(layer(x[pick], soft)) - target[pick]).pow(2).mean() / unit
            beta = beta_at(step, iterations)
            if beta is not None:
                loss = loss + regularization * rounding_penalty(h, beta)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    # h(V) >= 0.5 exactly where V >= 0: up
    return torch.clamp(base + (v.detach() >= 0).to(base.dtype), qmin, qmax)


def adaround(quantized: GraphModule, reference: GraphModule, batches: list, *, expected: list | None = None,
             iterations: int = ITERATIONS, batch_size: int = BATCH_SIZE) -> dict:
    """Re-round ``quantized``'s int8 conv/linear weight codes in place (AdaRound, see the module
    doc) toward ``reference`` (the float graph it was quantized from, same node names) on
    ``batches``; keep the result only if output fidelity against ``expected`` (default:
    ``reference``'s outputs) on ``batches`` does not drop.

    Returns ``{kept, fidelity_before, fidelity_after, iterations, batch_size, layers}``; ``layers``
    has per layer, in graph order, ``{layer, node, weights, changed_codes, learned_kept,
    error_before, error_after, seconds}``: ``error_*`` the mean squared error per output element
    (after the fused activation) against the float layer on every calibration sample, the input
    being the int8 model's with the layers before re-rounded, before = nearest rounding, after = the
    codes the layer keeps (the learned ones only if lower, so after <= before); ``changed_codes``:
    weights whose code differs from nearest rounding's (by exactly 1). Measured whatever was kept.
    """
    reference_names = {n.name for n in weighted_nodes(reference)}
    layers = [n for n in weighted_nodes(quantized) if _weight_codes(n) is not None and n.name in reference_names]
    names = [n.name for n in layers]
    if expected is None:
        expected = channel_means(reference, batches, [], desc="adaround: float reference")[1]
    nearest_outputs = channel_means(quantized, batches, [], desc="adaround: int8 before")[1]
    original = {n.name: get_attr_tensor(quantized, _weight_codes(n)).clone() for n in layers}
    rows = []
    floats = _layer_major(reference, batches, set(names))
    for index, (node, env) in enumerate(progress(_layer_major(quantized, batches, set(names)), "adaround: layer by layer",
                                                 total=len(names))):
        float_node, float_env = next(floats)
        if float_node.name != node.name:
            raise ConfigError(f"adaround: the int8 graph reaches layer {node.name} where the float graph reaches "
                              f"{float_node.name}; pass the float graph the int8 one was converted from")
        rows.append(_round_layer(quantized, node, env, reference, float_node, float_env,
                                 iterations=iterations, batch_size=batch_size, seed=index))
    floats.close()
    fidelity_before = output_fidelity(expected, nearest_outputs)
    fidelity_after = output_fidelity(expected, channel_means(quantized, batches, [], desc="adaround: int8 after")[1])
    kept = no_worse(fidelity_after, fidelity_before)
    if not kept:
        for node in layers:
            set_attr_tensor(quantized, _weight_codes(node), original[node.name])
    log.info("adaround %s: int8 %s with it, %s with nearest rounding, on %d calibration samples (%d of %d layers re-rounded)",
             "kept" if kept else "dropped (it lowered fidelity)", describe_fidelity(fidelity_after), describe_fidelity(fidelity_before),
             sum(S.batch_size(x) for x in batches), sum(r["learned_kept"] for r in rows), len(rows))
    return {"kept": kept, "fidelity_before": fidelity_before, "fidelity_after": fidelity_after,
            "iterations": iterations, "batch_size": batch_size, "layers": rows}


def _round_layer(gm: GraphModule, node: Node, env: dict, reference: GraphModule, float_node: Node, float_env: dict, *,
                 iterations: int, batch_size: int, seed: int) -> dict:
    """Learn ``node``'s codes on the inputs in ``env`` against the float layer's outputs, keep them
    if they reconstruct better than the current (nearest) codes, and put the kept weight in ``env``."""
    started = time.perf_counter()
    dequantize = node.args[1]
    codes_node = _weight_codes(node)
    nearest = get_attr_tensor(gm, codes_node)
    scale, zero_point, qmin, qmax = _grid(gm, dequantize, env, nearest)
    qmin, qmax = _channel_bounds(gm, node, nearest, qmin, qmax)
    activation = _fused_activation(node)
    x = torch.cat(env[node.args[0]]).detach()
    with torch.no_grad():
        float_x = torch.cat(float_env[float_node.args[0]])
        float_layer = _bound_layer(reference, float_node, float_env)
        weight = _value(reference, float_node.args[1], float_env).detach().float()
        target = torch.cat([activation(float_layer(float_x[i:i + 256], weight)) for i in range(0, float_x.shape[0], 256)])
    layer = _bound_layer(gm, node, env)
    dequantize_codes = _dequantizer(gm, dequantize, env)
    learned = learn_rounding(weight, scale, zero_point, qmin, qmax, layer, x, target, activation=activation,
                             iterations=iterations, batch_size=batch_size, seed=seed).to(nearest.dtype)
    error_before = mean_squared_error(layer, x, dequantize_codes(nearest), target, activation)
    error_learned = mean_squared_error(layer, x, dequantize_codes(learned), target, activation)
    learned_kept = error_learned < error_before
    if learned_kept:
        set_attr_tensor(gm, codes_node, learned)
        env[dequantize] = [dequantize_codes(learned)] * len(env[dequantize])
    chosen = learned if learned_kept else nearest
    return {
        "layer": layer_name(node), "node": node.name, "weights": nearest.numel(),
        "changed_codes": int((chosen.to(torch.int32) != nearest.to(torch.int32)).sum()), "learned_kept": learned_kept,
        "error_before": error_before, "error_after": error_learned if learned_kept else error_before,
        "seconds": round(time.perf_counter() - started, 3),
    }


def _channel_bounds(gm: GraphModule, layer: Node, codes: torch.Tensor, qmin: int, qmax: int):
    """``(qmin, qmax)``, per output channel where a guarded layout narrowed some of ``layer``'s
    channels to 7 bits (``quantization.weight_range``): re-rounding must not take them out again."""
    from deepshrink.quantization.weight_range import NARROW, narrowed_channels

    mask = narrowed_channels(gm, layer.name)
    if mask is None or not bool(mask.any()):
        return qmin, qmax
    shape = (-1,) + (1,) * (codes.dim() - 1)
    low = torch.where(mask, torch.tensor(-NARROW), torch.tensor(qmin)).reshape(shape).to(torch.float32)
    high = torch.where(mask, torch.tensor(NARROW), torch.tensor(qmax)).reshape(shape).to(torch.float32)
    return low, high


def _weight_codes(layer: Node) -> Node | None:
    """The ``get_attr`` node of ``layer``'s integer weight codes, when its weight is a folded
    int8 constant read through a dequantize node; otherwise ``None``."""
    weight = layer.args[1] if len(layer.args) > 1 else None
    if not (isinstance(weight, Node) and weight.op == "call_function" and "dequantize" in str(weight.target)):
        return None
    codes = weight.args[0]
    return codes if isinstance(codes, Node) and codes.op == "get_attr" else None


def _value(gm: GraphModule, arg, env: dict):
    """A node argument's value: a constant read from ``gm`` (the layer-major pass drops a value
    after its last use), a computed one from ``env`` for the first batch (a layer's parameters
    are the same for every batch)."""
    if not isinstance(arg, Node):
        return arg
    return get_attr_tensor(gm, arg) if arg.op == "get_attr" else env[arg][0]


def _grid(gm: GraphModule, dequantize: Node, env: dict, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """``(scale, zero_point, qmin, qmax)`` of a ``dequantize_per_channel``/``dequantize_per_tensor``
    node, the first two shaped to broadcast against the weight ``codes``."""
    args = [_value(gm, a, env) for a in dequantize.args]
    if "per_channel" in str(dequantize.target):
        _, scale, zero_point, axis, qmin, qmax = args[:6]
        shape = [1] * codes.dim()
        shape[axis % codes.dim()] = -1
        scale = torch.as_tensor(scale, dtype=torch.float32).reshape(shape)
        zero_point = torch.as_tensor(zero_point).to(torch.float32).reshape(shape)
    elif "per_tensor" in str(dequantize.target):
        _, scale, zero_point, qmin, qmax = args[:5]
        scale = torch.as_tensor(scale, dtype=torch.float32).reshape(())
        zero_point = torch.as_tensor(zero_point).to(torch.float32).reshape(())
    else:
        raise ConfigError(f"adaround: cannot read the weight grid of {dequantize.name} ({dequantize.target}); "
                          "only per-tensor and per-channel int8 weights can be re-rounded (use rounding='nearest')")
    return scale, zero_point, int(qmin), int(qmax)


def _dequantizer(gm: GraphModule, dequantize: Node, env: dict) -> Callable[[torch.Tensor], torch.Tensor]:
    """The graph's own dequantize op with its own arguments, applied to other codes: the weight the
    int8 graph (and the runtimes) will compute from them, bit for bit."""
    rest = [_value(gm, a, env) for a in dequantize.args[1:]]
    kwargs = {k: _value(gm, v, env) for k, v in dequantize.kwargs.items()}
    return lambda codes: dequantize.target(codes, *rest, **kwargs)


def _bound_layer(gm: GraphModule, node: Node, env: dict) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``(x, weight) -> node's op`` with its other arguments (bias, stride, ...) as in the graph."""
    # detached: the bias is a Parameter of the graph, and training the rounding must not give it a .grad
    detach = lambda v: v.detach() if isinstance(v, torch.Tensor) else v  # noqa: E731
    rest = [detach(_value(gm, a, env)) for a in node.args[2:]]
    kwargs = {k: detach(_value(gm, v, env)) for k, v in node.kwargs.items()}
    return lambda x, weight: node.target(x, weight, *rest, **kwargs)


def _fused_activation(node: Node) -> Callable[[torch.Tensor], torch.Tensor]:
    """The ReLU or clip applied to ``node``'s output when it is the output's only reader (the
    int8 kernel fuses it), as an out-of-place function; otherwise the identity."""
    users = list(node.users)
    if len(users) == 1 and users[0].op == "call_function":
        user = users[0]
        if user.target in RELU_TARGETS:
            return torch.relu
        if user.target in CLAMP_TARGETS:
            low, high = clamp_bounds(user)
            return lambda y: torch.clamp(y, low, high)
    return lambda y: y


def _layer_major(gm: GraphModule, batches: list, stops: set[str]) -> Iterator[tuple[Node, dict]]:
    """Interpret ``gm`` one node at a time over every batch (layer-major); before running each node
    named in ``stops`` yield ``(node, env)``, ``env`` mapping each live node to its per-batch values
    (the caller may replace values in it, e.g. a re-rounded weight). Ends after the last stop."""
    interpreter = torch.fx.Interpreter(gm)
    chunks = [S.flatten(x) for x in batches]
    order = list(gm.graph.nodes)
    last_use = {arg: i for i, node in enumerate(order) for arg in node.all_input_nodes}
    env: dict = {}
    remaining, placeholders = set(stops), 0
    # no grad-mode context spans a yield: two of these run interleaved, and the caller trains
    for i, node in enumerate(order):
        if not remaining or node.op == "output":
            return
        if node.op == "placeholder":
            env[node] = [c[placeholders] for c in chunks]
            placeholders += 1
        elif node.op == "get_attr":
            env[node] = [interpreter.fetch_attr(node.target)] * len(chunks)
        else:
            if node.name in remaining:
                remaining.discard(node.name)
                yield node, env
            run = getattr(interpreter, node.op)
            with torch.no_grad():
                env[node] = [run(node.target, *torch.fx.node.map_arg((node.args, node.kwargs), lambda n: env[n][c]))
                             for c in range(len(chunks))]
        for arg in node.all_input_nodes:
            if last_use[arg] == i:
                del env[arg]
