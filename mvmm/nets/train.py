"""The training loop of mvmm's networks: Adam on the model's own loss, checkpoints every epoch, resumable.

Determinism: the weights are initialised, the batches ordered and the augmentation drawn from
generators seeded by ``TrainingSettings.seed``; on CPU the same seed gives the same weights. A
resumed run restores the weights, the optimiser, the epoch and the generators' states, so it
continues the loss curve where it stopped (exactly, on CPU).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from mvmm.core.errors import InputError
from mvmm.core.outputs import write_json
from mvmm.core.settings import TrainingSettings
from mvmm.nets.data import augment, stack_cases
from mvmm.nets.model_dir import CHECKPOINT, LOG, WEIGHTS, save_torch

log = logging.getLogger(__name__)


def seeded_network(build: Callable[[], nn.Module], seed: int) -> nn.Module:
    """``build()`` with torch's generator seeded (the same seed gives the same initial weights)."""
    state = torch.get_rng_state()
    torch.manual_seed(seed)
    try:
        return build()
    finally:
        torch.set_rng_state(state)


def train_network(net: nn.Module, cases: Sequence, settings: TrainingSettings, out: Path,
                  device, resume: bool = False, progress: bool = True,
                  on_epoch: Optional[Callable[[List[dict]], None]] = None) -> List[dict]:
    """Train ``net`` on ``cases`` for ``settings.epochs`` epochs; returns the log (one dict per epoch).

    Parameters
    ----------
    net : BayesSegNet, RegNet, AcweNet, PriorVAE or VaeSegNet
        Its ``loss(batch, prediction, smoothness)`` is what is minimised (a dict of terms, ``loss``
        the total; each is logged per epoch); ``augment_channels`` says which images the
        augmentation moves.
    cases : sequence of NetworkCase, PairCase or LabelCase
        The training subjects (or pairs), on their network grids.
    settings : TrainingSettings
    out : Path
        The model directory: ``checkpoint.pt`` after every epoch, ``weights.pt`` and ``log.json``.
    device : torch.device
    resume : bool
        Continue from ``out/checkpoint.pt`` (its epoch count, optimiser and generators).
    on_epoch : callable, optional
        Called with the log after each epoch (e.g. to draw the loss curve).
    """
    if not cases:
        raise InputError("data: no training subjects")
    device = torch.device(device)
    net.to(device).train()
    optimizer = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=settings.lr)  # not a frozen prior
    order = torch.Generator().manual_seed(settings.seed)
    noise = torch.Generator().manual_seed(settings.seed + 1)
    history: List[dict] = []
    checkpoint = {}
    if resume:
        checkpoint = torch.load(out / CHECKPOINT, map_location=device, weights_only=False)
        net.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        order.set_state(checkpoint["order_rng"])
        noise.set_state(checkpoint["noise_rng"])
        history = list(checkpoint["history"])
        log.info("resuming %s at epoch %d of %d", out, len(history), settings.epochs)
    # networks that sample (the VAEs' latent codes) draw from torch's generator: forked, seeded and
    # checkpointed here, so that training neither disturbs the caller's stream nor loses exactness on resume
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(settings.seed + 2)
        if resume and "torch_rng" in checkpoint:
            torch.set_rng_state(checkpoint["torch_rng"].cpu())
        return _epochs(net, cases, settings, out, device, optimizer, order, noise, history, progress, on_epoch)


def epoch_lr(settings: TrainingSettings, epoch: int) -> float:
    """The learning rate of epoch ``epoch`` (1-based) under ``settings.lr_schedule``."""
    if settings.lr_schedule == "cosine":
        return settings.lr * 0.5 * (1.0 + math.cos(math.pi * (epoch - 1) / settings.epochs))
    return settings.lr


def _epochs(net, cases, settings, out, device, optimizer, order, noise, history, progress, on_epoch) -> List[dict]:
    batches_per_epoch = -(-len(cases) // settings.batch_size)
    bar = tqdm(total=settings.epochs, initial=len(history), desc="training", unit="epoch", disable=not progress)
    grid = cases[0].grid  # every network grid has the canonical layout
    for epoch in range(len(history) + 1, settings.epochs + 1):
        started = time.perf_counter()
        lr = epoch_lr(settings, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        permutation = torch.randperm(len(cases), generator=order).tolist()
        sums: Dict[str, float] = {}  # each term the network's loss returns, averaged over the epoch
        for start in range(0, len(cases), settings.batch_size):
            batch = {k: v.to(device) for k, v in
                     stack_cases([cases[i] for i in permutation[start:start + settings.batch_size]]).items()}
            if settings.augment:
                batch = augment(batch, grid, settings.rotation_deg, settings.shift_mm, settings.scale, noise,
                                net.augment_channels)
            terms = net.loss(batch, net(batch), settings.smoothness)
            if not torch.isfinite(terms["loss"]):
                raise RuntimeError(f"training diverged at epoch {epoch} (loss {float(terms['loss'])}); "
                                   f"lower the learning rate (lr={settings.lr:g})")
            optimizer.zero_grad(set_to_none=True)
            terms["loss"].backward()
            optimizer.step()
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach()) / batches_per_epoch
        history.append({"epoch": epoch, **sums, "lr": lr, "seconds": time.perf_counter() - started})
        save_torch({"model": net.state_dict(), "optimizer": optimizer.state_dict(), "order_rng": order.get_state(),
                    "noise_rng": noise.get_state(), "torch_rng": torch.get_rng_state(), "history": history,
                    "settings": settings.__dict__}, out / CHECKPOINT)
        write_json(out / LOG, {"epochs": history})
        bar.update(1)
        bar.set_postfix(loss=f"{sums['loss']:.4f}")
        if on_epoch is not None:
            on_epoch(history)
    bar.close()
    save_torch(net.state_dict(), out / WEIGHTS)
    net.eval()
    return history

