"""The one coarse-to-fine loop the joint, pairwise and group-wise solvers share."""

import numpy as np
import pytest
import torch

from mvmm.core.grid import Grid
from mvmm.spatial.coarse_to_fine import MovingTransform, OuterLoop, run_outer_iterations, schedule
from mvmm.spatial.nonlinear import FreeFormDeformation, StationaryVelocityField
from mvmm.spatial.transforms import RigidTransform


def test_schedule_takes_each_object_to_its_kind():
    levels = schedule({"moving": "svf"}, 40.0, 2, full_resolution=True)
    assert [level.name for level in levels] == ["rigid", "affine", "svf 40 mm", "svf 20 mm",
                                                "svf 20 mm, full resolution"]
    assert [level.kinds["moving"] for level in levels] == ["rigid", "affine", "svf", "svf", "svf"]
    assert [level.full_resolution for level in levels] == [False] * 4 + [True]
    # a rigid object keeps optimising its rigid part while another goes further; "none" never moves
    levels = schedule({"atlas": "affine", "images": "rigid", "other": "none"}, 40.0, 2)
    assert [(level.name, level.kinds["atlas"], level.kinds["images"], level.kinds["other"]) for level in levels] == \
        [("rigid", "rigid", "rigid", None), ("affine", "affine", "rigid", None)]
    assert schedule({"atlas": "none"}, 40.0, 2) == []
    with pytest.raises(ValueError, match="one non-linear kind"):
        schedule({"a": "ffd", "b": "svf"}, 40.0, 1)
    with pytest.raises(ValueError, match="unknown"):
        schedule({"a": "bspline"}, 40.0, 1)


def test_outer_iterations_stop_when_the_monitored_value_settles_and_shrink_the_step():
    loop = OuterLoop(steps=5, max_outer=10, step_mm=2.0, step_decay=0.5, min_step_mm=0.3, tol=1e-3)
    values = iter([1.0, 2.0, 2.5, 2.5005, 9.0])
    steps = []

    def iteration(outer, step_mm):
        steps.append(step_mm)
        return {"loss": next(values)}

    history = run_outer_iterations(iteration, loop, "loss", "affine")
    assert [h["loss"] for h in history] == [1.0, 2.0, 2.5, 2.5005]  # |2.5005 − 2.5| ≤ 1e-3 · 2.5
    assert [h["outer"] for h in history] == [1, 2, 3, 4] and {h["level"] for h in history} == {"affine"}
    assert steps == [2.0, 1.0, 0.5, 0.3]  # halving, down to the floor
    capped = run_outer_iterations(lambda outer, step: {"loss": float(outer)}, loop, "loss", "rigid")
    assert len(capped) == loop.max_outer


@pytest.mark.parametrize("kind, cls", [("ffd", FreeFormDeformation), ("svf", StationaryVelocityField)])
def test_a_moving_transform_learns_one_part_per_level_and_fixes_it_after(kind, cls):
    grid = Grid((20, 16), (2.0, 2.0), (0.0, 0.0), tuple(np.eye(2).ravel()))
    state = MovingTransform(RigidTransform(2, center=grid.center_world()), grid, radius=20.0)
    params = state.begin("rigid")
    assert len(params) == 1 and params[0].shape == (3,) and state.learning == "rigid"
    with torch.no_grad():
        params[0].add_(1.0)  # 1 mm of translation, 1/20 rad
    state.end()
    assert state.learning is None and not any(p.requires_grad for p in state.transform.parameters())
    assert torch.allclose(state.linear.params[1:], torch.ones(2, dtype=torch.float64))
    params = state.begin("affine")
    assert state.learning_affine() is state.linear and params[0].shape == (6,)
    state.end()
    params = state.begin(kind, 16.0)
    assert isinstance(state.deformation, cls) and state.learning_deformation() is state.deformation
    assert params[0] is state.deformation.params_tensor and state.learning_affine() is None
    state.end()
    first = state.deformation
    params = state.begin(kind, 8.0)  # the next level refines the same deformation
    assert state.deformation.control_spacing == tuple(s / 2 for s in first.control_spacing)
    state.end()
    assert not state.deformation.learnable
