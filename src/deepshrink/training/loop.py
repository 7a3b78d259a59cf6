"""One training loop for training from scratch and for fine-tuning after compression.

Pruning masks need nothing from this loop: the module holds them (``core.masks``, a
parametrization), so pruned weights read as exactly zero and get no gradient in any loop.
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from deepshrink.core import samples as S
from deepshrink.core.errors import ConfigError
from deepshrink.core.io import atomic_path
from deepshrink.core.progress import progress as progress_bar
from deepshrink.core.outputs import output_kind, primary
from deepshrink.data.splits import NO_LABEL, DataSplits
from deepshrink.training import distributed
from deepshrink.core.loops import Distillation, History, TrainConfig


@torch.no_grad()
def accuracy(model: nn.Module, loader: DataLoader, *, reference: nn.Module | None = None) -> float:
    """Top-1 accuracy in [0, 1] of ``model`` over ``loader``; without labels, its agreement with
    ``reference`` (the original model) — the fidelity every unlabelled figure is: top-1 agreement
    when the reference's first output is a classifier's scores, else the mean cosine similarity of
    each sample's output with the reference's (embeddings, hidden states: ``core.outputs.output_kind``),
    so a budget in points bounds the change of what the model returns, not of an argmax over features."""
    with evaluating(model, reference):
        return _accuracy(model, loader, reference)


def _accuracy(model: nn.Module, loader: DataLoader, reference: nn.Module | None) -> float:
    score = total = 0.0
    device = _device_of(model)
    for x, y in loader:
        if device.type != "cpu":   # a model fit is training on a GPU
            x, y = S.map_tensors(lambda t: t.to(device), x), y.to(device)
        produced = primary(S.call(model, x))
        if bool((y == NO_LABEL).any()):
            if reference is None:
                raise ConfigError("accuracy: the data has no labels; pass reference= (the original model) to measure "
                                  "its agreement with it instead")
            expected = primary(S.call(reference, x))
            if output_kind(expected) != "classification":
                rows = len(expected) if expected.ndim else 1
                cosine = F.cosine_similarity(produced.reshape(rows, -1).float(), expected.reshape(rows, -1).float(), dim=-1)
                score, total = score + float(cosine.sum()), total + rows
                continue
            y = expected.argmax(-1)
        score += int((produced.argmax(-1) == y).sum())
        total += y.numel()
    return score / max(total, 1)


@contextlib.contextmanager
def evaluating(*models: nn.Module | None):
    """Every module of ``models`` in eval mode for the duration, each put back in its own mode after.
    Per module, not the top one's flag: a wrapper built in train mode (``nn.Module``'s default)
    around a model in eval mode would otherwise switch the model's dropout on when restored."""
    tops = [(model, model.training) for model in models if isinstance(model, nn.Module)]
    saved = [(m, m.training) for model, _ in tops for m in model.modules()]
    for model, _ in tops:
        _set_mode(model, train=False)   # .train(), which a QAT graph overrides to switch its batch norm
    for m, _ in saved:
        m.training = False
    try:
        yield
    finally:
        for model, flag in tops:
            if flag:
                _set_mode(model, train=True)
        for m, flag in saved:   # then each module's own mode: a train-mode wrapper must not switch on the dropout inside
            m.training = flag


def _device_of(model) -> torch.device:
    parameters = model.parameters() if isinstance(model, nn.Module) else iter(())
    return next(parameters, torch.empty(0)).device


def _set_mode(model: nn.Module, *, train: bool) -> None:
    # graph modules from torch.export refuse .train()/.eval(); their behaviour is fixed at export
    try:
        model.train(train)
    except NotImplementedError:
        pass


def _set_eval(model: nn.Module) -> None:
    _set_mode(model, train=False)


def _loss(logits: torch.Tensor, y: torch.Tensor, teacher_logits: torch.Tensor | None, config: TrainConfig) -> torch.Tensor:
    """Cross-entropy on labels, mixed with distillation from the teacher; without labels,
    distillation alone (the user's raw inputs are enough to win fidelity back)."""
    unlabelled = bool((y == NO_LABEL).any())
    if unlabelled and teacher_logits is None:
        raise ConfigError("fit: the data has no labels; fine-tune by distillation from the original model "
                          "(a teacher, e.g. finetune: {distill: {}} in a recipe)")
    if teacher_logits is None or config.distill is None and not unlabelled:
        return F.cross_entropy(logits.flatten(0, -2), y.flatten())
    soft = distillation_loss(logits, teacher_logits, config.distill)
    if unlabelled:
        return soft
    alpha = config.distill.alpha
    return alpha * soft + (1 - alpha) * F.cross_entropy(logits.flatten(0, -2), y.flatten())


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, distill: Distillation | None) -> torch.Tensor:
    """The soft-target term of ``distill`` (``Distillation.loss``; None: KL at temperature 1)."""
    kind = "kl" if distill is None else distill.loss
    if kind == "auto":
        kind = "kl" if output_kind(teacher) == "classification" else "mse"
    if kind == "mse":
        return (student.float() - teacher.float()).pow(2).sum() / teacher.float().pow(2).sum().clamp_min(1e-12)
    t = distill.temperature if distill is not None else 1.0
    return F.kl_div(F.log_softmax(student / t, -1).flatten(0, -2), F.log_softmax(teacher / t, -1).flatten(0, -2),
                    log_target=True, reduction="batchmean") * t * t


