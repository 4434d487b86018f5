"""One coarse-to-fine registration loop, shared by the joint, pairwise and group-wise solvers.

A registration moves one or more objects (the atlas, non-reference images, a label map); each has
a final transform kind and goes through the same schedule of *levels* — rigid → affine → non-linear
(FFD or SVF) with the control spacing halving at each further level, optionally repeated on the full
grid. At a level, each object optimises one part of its transform (:class:`MovingTransform`), and
*outer iterations* (:func:`run_outer_iterations`) alternate what the solver needs (EM steps, a frozen
overlap mask) with Adam steps whose length shrinks from one outer iteration to the next, until the
monitored value stops changing.

Linear parameters are optimised in millimetres of motion: angles and matrix entries are multiplied
by the radius of the field of view, so that a unit change of any raw parameter moves the anatomy by
about a millimetre, and one Adam step length fits them all. A level starts from a fixed transform
(``base``) and learns a zero-initialised offset (``raw``).

The schedule itself (:class:`Level`, :func:`schedule`, :class:`OuterLoop`) is plain Python in
:mod:`mvmm.core.settings`, beside the settings that describe it; it is re-exported here.
"""

from __future__ import annotations

from typing import Callable, List, Optional

import torch
from torch import nn

from mvmm.core.grid import Grid
from mvmm.core.settings import (LINEAR_KINDS, NONLINEAR_KINDS, Level, OuterLoop,  # noqa: F401 (re-exported)
                                 schedule)
from mvmm.spatial.nonlinear import BSplineTransform, FreeFormDeformation, StationaryVelocityField
from mvmm.spatial.transforms import AffineTransform, LinearTransform, RigidTransform, SequentialTransform


def run_outer_iterations(iteration: Callable[[int, float], dict], loop: OuterLoop, monitor: str,
                         level: str, on_iteration: Optional[Callable[[dict], None]] = None) -> List[dict]:
    """Outer iterations of one level until ``monitor`` settles or ``loop.max_outer`` is reached.

    Parameters
    ----------
    iteration : callable ``(outer, step_mm) -> dict``
        One outer iteration (e.g. EM steps, then Adam steps of length ``step_mm``); returns the
        values to record, among them ``monitor``.
    loop : OuterLoop
    monitor : str
        The recorded value whose relative change decides convergence (a loss or a log-likelihood).
    level : str
        Recorded with each iteration.
    on_iteration : callable, optional
        Called with each record (e.g. to update a progress bar).

    Returns
    -------
    list of dict
        One record per outer iteration: ``level``, ``outer`` and what ``iteration`` returned.
    """
    history: List[dict] = []
    previous = None
    for outer in range(1, loop.max_outer + 1):
        record = {"level": level, "outer": outer, **iteration(outer, loop.step_at(outer))}
        history.append(record)
        if on_iteration is not None:
            on_iteration(record)
        value = record[monitor]
        if previous is not None and abs(value - previous) <= loop.tol * max(abs(previous), 1e-12):
            break
        previous = value
    return history


DEFORMATIONS = {"ffd": FreeFormDeformation, "svf": StationaryVelocityField}


class ScaledLinear:
    """A learnable rigid or affine transform, continuing from ``start``, with raw parameters in mm.

    Attributes
    ----------
    raw : nn.Parameter
        The learnable offset (zero at start), in mm of motion.
    module : LinearTransform
        The transform to use in the objective; its parameters are ``base + raw * scales``.
    """

    def __init__(self, kind: str, start: LinearTransform, radius: float):
        ndim = start.ndim
        self.kind, self.ndim, self.center = kind, ndim, start.center
        base = as_kind(start, kind).params.detach()
        n_linear = base.shape[-1] - ndim
        self.scales = torch.cat([torch.full((n_linear,), 1.0 / radius), torch.ones(ndim)]).to(base)
        self.base = base
        self.raw = nn.Parameter(torch.zeros_like(base))
        cls = RigidTransform if kind == "rigid" else AffineTransform
        self.module = cls(ndim, params=lambda: self.base + self.raw * self.scales, center=self.center)

    def baked(self) -> LinearTransform:
        """The current transform with fixed parameters."""
        return self.module.with_params((self.base + self.raw * self.scales).detach().clone())


