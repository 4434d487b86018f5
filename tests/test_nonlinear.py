import copy
import itertools
import math

import numpy as np
import pytest
import torch

from mvmm.core.grid import Grid
from mvmm.spatial import (AffineTransform, FreeFormDeformation, RigidTransform, SequentialTransform,
                          StationaryVelocityField, bending_energy, initial_linear_transform, jacobian_determinant,
                          jacobian_statistics, linear_distortion, map_grid, sample_image)
from mvmm.spatial.init import center_of_mass


def oblique_grid(size=(24, 20, 8), spacing=(2.0, 2.0, 5.0)):
    a = math.radians(20)
    rot = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    return Grid(size, spacing, (-15.0, 10.0, -20.0), tuple(rot.ravel()))


def random_ffd(grid, spacing=15.0, scale=2.0, seed=0):
    ffd = FreeFormDeformation(grid, spacing)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        ffd.params.copy_(scale * torch.randn(ffd.params.shape, generator=gen))
    return ffd


def test_ffd_at_zero_is_identity_and_has_its_control_grid_around_the_domain():
    grid = oblique_grid()
    ffd = FreeFormDeformation(grid, 10.0)
    points = grid.world_points()
    assert torch.equal(ffd(points), points)
    assert ffd.control_spacing == (10.0, 10.0, 10.0)
    # the domain's field of view lies inside the control points with full cubic support
    corners = grid.index_to_world(torch.tensor([[-0.5, -0.5, -0.5], [s - 0.5 for s in grid.size]], dtype=torch.float64))
    index = ffd.control_grid.world_to_index(corners)
    assert bool((index >= 1).all()) and bool((index <= torch.tensor(ffd.control_grid.size) - 2).all())


def test_ffd_interpolates_a_constant_shift_exactly():
    """Cubic B-splines form a partition of unity: equal coefficients give that displacement everywhere."""
    grid = oblique_grid()
    shift = torch.tensor([3.0, -2.0, 1.5])
    ffd = FreeFormDeformation(grid, 12.0, params=shift.reshape(3, 1, 1, 1).expand(3, *FreeFormDeformation(grid, 12.0).control_grid.shape).clone())
    points = grid.world_points()
    assert torch.allclose(ffd(points) - points, shift.expand_as(points), atol=1e-5)


def test_ffd_refinement_keeps_the_deformation():
    grid = oblique_grid()
    ffd = random_ffd(grid)
    finer = ffd.refined()
    assert finer.control_spacing == tuple(s / 2 for s in ffd.control_spacing)
    points = grid.world_points() + 0.37  # off the voxel centres too
    assert torch.allclose(finer(points), ffd(points), atol=1e-4)


def test_ffd_fixed_point_inverse():
    grid = oblique_grid()
    ffd = random_ffd(grid, scale=1.5)
    points = grid.world_points()
    assert jacobian_statistics(ffd, grid)["folding_share"] == 0.0
    back = ffd.inverse()(ffd(points))
    assert (back - points).norm(dim=-1).max() < 1e-3


def test_ffd_gradcheck():
    grid = Grid((6, 5, 4), (3.0, 3.0, 4.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))
    ffd = FreeFormDeformation(grid, 6.0, params=torch.nn.Parameter(
        torch.randn((3,) + FreeFormDeformation(grid, 6.0).control_grid.shape, dtype=torch.float64)))
    points = grid.world_points(dtype=torch.float64) + 0.3

    def fn(coeffs):
        return FreeFormDeformation(grid, control_grid=ffd.control_grid, params=coeffs)(points)

    assert torch.autograd.gradcheck(fn, (ffd.params.detach().clone().requires_grad_(),))


