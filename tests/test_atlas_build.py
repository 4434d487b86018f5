import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mvmm.atlas_build import GroupwiseSettings, build_atlas, read_label_maps
from mvmm.cli import main
from mvmm.data import io
from mvmm.data.anatomy import short_axis_frame
from mvmm.data.atlas import Atlas
from mvmm.core.grid import Grid
from mvmm.data.labels import CARDIAC_LABELS
from mvmm.core.errors import InputError
from mvmm.metrics import structure_metrics
from mvmm.segment import load_subject
from conftest import SHARED_DATA


def heart_map(grid: Grid, centre, scale=1.0, angle=0.0) -> np.ndarray:
    """A 2D LV/Myo/RV label map on ``grid``: LV disc, myocardial ring, RV ellipse, in mm about ``centre``."""
    points = grid.world_points(dtype=torch.float64).numpy() - np.asarray(centre)
    c, s = np.cos(angle), np.sin(angle)
    x = (c * points[..., 0] + s * points[..., 1]) / scale
    y = (-s * points[..., 0] + c * points[..., 1]) / scale
    r = np.hypot(x, y)
    out = np.zeros(grid.shape, dtype=np.int16)
    out[((x + 28) / 14) ** 2 + (y / 26) ** 2 < 1] = 600
    out[r < 22] = 200
    out[r < 14] = 500
    return out


