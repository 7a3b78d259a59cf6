"""Sparse variational dropout (Molchanov, Ashukha, Vetrov, ICML 2017): a criterion that learns sparsity.

Every pruned weight w gets a learned noise variance sigma^2 (multiplicative Gaussian noise with
alpha = sigma^2 / w^2). Training maximises the variational lower bound: the data term plus the
KL divergence to the log-uniform prior, which pushes alpha up wherever the loss does not need
the weight. A weight whose log alpha exceeds ``threshold`` (3: dropout rate above 95 %) carries
only noise and is pruned. Unlike magnitude or Taylor scores, the sparsity per layer is not
chosen by hand: the KL term finds it (LeNet-5: 280x fewer weights in the paper).

The layers keep their class: the variance parameters and forward hooks are attached for the
training only and removed afterwards, so the model that comes back is the same ``nn.Module``
with trained weights and the scores (``threshold - log alpha``, > 0 = keep) go through
``prune`` like any criterion's: ``sparsity: None`` keeps exactly what was learned, a number
ranks weights by log alpha instead.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from deepshrink.core.config import check
from deepshrink.core.errors import ConfigError
from deepshrink.core.loops import TrainConfig, TrainFn, run_training
from deepshrink.pruning.api import _register_scores
from deepshrink.pruning.configs import PruningConfig
from deepshrink.pruning.scopes import layer_of

LOG_SIGMA2 = "deepshrink_log_sigma2"  # the parameter attached to each layer while it trains
_K1, _K2, _K3 = 0.63576, 1.87320, 1.48695  # Molchanov et al. 2017, eq. 14
_LOG_ALPHA_RANGE = (-10.0, 10.0)


@dataclass(frozen=True)
class VariationalDropout(PruningConfig):
    """Learn which weights to drop with sparse variational dropout, then prune them.

    ``sparsity``: None (default) prunes every weight with log alpha > ``threshold``; a number
    instead prunes that fraction, ranked by log alpha (``scope``, ``overrides`` apply).
    ``train``: the variational training (epochs, lr, batch size...; weights and variances are
    trained together, so the surviving weights come back already adapted; the last epoch's
    weights are kept whatever ``keep_best`` says). The loop is ``prune``'s ``train_fn``, called
    with ``penalty=`` (the KL term, a function of the training progress in [0, 1) to add to the
    loss): a loop of your own must take it.
    ``kl_weight``: the KL term's weight at the end of the warm-up, per training example (1 is
    the true lower bound; below 1 keeps more weights, above 1 prunes harder). The term grows
    with the number of weights and shrinks with the number of examples: a small dataset against
    a large model (1,000 digits, 266,200 weights) needs about 0.05, or it prunes everything.
    ``kl_warmup``: fraction of training over which the KL weight ramps linearly from 0.
    ``init_log_sigma2``: starting log variance (small: the pretrained network starts almost
    noise-free).
    """

    learns_sparsity: ClassVar[bool] = True

    sparsity: float | None = None
    threshold: float = 3.0
    train: TrainConfig = TrainConfig(epochs=20, lr=1e-3, batch_size=128, keep_best=False)
    kl_weight: float = 1.0
    kl_warmup: float = 0.3
    init_log_sigma2: float = -10.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.kl_weight > 0, "kl_weight", f"{self.kl_weight} must be > 0")
        check(0.0 <= self.kl_warmup <= 1.0, "kl_warmup", f"{self.kl_warmup} is outside [0, 1]")
        check(self.train.epochs >= 1, "train.epochs", "must be >= 1: the variances are learned by training")
        check(self.train.distill is None, "train.distill",
              "is not supported during variational training; distil in the stage's retrain instead")


def log_alpha(weight: torch.Tensor, log_sigma2: torch.Tensor) -> torch.Tensor:
    """log(sigma^2 / w^2), clipped to [-10, 10] as in the paper's code."""
    return (log_sigma2 - torch.log(weight * weight + 1e-16)).clamp(*_LOG_ALPHA_RANGE)