def random_svf(grid, spacing=15.0, scale=2.0, seed=0, **kwargs):
    svf = StationaryVelocityField(grid, spacing, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        svf.params.copy_(scale * torch.randn(svf.params.shape, generator=gen))
    return svf


def interior(grid, points, margin=2):
    index = grid.world_to_index(points)
    return ((index > margin) & (index < torch.tensor(grid.size) - 1 - margin)).all(-1)


def test_svf_at_zero_is_the_identity_and_a_constant_velocity_is_that_translation():
    grid = oblique_grid()
    points = grid.world_points()
    svf = StationaryVelocityField(grid, 10.0)
    assert torch.equal(svf(points), points)
    shift = torch.tensor([2.0, -1.0, 0.5])
    with torch.no_grad():
        svf.params.copy_(shift.reshape(3, 1, 1, 1).expand_as(svf.params))
    # exp of a constant field is the translation by it (the spline sums to one inside the domain)
    assert torch.allclose(svf(points) - points, shift.expand_as(points), atol=1e-4)


def test_svf_composed_with_its_inverse_is_the_identity_and_does_not_fold():
    grid = oblique_grid()
    points = grid.world_points()
    svf = random_svf(grid, scale=3.0)
    moved = svf(points)
    assert (moved - points).norm(dim=-1).max() > 2.0  # a real deformation
    assert jacobian_statistics(svf, grid)["folding_share"] == 0.0
    assert jacobian_statistics(svf, grid)["min"] > 0.2
    back = svf.inverse()(moved)
    inside = interior(grid, points)
    assert (back - points).norm(dim=-1)[inside].mean() < 0.05
    assert (svf(svf.inverse()(points)) - points).norm(dim=-1)[inside].mean() < 0.05


def test_svf_gradcheck_and_the_inverse_keeps_gradients():
    grid = Grid((6, 5, 4), (3.0, 3.0, 4.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))
    shape = StationaryVelocityField(grid, 6.0, steps=3, field_subdivision=2).control_grid.shape
    coeffs = torch.randn((3,) + shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    points = grid.world_points(dtype=torch.float64) + 0.3
    svf = StationaryVelocityField(grid, 6.0, steps=3, field_subdivision=2, params=coeffs)

    def fn(c):
        return svf.with_params(c)(points)

    assert torch.autograd.gradcheck(fn, (coeffs.clone().requires_grad_(),))
    learnable = svf.with_params(torch.nn.Parameter(coeffs.clone()))
    learnable.inverse()(points).sum().backward()
    assert learnable.params.grad is not None and float(learnable.params.grad.abs().sum()) > 0


def test_svf_computes_its_exponential_once_per_parameter_value():
    grid = oblique_grid()
    svf = random_svf(grid, scale=1.0)
    svf.params.requires_grad_(True)
    calls = []
    original = svf._exponential
    svf._exponential = lambda v: calls.append(1) or original(v)
    points = grid.world_points()
    with torch.no_grad():
        svf(points), svf(points + 1.0), svf.inverse()  # one evaluation, reused
    assert len(calls) == 1
    loss = (svf(points) ** 2).mean() + svf(points + 1.0).mean()  # one graph, one field
    assert len(calls) == 2
    loss.backward()
    svf(points).sum().backward()  # after a backward the field is recomputed (no freed graph reused)
    assert len(calls) == 3
    with torch.no_grad():
        svf.params.add_(0.5)  # an optimiser step changes the parameters in place
        svf(points)
    assert len(calls) == 4
    copy.deepcopy(svf)  # a cached graph is not copied


@pytest.mark.parametrize("cls", [FreeFormDeformation, StationaryVelocityField])
def test_a_batch_of_deformations_equals_each_one_alone(cls):
    grid = oblique_grid()
    single = [cls(grid, 15.0, params=2.0 * torch.randn((3,) + cls(grid, 15.0).control_grid.shape,
                                                      generator=torch.Generator().manual_seed(b)))
              for b in range(3)]
    batch = single[0].with_params(torch.stack([t.params for t in single]))
    assert batch.batch_size == 3
    points = grid.world_points()
    moved = batch(points.expand(3, *points.shape))
    on_grid = map_grid(batch, grid)
    for b, transform in enumerate(single):
        assert torch.allclose(moved[b], transform(points), atol=1e-4)
        assert torch.allclose(on_grid[b], map_grid(transform, grid), atol=1e-4)
    # refinement keeps the spline (displacement or velocity) of each member
    many = points.expand(3, *points.shape)
    assert torch.allclose(batch.refined().spline_at(many), batch.spline_at(many), atol=1e-3)
    with pytest.raises(ValueError, match=r"expects parameters of shape \[3, "):
        batch.with_params(torch.zeros(3, 2, 2, 2))(points)


def test_bending_energy_vanishes_for_affine_maps_and_grows_with_deformation():
    grid = oblique_grid()
    affine = AffineTransform(3, torch.tensor([0.1, 0.05, 0, 0, -0.1, 0.02, 0, 0, 0.05, 3.0, 1.0, -2.0]))
    assert float(bending_energy(affine, grid)) < 1e-8
    weak, strong = random_ffd(grid, scale=0.5), random_ffd(grid, scale=2.0)
    assert 0 < float(bending_energy(weak, grid).detach()) < float(bending_energy(strong, grid).detach())
    energy = bending_energy(strong, grid)
    energy.backward()
    assert strong.params.grad is not None and float(strong.params.grad.abs().sum()) > 0


def test_jacobian_determinant_of_a_scaling_and_of_a_fold():
    grid = oblique_grid()
    scale = AffineTransform(3, torch.tensor([0.2, 0, 0, 0, 0.0, 0, 0, 0, -0.1, 0.0, 0.0, 0.0], dtype=torch.float64))
    det = jacobian_determinant(scale, grid)
    assert torch.allclose(det, torch.full_like(det, 1.2 * 0.9), atol=1e-5)
    folded = random_ffd(grid, spacing=8.0, scale=12.0)
    assert jacobian_statistics(folded, grid)["folding_share"] > 0


def test_a_folded_deformation_is_reported(caplog):
    from mvmm.spatial.regularizers import warn_if_folded

    grid = oblique_grid()
    with caplog.at_level("WARNING"):
        warn_if_folded(jacobian_statistics(random_ffd(grid, spacing=15.0, scale=0.5), grid), "the smooth FFD")
        assert not caplog.records
        warn_if_folded(jacobian_statistics(random_ffd(grid, spacing=8.0, scale=12.0), grid), "the folded FFD")
    assert len(caplog.records) == 1 and "the folded FFD folds" in caplog.text and "raise `bending_weight`" in caplog.text


def test_sequential_transform_and_its_inverse():
    grid = oblique_grid()
    centre = grid.center_world()
    rigid = RigidTransform(3, torch.tensor([0.1, -0.05, 0.2, 3.0, 1.0, -2.0], dtype=torch.float64), center=centre)
    chain = SequentialTransform(random_ffd(grid, scale=1.0), rigid)
    points = grid.world_points(dtype=torch.float64)
    assert (chain.inverse()(chain(points)) - points).norm(dim=-1).max() < 1e-3


@pytest.mark.parametrize("method", ["geometry", "moments"])
def test_initialisers_find_a_shifted_blob(method):
    fixed_grid = oblique_grid()
    moving_grid = Grid(fixed_grid.size, fixed_grid.spacing, (5.0, -8.0, 12.0), fixed_grid.direction)
    def blob(grid, centre):
        d = grid.world_points(dtype=torch.float64) - torch.as_tensor(centre)
        return torch.exp(-(d ** 2).sum(-1) / 50.0).unsqueeze(0)
    fixed_blob = fixed_grid.center_world() + np.array([4.0, 2.0, 0.0])
    moving_blob = moving_grid.center_world() + np.array([4.0, 2.0, 0.0])
    if method == "moments":  # the blob is off-centre differently in the two images
        moving_blob = moving_blob + np.array([-6.0, 3.0, 5.0])
    fixed, moving = blob(fixed_grid, fixed_blob), blob(moving_grid, moving_blob)
    transform = initial_linear_transform("rigid", fixed_grid, moving_grid, method, fixed, moving)
    mapped = transform(torch.as_tensor(fixed_blob)[None])[0].detach().numpy()
    assert np.allclose(mapped, moving_blob, atol=0.5)
    assert np.allclose(center_of_mass(moving, moving_grid), moving_blob, atol=0.5)


def test_warp_of_a_label_map_with_nearest_keeps_the_label_values():
    grid = oblique_grid()
    labels = torch.zeros((1,) + grid.shape)
    labels[0, 2:6, 5:15, 5:15] = 500
    labels[0, 2:6, 8:12, 8:12] = 200
    moved, _ = sample_image(labels, grid, grid.world_points(), random_ffd(grid, scale=2.0), mode="nearest")
    assert set(moved.unique().tolist()) <= {0.0, 200.0, 500.0}


def test_ffd_matches_the_textbook_bspline_sum():
    """u(x) = Σ_j B(u_x − j) c_j over the 4^ndim neighbouring control points, written out naively."""
    grid = oblique_grid(size=(10, 9, 4))
    ffd = random_ffd(grid, spacing=9.0)
    points = grid.world_points(dtype=torch.float64)[::2, ::3, ::2].reshape(-1, 3)

    def b(t):
        t = abs(t)
        return (4 - 6 * t ** 2 + 3 * t ** 3) / 6 if t < 1 else ((2 - t) ** 3 / 6 if t < 2 else 0.0)

    coeffs = ffd.params.detach().double().numpy()
    index = ffd.control_grid.world_to_index(points).numpy()
    expected = np.zeros_like(index)
    for p, u in enumerate(index):
        for j in itertools.product(*[range(int(np.floor(c)) - 1, int(np.floor(c)) + 3) for c in u]):
            weight = np.prod([b(c - jj) for c, jj in zip(u, j)])
            expected[p] += weight * coeffs[(slice(None),) + tuple(reversed(j))]
    got = ffd.displacement(points).detach().numpy()
    assert np.allclose(got, expected, atol=1e-5)


def test_linear_distortion_is_zero_for_rigid_maps_and_symmetric_in_scale():
    rigid = RigidTransform(3, torch.tensor([0.3, -0.2, 0.1, 5.0, 1.0, 2.0], dtype=torch.float64))
    assert float(linear_distortion(rigid)) < 1e-12
    grow = AffineTransform(3, torch.tensor([1.0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], dtype=torch.float64,
                                           requires_grad=True))
    shrink = AffineTransform(3, torch.tensor([-0.5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], dtype=torch.float64))
    assert float(linear_distortion(grow).detach()) == pytest.approx(math.log(2.0) ** 2)
    assert float(linear_distortion(shrink)) == pytest.approx(float(linear_distortion(grow).detach()))
    linear_distortion(grow).backward()
    assert float(grow.params.grad[0]) == pytest.approx(2 * math.log(2.0) / 2.0)  # d/ds log² s at s = 2
    identity = AffineTransform(3, torch.zeros(12, dtype=torch.float64, requires_grad=True))
    linear_distortion(identity).backward()
    assert torch.isfinite(identity.params.grad).all() and float(identity.params.grad.abs().max()) == 0.0


def test_ffd_on_an_aligned_grid_is_evaluated_separably_with_the_same_values_and_gradients():
    from mvmm.spatial.transforms import map_grid

    domain = oblique_grid()
    ffd = random_ffd(domain, spacing=12.0)
    for grid in (domain, domain.coarsened(4.0), domain.resampled((1.3, 2.7, 3.0))):
        separable = ffd.grid_displacement(grid)
        pointwise = ffd.displacement(grid.world_points()).movedim(-1, 0)
        assert separable.shape == (3,) + grid.shape
        assert torch.allclose(separable, pointwise, atol=1e-4), grid
        grads = []
        for u in (separable, pointwise):
            ffd.params.grad = None
            (u * torch.linspace(-1, 1, u.numel()).reshape(u.shape)).sum().backward(retain_graph=True)
            grads.append(ffd.params.grad.clone())
        assert torch.allclose(grads[0], grads[1], atol=1e-4)
    # a grid of another direction has no separable form; map_grid then samples point by point
    axis_aligned = Grid((10, 10, 4), (3.0, 3.0, 5.0), (-10.0, 0.0, -15.0), tuple(np.eye(3).ravel()))
    assert ffd.grid_displacement(axis_aligned) is None
    rigid = RigidTransform(3, torch.tensor([0.1, -0.05, 0.2, 3.0, -2.0, 1.0], dtype=torch.float64),
                           center=domain.center_world())
    chain = SequentialTransform(ffd, rigid)
    for grid in (domain, axis_aligned):
        assert torch.allclose(map_grid(chain, grid), chain(grid.world_points()), atol=1e-4)