def varied_maps(tmp_path, n=6, seed=0):
    """The same heart on ``n`` different grids, moved (≤ 8 mm, ≤ 10°) and scaled (±8 %) in world space."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        spacing = tuple(rng.uniform(1.0, 1.6, 2))
        grid = Grid((int(110 / spacing[0]), int(100 / spacing[1])), spacing, tuple(rng.uniform(-60, -45, 2)),
                    (1.0, 0.0, 0.0, 1.0))
        labels = heart_map(grid, rng.uniform(-8, 8, 2), rng.uniform(0.92, 1.08), np.radians(rng.uniform(-10, 10)))
        paths.append(tmp_path / f"map{i}.nii.gz")
        io.write_array(paths[-1], labels, grid)
    return paths


def test_groupwise_registration_sharpens_the_atlas_and_keeps_the_mean_shape(tmp_path):
    paths = varied_maps(tmp_path)
    plain, plain_report = build_atlas(paths, GroupwiseSettings(register="none", sigma_mm=0.0))
    registered, report = build_atlas(paths, GroupwiseSettings(register="affine", sigma_mm=0.0))
    before, after = report["dice_with_template"]["initial"], report["dice_with_template"]["final"]
    assert plain_report["dice_with_template"]["final"] == before
    for name in ("Myo", "LV", "RV"):
        assert after[name] > 0.95 and after[name] > before[name] + 0.05, (name, before, after)
    # the registered atlas is sharper: lower mean entropy where the heart is
    def entropy(atlas):
        p = atlas.probabilities.clamp_min(1e-8)
        return float((-(p * p.log()).sum(0))[p[0] < 0.99].mean())
    assert entropy(registered) < 0.6 * entropy(plain)
    # the mean shape stays the heart of the maps (unbiased): its argmax matches the undeformed heart
    grid = registered.grid
    reference = heart_map(grid, (0.0, 0.0))
    shape = np.asarray(CARDIAC_LABELS.values)[registered.probabilities.argmax(0).numpy()]
    for value in (200, 500, 600):
        assert structure_metrics(shape == value, reference == value, grid.spacing)["dice"] > 0.85, value


@pytest.mark.parametrize("kind", ["ffd", "svf"])
def test_groupwise_deformable_levels_continue_the_affine_ones_without_folding(tmp_path, kind):
    paths = varied_maps(tmp_path, n=4)
    settings = dict(sigma_mm=0.0, rounds=1, max_outer=2, control_spacing=30.0)
    affine_atlas, affine = build_atlas(paths, GroupwiseSettings(register="affine", **settings))
    atlas, deformable = build_atlas(paths, GroupwiseSettings(register=kind, **settings))
    # its coarse stage is the mean before the non-linear level: the affine build's atlas
    assert affine_atlas.coarse is None and atlas.coarse is not None
    assert torch.allclose(atlas.coarse, affine_atlas.probabilities, atol=1e-6)
    assert float((atlas.probabilities - affine_atlas.probabilities).abs().max()) > 0.02
    atlas.save(tmp_path / "atlas.nii.gz")  # saved beside it, read back with it
    back = Atlas.read([tmp_path / "atlas.nii.gz"])
    assert torch.allclose(back.coarse, atlas.coarse, atol=1e-6) and back.coarse_stage().coarse is None
    assert torch.allclose(back.coarse_stage().probabilities, atlas.coarse, atol=1e-6)
    # the same schedule up to affine, then a non-linear level: the maps agree with their mean at least as well
    after_affine, after = affine["dice_with_template"]["final"], deformable["dice_with_template"]["final"]
    assert np.mean(list(after.values())) >= np.mean(list(after_affine.values())) - 0.005, (after_affine, after)
    assert len(deformable["ffd_jacobians"]) == 4
    assert all(stats["folding_share"] == 0.0 for stats in deformable["ffd_jacobians"])


def test_axes_frame_ignores_headers_and_places_the_atlas_on_a_target(tmp_path):
    grid = Grid((80, 70), (1.25, 1.25), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0))
    labels = heart_map(grid, grid.center_world() + np.array([5.0, -3.0]))
    paths = []
    # same voxels, headers moved anywhere and turned (within 45° of the heart's usual orientation)
    for i, angle in enumerate((0.0, 0.6, -0.25)):
        c, s = np.cos(angle), np.sin(angle)
        moved = Grid(grid.size, grid.spacing, (100.0 * i, -50.0 * i), (c, -s, s, c))
        paths.append(tmp_path / f"m{i}.nii.gz")
        io.write_array(paths[-1], labels, moved)
    # and the first map stored with its x axis reversed (the same voxels at the same world positions)
    flipped = Grid(grid.size, grid.spacing, (grid.origin[0] + (grid.size[0] - 1) * grid.spacing[0], grid.origin[1]),
                   (-1.0, 0.0, 0.0, 1.0))
    paths.append(tmp_path / "m0_flipped.nii.gz")
    io.write_array(paths[-1], labels[:, ::-1].copy(), flipped)
    world, world_report = build_atlas(paths, GroupwiseSettings(register="none", frame="world"))
    axes, axes_report = build_atlas(paths, GroupwiseSettings(register="none", frame="axes"))
    assert min(axes_report["dice_with_template"]["initial"].values()) > 0.99
    # in world space the headers scatter the maps: the template spans them all
    assert world.grid.extent_mm().max() > 200 and axes.grid.extent_mm().max() < 120
    assert axes.frame == "axes" and np.allclose(axes.grid.direction_matrix, np.eye(2))
    # placed on a target, the atlas takes the heart's frame of the target (the target's axis closest to
    # the patient's left first: here its −y axis), its origin on the target's field-of-view centre
    target = Grid(grid.size, grid.spacing, (30.0, 40.0), (0.0, -1.0, 1.0, 0.0))
    placed = axes.placed_on(target)
    assert placed.frame == "world"
    frame = short_axis_frame(target)
    assert np.allclose(frame, [[1.0, 0.0], [0.0, 1.0]]) and np.allclose(placed.grid.direction_matrix, frame)
    origin_of_frame = placed.grid.index_to_world(
        axes.grid.world_to_index(torch.zeros(1, 2, dtype=torch.float64)))[0].numpy()
    assert np.allclose(origin_of_frame, target.center_world(), atol=1e-6)
    # the anatomy lands where it sat in the maps' fields of view (along the axes)
    offset = grid.world_points(dtype=torch.float64)[torch.from_numpy(labels > 0)].mean(0).numpy() - grid.center_world()
    assert np.allclose(axes_report["anatomy_offset_from_fov_centre_mm"], offset, atol=0.1)
    heart = placed.probabilities[0] < 0.5
    centroid = placed.grid.world_points(dtype=torch.float64)[heart].mean(0).numpy()
    expected = target.center_world() + frame @ offset
    assert np.linalg.norm(centroid - expected) < 1.0, (centroid, expected)
    # saved and read back, the frame survives; mvmm segment's loader places it on the reference
    axes.save(tmp_path / "atlas.nii.gz")
    back = Atlas.read([tmp_path / "atlas.nii.gz"], image_ndim=2)
    assert back.frame == "axes" and back.labels == axes.labels and back.grid.same_geometry(axes.grid)
    io.write_array(tmp_path / "image.nii.gz", np.random.default_rng(0).normal(size=target.shape), target)
    subject = load_subject([tmp_path / "image.nii.gz"], atlas=[tmp_path / "atlas.nii.gz"])
    assert subject.atlas.frame == "world" and subject.atlas.grid.same_geometry(placed.grid)


def test_read_label_maps_names_the_file_that_is_wrong(tmp_path):
    grid = Grid((20, 20), (1.0, 1.0), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0))
    good = tmp_path / "good.nii.gz"
    io.write_array(good, heart_map(grid, grid.center_world(), scale=0.3), grid)
    empty = tmp_path / "empty.nii.gz"
    io.write_array(empty, np.zeros(grid.shape, dtype=np.int16), grid)
    real = tmp_path / "real.nii.gz"
    io.write_array(real, np.full(grid.shape, 0.5, dtype=np.float32), grid)
    odd = tmp_path / "odd.nii.gz"
    io.write_array(odd, np.full(grid.shape, 7, dtype=np.int16), grid)
    with pytest.raises(InputError, match="empty.nii.gz.*no labelled voxel"):
        read_label_maps([good, empty], None, "world")
    with pytest.raises(InputError, match="real.nii.gz.*not an integer"):
        read_label_maps([good, real], None, "world")
    with pytest.raises(InputError, match="odd.nii.gz"):
        read_label_maps([good, odd], CARDIAC_LABELS, "world")
    with pytest.raises(InputError, match="not found"):
        read_label_maps([good, tmp_path / "missing.nii.gz"], None, "world")
    with pytest.raises(InputError, match=r"^GroupwiseSettings.register: expected one of"):
        GroupwiseSettings(register="bspline")


def test_atlas_build_cli_registers_maps_on_different_grids(tmp_path):
    paths = varied_maps(tmp_path, n=4, seed=1)
    out = tmp_path / "atlas.nii.gz"
    result = CliRunner().invoke(main, ["atlas", "build", "--label-maps", *map(str, paths), "--register", "affine",
                                       "--out", str(out), "--quiet", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    sidecar = json.loads((tmp_path / "atlas.json").read_text())
    assert sidecar["frame"] == "world" and sidecar["build"]["settings"]["register"] == "affine"
    final = sidecar["build"]["dice_with_template"]["final"]
    assert min(final.values()) > 0.9
    again = CliRunner().invoke(main, ["atlas", "build", "--labels", *map(str, paths), "--out", str(out)])
    assert again.exit_code == 1 and "--force" in again.output
    # without registration, maps on different grids are resampled by their headers
    plain = CliRunner().invoke(main, ["atlas", "build", "--label-maps", *map(str, paths), "--out",
                                      str(tmp_path / "plain.nii.gz"), "--quiet"])
    assert plain.exit_code == 0, plain.output
    # the old name of --label-maps still works, with a deprecation warning
    old = CliRunner().invoke(main, ["atlas", "build", "--labels", *map(str, paths), "--out",
                                    str(tmp_path / "old.nii.gz"), "--quiet"])
    assert old.exit_code == 0 and (tmp_path / "old.nii.gz").exists(), old.output
    missing = CliRunner().invoke(main, ["atlas", "build", "--out", str(tmp_path / "none.nii.gz")])
    assert missing.exit_code == 2 and "Missing option '--label-maps'" in missing.output


MSCMR = SHARED_DATA / "mscmr"


@pytest.mark.skipif(not (MSCMR / "patient1_LGE_manual.nii.gz").exists(), reason="MS-CMRSeg data not available")
def test_groupwise_atlas_of_real_patients_is_more_consistent_than_the_plain_average():
    paths = [MSCMR / f"patient{p}_LGE_manual.nii.gz" for p in (2, 3, 4, 5)]
    settings = dict(frame="axes", spacing=(2.0, 2.0, 5.0), max_outer=2, rounds=1)
    _, report = build_atlas(paths, GroupwiseSettings(register="affine", **settings))
    before, after = report["dice_with_template"]["initial"], report["dice_with_template"]["final"]
    for name in ("Myo", "LV", "RV"):
        assert after[name] > before[name] + 0.03, (name, before, after)
