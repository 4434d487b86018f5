import math

import numpy as np
import pytest
import torch
from torch import nn

from mvmm.core.grid import Grid
from mvmm.spatial import AffineTransform, IdentityTransform, RigidTransform, TranslationTransform, sample_image


def oblique_grid():
    a, b = math.radians(25), math.radians(10)
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    return Grid((40, 36, 12), (1.2, 1.2, 4.0), (-20.0, 15.0, -30.0), tuple((rz @ rx).ravel()))


def blob(grid, centre_world, radius=6.0):
    """A smooth ball at a world position, as an image [1, *S]."""
    d = grid.world_points(dtype=torch.float64) - torch.as_tensor(centre_world)
    return torch.exp(-(d ** 2).sum(-1) / (2 * radius ** 2)).unsqueeze(0)


def centroid_world(grid, image):
    w = image[0] / image[0].sum()
    return (grid.world_points(dtype=torch.float64) * w.unsqueeze(-1)).sum(dim=tuple(range(grid.ndim)))


def test_identity_warp_reproduces_the_image():
    grid = oblique_grid()
    data = torch.rand((1,) + grid.shape, dtype=torch.float64)
    for transform in (None, IdentityTransform(), RigidTransform(3), AffineTransform(3)):
        values, inside = sample_image(data, grid, grid.world_points(dtype=torch.float64), transform)
        assert bool(inside.all()) and torch.allclose(values, data, atol=1e-9)


def test_known_translation_moves_the_phantom_in_mm():
    grid = oblique_grid()
    centre = torch.as_tensor(grid.center_world())
    image = blob(grid, centre)
    shift = torch.tensor([4.0, -3.0, 6.0], dtype=torch.float64)
    # pulling back through T(x) = x + t shows at x what sits at x + t: the ball moves by -t
    moved, _ = sample_image(image, grid, grid.world_points(dtype=torch.float64), TranslationTransform(3, shift))
    assert torch.allclose(centroid_world(grid, moved), centre - shift, atol=0.15)


def test_known_rotation_about_the_centre():
    grid = oblique_grid()
    centre = torch.as_tensor(grid.center_world())
    offset = torch.tensor([10.0, 0.0, 0.0], dtype=torch.float64)
    image = blob(grid, centre + offset, radius=4.0)
    params = torch.tensor([0.0, 0.0, math.radians(30), 0.0, 0.0, 0.0], dtype=torch.float64)
    rigid = RigidTransform(3, params, center=centre)
    moved, _ = sample_image(image, grid, grid.world_points(dtype=torch.float64), rigid)
    rot = rigid.matrix_and_translation()[0]
    expected = centre + rot.T @ offset  # pull-back: the ball goes to T^-1 of where it was
    assert torch.allclose(centroid_world(grid, moved), expected, atol=0.2)
    assert torch.allclose(rigid.angles_degrees()[2], torch.tensor(30.0, dtype=torch.float64))


@pytest.mark.parametrize("cls", [RigidTransform, AffineTransform])
def test_inverse_after_forward_is_identity(cls):
    torch.manual_seed(0)
    n = len(cls(3).identity_params())
    t = cls(3, torch.randn(n, dtype=torch.float64) * 0.2, center=[5.0, -3.0, 2.0])
    pts = torch.randn(50, 3, dtype=torch.float64) * 30
    assert torch.allclose(t.inverse()(t(pts)), pts, atol=1e-9)
    assert torch.allclose(t.compose(t.inverse())(pts), pts, atol=1e-9)