def random_shift(x: torch.Tensor, pixels: int) -> torch.Tensor:
    """``x`` (N, C, H, W) with each sample moved by its own random whole-pixel offset in
    [-pixels, pixels] along H and W (global RNG), the vacated border filled by replicating the edge."""
    if not (isinstance(x, torch.Tensor) and x.dim() == 4 and x.is_floating_point()):
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ConfigError(f"random_shift: {pixels} moves images (N, C, H, W float); the training inputs are {shape}: "
                          "set random_shift: 0 for this model")
    n, _, h, w = x.shape
    padded = F.pad(x, (pixels, pixels, pixels, pixels), mode="replicate")
    dy, dx = (torch.randint(0, 2 * pixels + 1, (n,)) for _ in range(2))
    rows = (dy[:, None] + torch.arange(h)).to(x.device)    # (N, H): the rows each sample keeps
    cols = (dx[:, None] + torch.arange(w)).to(x.device)
    picked = padded[torch.arange(n, device=x.device)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    return picked.permute(0, 3, 1, 2).contiguous()       # advanced indexing put C last


def fit(
    model: nn.Module,
    data: DataSplits,
    config: TrainConfig,
    *,
    teacher: nn.Module | None = None,
    progress: bool | None = None,
    resume_path: str | os.PathLike | None = None,
    penalty: Callable[[float], torch.Tensor] | None = None,
    device: str | None = None,
) -> History:
    """Train ``model`` in place on ``data.train``, validating on ``data.val`` after each epoch.

    ``resume_path``: a file where the loop saves its state after each epoch and from which it
    continues if the file exists (same config assumed).
    ``penalty``: called at every step with the training progress in [0, 1); its value is added
    to the loss (a regulariser such as the KL term of variational dropout, with its own warm-up).
    ``device``: ``cpu`` | ``cuda`` | ``auto`` (default: the enclosing ``distributed.training_device``,
    else the CPU); the model comes back on the CPU.

    Under torchrun every process calls ``fit`` alike: DDP averages the gradients of each global
    batch of ``config.batch_size`` samples (``distributed``); rank 0 alone validates and saves.
    """
    torch.manual_seed(config.seed)
    on = distributed.resolve_device(device)
    model.to(on)
    if teacher is not None:
        teacher.to(on)
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "adam":
        optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if distributed.active() and config.epochs:
        loader = distributed.train_loader(data.loader("train", batch_size=distributed.per_rank_batch(config.batch_size)),
                                          seed=config.seed)
    else:
        loader = data.loader("train", batch_size=config.batch_size, shuffle=True, seed=config.seed)
    val_loader = data.loader("val", batch_size=512)
    steps_total = max(config.epochs * len(loader), 1)
    schedule = (lambda step: 0.5 * (1 + math.cos(math.pi * step / steps_total))) if config.lr_schedule == "cosine" else (lambda step: 1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    if teacher is not None:
        _set_eval(teacher)
    history, best_state, best_acc, start_epoch = History(), None, -1.0, 0
    state = distributed.load_resume(resume_path) if config.epochs else None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history = History(**state["history"])
        best_acc, best_state, start_epoch = state["best_acc"], state["best_state"], state["epoch"] + 1
        torch.set_rng_state(state["rng"])
    # DDP under torchrun (its construction syncs rank 0's weights); no epochs, no collective at all
    trainee = distributed.wrap(model, on) if config.epochs else model
    for epoch in range(start_epoch, config.epochs):
        model.train()
        distributed.set_epoch(loader, epoch, config.seed)
        running, seen = 0.0, 0
        bar = progress_bar(loader, f"epoch {epoch + 1}/{config.epochs}", enabled=progress)
        for i, (x, y) in enumerate(bar):
            if on.type != "cpu":
                x, y = S.map_tensors(lambda t: t.to(on, non_blocking=True), x), y.to(on, non_blocking=True)
            if config.random_shift:
                x = random_shift(x, config.random_shift)
            optimizer.zero_grad(set_to_none=True)
            logits = primary(S.call(trainee, x))
            with torch.no_grad():
                teacher_logits = primary(S.call(teacher, x)) if teacher is not None else None
            loss = _loss(logits, y, teacher_logits, config)
            if penalty is not None:
                loss = loss + penalty((epoch + i / len(loader)) / config.epochs)
            loss.backward()
            optimizer.step()
            scheduler.step()
            running += float(loss.detach()) * len(y)
            seen += len(y)
            bar.set_postfix(loss=f"{running / seen:.4f}")
        running, seen = distributed.sum_over_ranks(running, seen)
        history.train_loss.append(running / max(seen, 1))
        acc = distributed.on_main(lambda: accuracy(model, val_loader, reference=teacher))
        history.val_accuracy.append(acc)
        if acc > best_acc:
            best_acc, history.best_epoch = acc, epoch
            best_state = copy.deepcopy(model.state_dict()) if config.keep_best else None
        if resume_path is not None and distributed.is_main():
            with atomic_path(resume_path) as tmp:
                torch.save({
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "history": vars(history), "best_acc": best_acc, "best_state": best_state, "epoch": epoch,
                    "rng": torch.get_rng_state(),
                }, tmp)
        patience = config.early_stopping_patience
        if patience and epoch - history.best_epoch >= patience:
            history.stopped_early = True
            break
    if config.keep_best and best_state is not None:
        model.load_state_dict(best_state)
    distributed.unwrap(model, on, teacher)
    _set_eval(model)
    return history

