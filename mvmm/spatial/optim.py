"""Gradient descent for registration parameters: Adam steps that keep the best point seen.

Adam copes with the noisy, piecewise-smooth gradients of interpolated images; keeping the best
parameters of each run makes the loss non-increasing from one run to the next (the joint solver
alternates such runs with EM steps, and ICM needs each half to not lose ground).
"""

from __future__ import annotations

from typing import Callable, List

import torch


def descend_keeping_best(params: List[torch.Tensor], closure: Callable[[], torch.Tensor], steps: int,
                         lr: float) -> float:
    """Minimise ``closure()`` (which returns the loss after calling ``backward``) by ``steps`` Adam steps.

    Parameters
    ----------
    params : list of torch.Tensor
        Leaf tensors requiring gradients, in units where 1 ≈ 1 mm of motion.
    closure : callable
        Evaluates the loss at the current parameters and back-propagates it.
    steps : int
        Adam steps; the loss is evaluated ``steps + 1`` times.
    lr : float
        Adam's step (about the longest move per step, in mm).

    Returns
    -------
    float
        The lowest loss seen; ``params`` are left at the point that gave it.
    """
    params = [p for p in params if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    best_loss, best = float("inf"), None
    for step in range(steps + 1):
        optimizer.zero_grad()
        loss = float(closure())
        if loss < best_loss:
            best_loss, best = loss, [p.detach().clone() for p in params]
        if step < steps:
            optimizer.step()
    with torch.no_grad():
        for p, b in zip(params, best):
            p.copy_(b)
    return best_loss