def kl_to_log_uniform(log_alpha_: torch.Tensor) -> torch.Tensor:
    """Summed KL(q(w | theta, alpha) || log-uniform prior), the paper's approximation (eq. 14),
    shifted so it is 0 as alpha -> infinity (the constant does not change the gradients)."""
    negative_kl = _K1 * torch.sigmoid(_K2 + _K3 * log_alpha_) - 0.5 * F.softplus(-log_alpha_) - _K1
    return -negative_kl.sum()


def _noisy_forward(module: nn.Module, x: torch.Tensor, weight_like: torch.Tensor) -> torch.Tensor:
    """The layer's linear map of ``x`` with ``weight_like`` in place of its weight, without bias."""
    if isinstance(module, nn.Linear):
        return F.linear(x, weight_like)
    return module._conv_forward(x, weight_like, None)


def _hook(module: nn.Module, inputs: tuple, output: torch.Tensor, *, threshold: float) -> torch.Tensor:
    x = inputs[0]
    log_sigma2 = getattr(module, LOG_SIGMA2)
    if module.training:
        # local reparameterisation: sample the pre-activations, not the weights (lower variance)
        variance = _noisy_forward(module, x * x, torch.exp(log_sigma2))
        return output + torch.sqrt(variance + 1e-8) * torch.randn_like(output)
    # evaluation: the weights the threshold would keep, so validation shows the pruned accuracy
    keep = (log_alpha(module.weight, log_sigma2) < threshold).to(module.weight.dtype)
    out = _noisy_forward(module, x, module.weight * keep)
    return out if module.bias is None else out + module.bias.view(1, -1, *([1] * (out.dim() - 2)))


def variational_scores(
    model: nn.Module, weights: Mapping[str, nn.Parameter], config: VariationalDropout, data,
    *, train_fn: TrainFn | None = None,
) -> dict[str, torch.Tensor]:
    """Train ``model`` in place with sparse variational dropout on ``weights`` (``train_fn``:
    ``core.loops``); return ``threshold - log alpha`` per weight (> 0 = keep). The model comes
    back without the variance parameters and hooks, in eval mode."""
    if data is None:
        raise ConfigError("VariationalDropout learns its scores by training: pass data=DataSplits(...)")
    if train_fn is None:
        run_training(None, model, data, config.train, who="VariationalDropout")   # raises, naming the fix
    modules = {name: model.get_submodule(layer_of(name)) for name in weights}
    for name, module in modules.items():
        if not isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            raise ConfigError(f"VariationalDropout: {layer_of(name)!r} is a {type(module).__name__}; it prunes "
                              "Linear and Conv layers only (leave it out of `layers`)")
    handles = []
    try:
        for module in modules.values():
            if hasattr(module, LOG_SIGMA2):
                raise ConfigError(f"VariationalDropout: {type(module).__name__} already has {LOG_SIGMA2!r}; "
                                  "a previous variational training did not clean up")
            module.register_parameter(LOG_SIGMA2, nn.Parameter(torch.full_like(module.weight, config.init_log_sigma2)))
            handles.append(module.register_forward_hook(lambda m, i, o: _hook(m, i, o, threshold=config.threshold)))
        examples = len(data.train)

        def penalty(progress_: float) -> torch.Tensor:
            ramp = min(progress_ / config.kl_warmup, 1.0) if config.kl_warmup > 0 else 1.0
            kl = sum(kl_to_log_uniform(log_alpha(m.weight, getattr(m, LOG_SIGMA2))) for m in modules.values())
            return (config.kl_weight * ramp / examples) * kl

        # the last epoch is kept: the one with the best validation accuracy is an early, dense one
        run_training(train_fn, model, data, replace(config.train, keep_best=False), who="VariationalDropout",
                     penalty=penalty)
        with torch.no_grad():
            return {name: config.threshold - log_alpha(m.weight, getattr(m, LOG_SIGMA2)).detach()
                    for name, m in modules.items()}
    finally:
        for handle in handles:
            handle.remove()
        for module in modules.values():
            if LOG_SIGMA2 in module._parameters:
                del module._parameters[LOG_SIGMA2]
        model.eval()


@_register_scores(VariationalDropout, name="variational")
def _variational(model, weights, config: VariationalDropout, data, train_fn) -> dict[str, torch.Tensor]:
    return variational_scores(model, weights, config, data, train_fn=train_fn)