def as_kind(transform: LinearTransform, kind: str) -> LinearTransform:
    """``transform`` as a fixed transform of ``kind`` about the same centre (rigid → affine is exact)."""
    if kind == "rigid":
        if not isinstance(transform, RigidTransform):
            raise ValueError("a non-rigid linear transform cannot be made rigid")
        return transform
    a, t = transform.matrix_and_translation()
    n = transform.ndim
    params = torch.cat([(a - torch.eye(n, dtype=a.dtype, device=a.device)).flatten(-2), t], dim=-1).detach()
    return AffineTransform(n, params=params, center=transform.center)


def learnable_deformation(kind: str, previous: Optional[BSplineTransform], domain: Grid, control_spacing: float,
                          device=None) -> BSplineTransform:
    """A learnable FFD or SVF for the next level: new (identity), refined to half the spacing, or continued."""
    if previous is None:
        return DEFORMATIONS[kind](domain, control_spacing).to(device)
    if not isinstance(previous, DEFORMATIONS[kind]):
        raise ValueError(f"kind: a {kind} level cannot continue a {type(previous).__name__}")
    if min(previous.control_spacing) > control_spacing:
        return previous.refined()
    return previous.with_params(nn.Parameter(previous.params.detach().clone()))


def frozen(transform: BSplineTransform) -> BSplineTransform:
    """``transform`` with its current parameters fixed."""
    return transform.with_params(transform.params.detach().clone())


class MovingTransform:
    """The transform of one moving object across the levels: a deformation (FFD or SVF, acting in the
    common space, absent until a non-linear level) followed by a linear map into the object's world.

    At each level one part learns and the other is held: :meth:`begin` returns the parameters to
    optimise, :attr:`transform` is the current map (to use in the objective), :meth:`end` fixes it.

    Parameters
    ----------
    linear : LinearTransform
        The starting linear map.
    domain : Grid
        Where a deformation acts (the common / fixed grid).
    radius : float
        Radius (mm) of the field of view, the unit of the linear parameters (module notes).
    deformation : BSplineTransform, optional
        A starting deformation.
    """

    def __init__(self, linear: LinearTransform, domain: Grid, radius: float,
                 deformation: Optional[BSplineTransform] = None):
        self.linear, self.deformation = linear, deformation
        self.domain, self.radius = domain, radius
        self._scaled: Optional[ScaledLinear] = None

    @property
    def transform(self) -> nn.Module:
        """The current map, common space → the object's world."""
        if self.deformation is None:
            return self.linear
        return SequentialTransform(self.deformation, self.linear)

    @property
    def learning(self) -> Optional[str]:
        """The kind being learnt at the current level (None between levels)."""
        if self._scaled is not None:
            return self._scaled.kind
        if self.deformation is not None and self.deformation.learnable:
            return "svf" if isinstance(self.deformation, StationaryVelocityField) else "ffd"
        return None

    def begin(self, kind: Optional[str], control_spacing: Optional[float] = None, device=None) -> List[nn.Parameter]:
        """Start a level that optimises ``kind`` (None: nothing); returns the learnable parameters."""
        if kind is None:
            return []
        if kind == "rigid" and not isinstance(self.linear, RigidTransform):
            # an affine start (e.g. an atlas placed by its template) cannot be learnt rigidly without
            # losing its scaling and shear: it is held here, and the affine level moves it
            return []
        if kind in LINEAR_KINDS:
            self._scaled = ScaledLinear(kind, self.linear, self.radius)
            self.linear = self._scaled.module
            return [self._scaled.raw]
        self.deformation = learnable_deformation(kind, self.deformation, self.domain, control_spacing, device)
        return [self.deformation.params_tensor]

    def end(self, device=None) -> None:
        """Fix what the level learnt."""
        if self._scaled is not None:
            self.linear = self._scaled.baked().to(device)
            self._scaled = None
        if self.deformation is not None and self.deformation.learnable:
            self.deformation = frozen(self.deformation)

    def learning_affine(self) -> Optional[LinearTransform]:
        """The affine map being learnt at this level (for a prior on its scaling and shear), or None."""
        return self.linear if self._scaled is not None and self._scaled.kind == "affine" else None

    def learning_deformation(self) -> Optional[BSplineTransform]:
        """The deformation being learnt at this level (for its bending energy), or None."""
        return self.deformation if self.learning in NONLINEAR_KINDS else None