def test_warp_gradcheck():
    grid = Grid((7, 6, 5), (1.5, 1.0, 3.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    data = torch.rand((1,) + grid.shape, dtype=torch.float64)
    pts = grid.world_points(dtype=torch.float64)[1:-1, 1:-1, 1:-1]

    def warped(params):
        return sample_image(data, grid, pts, RigidTransform(3, params, center=grid.center_world()))[0]

    params = torch.tensor([0.05, -0.03, 0.02, 0.3, -0.2, 0.4], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(warped, (params,), eps=1e-6, atol=1e-5)


def test_parameter_slot_learnable_fixed_or_callable():
    learnable = RigidTransform(3)
    assert [p.shape for p in learnable.parameters()] == [torch.Size([6])]
    fixed = RigidTransform(3, torch.zeros(6))
    assert list(fixed.parameters()) == [] and "params_tensor" in dict(fixed.named_buffers())
    head = nn.Linear(2, 6).double()
    produced = RigidTransform(3, lambda: head(torch.ones(2, dtype=torch.float64)))
    out = produced(torch.zeros(1, 3, dtype=torch.float64)).sum()
    out.backward()
    assert head.weight.grad is not None  # gradients reach the network that fills the slot
    with pytest.raises(ValueError, match=r"expects parameters of shape \[6\] or \[B, 6\], got \[5\]"):
        RigidTransform(3, torch.zeros(5))
    with pytest.raises(TypeError, match="Parameter, a tensor or a callable"):
        RigidTransform(3, "rigid")


def test_2d_rigid():
    t = RigidTransform(2, torch.tensor([math.pi / 2, 1.0, 0.0], dtype=torch.float64))
    assert torch.allclose(t(torch.tensor([[1.0, 0.0]], dtype=torch.float64)), torch.tensor([[1.0, 1.0]], dtype=torch.float64))


def test_a_batched_rigid_head_moves_each_subject_independently():
    head = nn.Linear(4, 6).double()
    features = torch.randn(3, 4, dtype=torch.float64)
    batched = RigidTransform(3, lambda: head(features), center=[10.0, -5.0, 2.0])
    points = torch.randn(3, 7, 5, 3, dtype=torch.float64) * 30  # [B, *S, 3]
    moved = batched(points)
    assert moved.shape == points.shape and batched.batch_size == 3
    with torch.no_grad():
        params = head(features)
    for b in range(3):  # transform b alone on subject b's points
        single = batched.with_params(params[b])
        torch.testing.assert_close(moved[b], single(points[b]))
    moved.square().sum().backward()
    assert head.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"B = 3"):
        batched(points[:2])
    wrong = RigidTransform(3, lambda: torch.zeros(3, 7, dtype=torch.float64))  # a head of the wrong width
    expected = r"RigidTransform \(3D\) expects parameters of shape \[6\] or \[B, 6\], got \[3, 7\]"
    with pytest.raises(ValueError, match=expected):
        wrong(points)


@pytest.mark.parametrize("kind", [RigidTransform, AffineTransform])
def test_inverse_is_exact_and_keeps_gradients(kind):
    params = (torch.randn(kind(3).identity_params().shape, dtype=torch.float64) * 0.2).requires_grad_(True)
    transform = kind(3, params * 1.0, center=[1.0, 2.0, 3.0])
    points = torch.randn(10, 3, dtype=torch.float64) * 20
    back = transform.inverse()(transform(points))
    torch.testing.assert_close(back, points)
    transform.inverse()(points).sum().backward()
    assert params.grad is not None and params.grad.abs().sum() > 0


def test_3d_resampling_split_over_threads_gives_the_same_values_and_gradients(monkeypatch):
    """The CPU 3D sampler is parallel over the batch only: sample_image splits the points into batch
    entries, which must not change a value or a gradient."""
    from mvmm.spatial import warp
    grid = Grid((20, 30, 24), (2.0, 1.5, 1.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))
    data = torch.rand((3,) + grid.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    points = (torch.rand(1001, 1, 1, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 40
              - 5).requires_grad_(True)  # some outside the field of view
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        results = []
        for per_thread in (100, 10 ** 9):  # split into two batch entries (1001 points: padded), then not
            monkeypatch.setattr(warp, "MIN_POINTS_PER_THREAD", per_thread)
            assert warp._cpu_parts(data, points) == (2 if per_thread == 100 else 1)
            values, inside = warp.sample_image(data, grid, points)
            weights = torch.arange(3.0, dtype=values.dtype).reshape(3, 1, 1, 1)
            (gradient,) = torch.autograd.grad((values * weights).sum(), points)
            results.append((values, inside, gradient))
    finally:
        torch.set_num_threads(threads)
    (v2, i2, g2), (v1, i1, g1) = results
    assert v2.shape == v1.shape == (3, 1001, 1, 1)
    assert not bool(i1.all()) and bool(i1.any())
    torch.testing.assert_close(v2, v1, rtol=0, atol=0)
    assert torch.equal(i2, i1)
    torch.testing.assert_close(g2, g1, rtol=0, atol=0)
