import math

import numpy as np
import pytest
import torch

from mvmm.data import io
from mvmm.core.grid import Grid
from mvmm.core.errors import InputError


def oblique_grid():
    a = math.radians(20)
    rot = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    return Grid((5, 4, 3), (0.7, 1.3, 6.0), (10.0, -20.0, 5.0), tuple(rot.ravel()))


def test_index_world_round_trip_oblique_anisotropic():
    grid = oblique_grid()
    idx = torch.tensor([[0.0, 0.0, 0.0], [4.0, 3.0, 2.0], [1.5, 0.25, 1.0]], dtype=torch.float64)
    world = grid.index_to_world(idx)
    assert torch.allclose(world[0], torch.tensor(grid.origin, dtype=torch.float64))
    # one step along x moves spacing[0] mm along the first direction column
    step = grid.index_to_world(torch.tensor([[1.0, 0, 0]], dtype=torch.float64))[0] - world[0]
    assert torch.allclose(step, torch.as_tensor(grid.direction_matrix[:, 0] * 0.7))
    assert torch.allclose(grid.world_to_index(world), idx)


def test_world_points_shape_and_normalised_extremes():
    grid = oblique_grid()
    pts = grid.world_points(dtype=torch.float64)
    assert pts.shape == (3, 4, 5, 3)  # (D, H, W, xyz)
    n = grid.world_to_normalized(pts)
    # voxel centres sit half a voxel inside ±1 (align_corners=False)
    assert torch.allclose(n[0, 0, 0], torch.tensor([-1 + 1 / 5, -1 + 1 / 4, -1 + 1 / 3], dtype=torch.float64))
    assert torch.allclose(n[-1, -1, -1], torch.tensor([1 - 1 / 5, 1 - 1 / 4, 1 - 1 / 3], dtype=torch.float64))


def test_grid_rejects_bad_geometry():
    with pytest.raises(InputError, match="spacing"):
        Grid((3, 3), (1.0, 0.0), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0))
    with pytest.raises(InputError, match="singular"):
        Grid((3, 3), (1.0, 1.0), (0.0, 0.0), (1.0, 0.0, 1.0, 0.0))


@pytest.mark.parametrize("ndim", [2, 3])
def test_io_round_trip_keeps_geometry_and_label_values(tmp_path, ndim):
    grid = oblique_grid() if ndim == 3 else Grid((5, 4), (0.8, 1.1), (3.0, -2.0), (0.0, -1.0, 1.0, 0.0))
    labels = np.random.default_rng(0).choice([0, 200, 500, 600], size=grid.shape).astype(np.int16)
    path = tmp_path / "labels.nii.gz"
    io.write_array(path, labels, grid)
    back, back_grid, file_ndim = io.read_array(path, "--x")
    assert file_ndim == ndim
    assert back_grid.same_geometry(grid, tol=1e-5)
    np.testing.assert_array_equal(back, labels)
    assert set(np.unique(back)) == {0, 200, 500, 600}


def test_io_round_trip_of_stacked_maps(tmp_path):
    grid = oblique_grid()
    maps = np.random.default_rng(1).random((4,) + grid.shape).astype(np.float32)
    io.write_array(tmp_path / "p.nii.gz", maps, grid)
    back, back_grid, file_ndim = io.read_array(tmp_path / "p.nii.gz", "--atlas")
    assert file_ndim == 4 and back.shape == maps.shape
    assert back_grid.same_geometry(grid, tol=1e-5)
    np.testing.assert_allclose(back, maps)


def test_read_errors_name_the_file(tmp_path):
    with pytest.raises(InputError, match=r"^images: file not found: .*missing.nii.gz"):
        io.read_array(tmp_path / "missing.nii.gz", "images")
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(b"not an image")
    with pytest.raises(InputError, match=r"^images: .*junk.nii.gz is truncated or corrupt \(Not a gzipped file"):
        io.read_array(junk, "images")


def test_write_is_atomic_on_failure(tmp_path):
    grid = oblique_grid()
    target = tmp_path / "x.nii.gz"
    target.write_bytes(b"precious")
    with pytest.raises(ValueError):
        io.write_array(target, np.zeros((2, 2)), grid)  # wrong shape: nothing replaced, no temp left
    assert target.read_bytes() == b"precious"
    assert [p.name for p in tmp_path.iterdir()] == ["x.nii.gz"]


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".mha"])
def test_nan_and_inf_in_files_are_reported_not_zeroed(tmp_path, suffix):
    grid = oblique_grid()
    arr = np.random.default_rng(0).random(grid.shape).astype(np.float32)
    arr[1, 2, 3], arr[0, 0, 0] = np.nan, np.inf
    path = tmp_path / f"bad{suffix}"
    io.write_array(path, arr, grid)
    with pytest.raises(InputError, match=r"^images: .*bad.* has 2 NaN/Inf voxels"):
        io.read_array(path, "images")
