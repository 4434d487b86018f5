import json
import math

import numpy as np
import pytest
import torch

from mvmm.cli import main
from mvmm.data import io
from mvmm.core.grid import Grid
from mvmm.data.image import Image
from mvmm.core.errors import InputError
from mvmm.register import PairwiseRegistration, PairwiseSettings
from mvmm.data.transform_files import load_transforms
from mvmm.spatial import FreeFormDeformation, RigidTransform, map_grid, sample_image
from mvmm.spatial.similarity import local_ncc, mutual_information, similarity_loss, soft_dice, ssd
from test_joint import errors, misaligned_case


def blobs(shape=(48, 40), seed=0):
    """A smooth random 2D image [1, *shape]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 1, *shape, generator=g)
    for _ in range(4):
        x = torch.nn.functional.avg_pool2d(x, 5, stride=1, padding=2)
    return (x[0] - x.mean()) / x.std()


def test_similarity_losses_are_lowest_at_alignment_and_invariant_where_they_should_be():
    f = blobs()
    mask = torch.ones(f.shape[1:], dtype=torch.bool)
    shifted = torch.roll(f, 3, dims=2)
    for name in ("ssd", "ncc", "mi"):
        loss = similarity_loss(name)
        assert float(loss(f, f, mask)) < float(loss(f, shifted, mask)), name
    assert float(ssd(f, f, mask)) == 0.0
    # NCC and MI ignore a linear change of contrast (also an inversion: LGE against bSSFP)
    assert float(local_ncc(f, -2 * f + 3, mask)) == pytest.approx(float(local_ncc(f, f, mask)), abs=1e-3)
    assert float(mutual_information(f, -2 * f + 3, mask)) == pytest.approx(float(mutual_information(f, f, mask)),
                                                                             rel=1e-3)
    # soft Dice of one-hot maps: 0 when identical, 1 when disjoint
    onehot = torch.stack([f[0] <= 0, f[0] > 0]).float()
    assert float(soft_dice(onehot, onehot, mask)) == pytest.approx(0.0, abs=1e-6)
    assert float(soft_dice(onehot, onehot.flip(0), mask)) == pytest.approx(1.0, abs=1e-6)
    # only the masked voxels count
    half = mask.clone()
    half[:, 20:] = False
    messed = f.clone()
    messed[:, :, 20:] = 0
    assert float(ssd(f, messed, half)) == 0.0
    with pytest.raises(InputError, match="^metric: expected one of"):
        similarity_loss("cc")


def test_mutual_information_is_differentiable():
    f, m = blobs(seed=0), blobs(seed=1).requires_grad_(True)
    loss = mutual_information(f, m, torch.ones(f.shape[1:], dtype=torch.bool))
    loss.backward()
    assert torch.isfinite(m.grad).all() and float(m.grad.abs().sum()) > 0


@pytest.mark.parametrize("metric", ["mi", "ncc"])
def test_pairwise_rigid_registration_recovers_a_misalignment_between_sequences(metric):
    subject, truth, heart = misaligned_case(0, angle_deg=8.0, shift_mm=(7.0, -5.0))
    lge, c0 = subject.images
    result = PairwiseRegistration(lge, c0, PairwiseSettings(transform="rigid", metric=metric, init="header")).run()
    before_mm, _ = errors(RigidTransform(2, torch.zeros(3, dtype=torch.float64)), truth, heart)
    after_mm, after_deg = errors(result.transform, truth, heart)
    assert before_mm > 8
    assert after_mm < 1.0 and after_deg < 1.0, (after_mm, after_deg)
    assert result.loss_after < result.loss_before
    assert [h["level"] for h in result.history][0] == "rigid"


def deformed_blobs():
    """Fixed blobs and the moving image they become through a known smooth FFD T: fixed(x) = moving(T(x))."""
    grid = Grid((64, 56), (1.5, 1.5), (-40.0, -30.0), (1.0, 0.0, 0.0, 1.0))
    fixed_data = blobs((56, 64), seed=3)
    truth = FreeFormDeformation(grid, 30.0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        truth.params.copy_(5.0 * torch.randn(truth.params.shape, generator=g))
    points = grid.world_points()
    inverse = truth.inverse()
    with torch.no_grad():
        moving_data, _ = sample_image(fixed_data, grid, points, inverse)  # moving(y) = fixed(T⁻¹(y))
    return Image(fixed_data, grid, "fixed"), Image(moving_data, grid, "moving"), truth


@pytest.mark.parametrize("kind", ["ffd", "svf"])
def test_pairwise_deformable_registration_recovers_a_smooth_deformation_better_than_affine(kind):
    fixed, moving, truth = deformed_blobs()
    grid = fixed.grid
    points = grid.world_points()
    inner = (points - torch.as_tensor(grid.center_world(), dtype=torch.float32)).abs().max(-1).values < 25

    def error(transform):
        with torch.no_grad():
            return float((transform(points) - truth(points)).norm(dim=-1)[inner].mean())

    settings = dict(metric="ssd", init="header", control_spacing=30.0, ffd_levels=1, grid_spacing=1.5)
    affine = PairwiseRegistration(fixed, moving, PairwiseSettings(transform="affine", **settings)).run()
    deformable = PairwiseRegistration(fixed, moving, PairwiseSettings(transform=kind, **settings)).run()
    identity_error = error(torch.nn.Identity())
    assert identity_error > 2.0
    assert error(deformable.transform) < 0.5 * min(identity_error, error(affine.transform)), \
        (identity_error, error(affine.transform), error(deformable.transform))
    assert deformable.jacobian["folding_share"] == 0.0
    assert [h["level"] for h in deformable.history][-1] == f"{kind} 30 mm"


def test_register_cli_saves_an_svf_as_a_displacement_field_that_reloads(tmp_path):
    from click.testing import CliRunner

    fixed, moving, _ = deformed_blobs()
    fixed.write(tmp_path / "fixed.nii.gz")
    moving.write(tmp_path / "moving.nii.gz")
    out = tmp_path / "reg"
    args = ["register", "--fixed", tmp_path / "fixed.nii.gz", "--moving", tmp_path / "moving.nii.gz", "--transform",
            "svf", "--metric", "ssd", "--init", "header", "--control-spacing", "30", "--out", out, "--quiet",
            "--device", "cpu"]
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    index = json.loads((out / "transforms" / "transforms.json").read_text())
    assert [(e["type"], e["kind"]) for e in index["transforms"]["moving"]] == \
        [("displacement", "StationaryVelocityField"), ("linear", "AffineTransform")]
    report = json.loads((out / "report.json").read_text())
    assert report["loss_after"] < report["loss_before"] and report["jacobian"]["folding_share"] == 0.0
    # the saved field reproduces the moved image mvmm wrote
    loaded = load_transforms(out / "transforms")["moving"]
    with torch.no_grad():
        again, _ = sample_image(moving.data, moving.grid, map_grid(loaded, fixed.grid))
    written, _, _ = io.read_array(out / "moved.nii.gz", "moved")
    assert np.allclose(again[0].numpy(), written, atol=1e-4)


def test_register_cli_writes_a_transform_simpleitk_applies_the_same_way(tmp_path):
    import SimpleITK as sitk
    from click.testing import CliRunner

    subject, truth, heart = misaligned_case(1, angle_deg=-6.0, shift_mm=(-4.0, 6.0))
    lge, c0 = subject.images
    lge.write(tmp_path / "LGE.nii.gz")
    c0.write(tmp_path / "C0.nii.gz")
    out = tmp_path / "reg"
    args = ["register", "--fixed", tmp_path / "LGE.nii.gz", "--moving", tmp_path / "C0.nii.gz", "--transform", "rigid",
            "--init", "header", "--out", out, "--quiet", "--device", "cpu"]
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["loss_after"] < report["loss_before"]
    itk = sitk.ReadTransform(str(out / "transforms" / "moving_0.tfm"))
    estimate = np.asarray([itk.TransformPoint(tuple(map(float, p))) for p in heart[::50].numpy()])
    assert np.linalg.norm(estimate - truth(heart[::50]).numpy(), axis=1).mean() < 1.0
    moved, grid, _ = io.read_array(out / "moved.nii.gz", "moved")
    resampled = sitk.GetArrayFromImage(sitk.Resample(sitk.ReadImage(str(tmp_path / "C0.nii.gz")),
                                                     sitk.ReadImage(str(tmp_path / "LGE.nii.gz")), itk,
                                                     sitk.sitkLinear, 0.0))
    inside = resampled != 0
    assert grid.same_geometry(lge.grid) and np.allclose(moved[inside], resampled[inside], atol=1e-3)
    # the output folder is not overwritten without --force; bad inputs name the argument
    again = CliRunner().invoke(main, [str(a) for a in args])
    assert again.exit_code == 1 and "--force" in again.output
    missing = CliRunner().invoke(main, ["register", "--fixed", str(tmp_path / "no.nii.gz"), "--moving",
                                        str(tmp_path / "C0.nii.gz"), "--out", str(tmp_path / "r2")])
    assert missing.exit_code == 1 and "--fixed" in missing.output and "no.nii.gz" in missing.output


def test_register_rejects_empty_masks_and_mixed_dimensions(tmp_path, phantom_files):
    from click.testing import CliRunner

    subject, _, _ = misaligned_case(0, angle_deg=0.0, shift_mm=(0.0, 0.0))
    lge = subject.images[0]
    lge.write(tmp_path / "LGE.nii.gz")
    io.write_array(tmp_path / "empty.nii.gz", np.zeros(lge.grid.shape, dtype=np.uint8), lge.grid)
    base = ["register", "--fixed", tmp_path / "LGE.nii.gz", "--quiet", "--device", "cpu"]
    result = CliRunner().invoke(main, [str(a) for a in base + ["--moving", tmp_path / "LGE.nii.gz", "--fixed-mask",
                                                               tmp_path / "empty.nii.gz", "--out", tmp_path / "a"]])
    assert result.exit_code == 1 and "--fixed-mask" in result.output and "empty" in result.output
    result = CliRunner().invoke(main, [str(a) for a in base + ["--moving", phantom_files["C0"], "--out", tmp_path / "b"]])
    assert result.exit_code == 1 and "--moving" in result.output and "3D" in result.output


def test_registration_refuses_images_that_do_not_overlap():
    subject, _, _ = misaligned_case(0, angle_deg=0.0, shift_mm=(0.0, 0.0))
    lge, c0 = subject.images
    far = Image(c0.data, Grid(c0.grid.size, c0.grid.spacing, (5000.0, 5000.0), c0.grid.direction), "far")
    with pytest.raises(InputError, match="overlap"):
        PairwiseRegistration(lge, far, PairwiseSettings(transform="rigid", init="header")).run()
    assert math.isfinite(PairwiseRegistration(lge, far, PairwiseSettings(transform="rigid", init="geometry"))
                         .similarity().item())


def test_local_ncc_on_an_axis_shorter_than_its_window():
    # a C0 stack of 8 slices on the registration grid: the window is clipped to an odd length that fits
    from mvmm.spatial.similarity import local_ncc
    fixed = torch.randn(1, 8, 20, 20)
    moving = fixed + 0.1 * torch.randn_like(fixed)
    mask = torch.ones(8, 20, 20, dtype=torch.bool)
    assert float(local_ncc(fixed, moving, mask, window=9)) < -0.8
    assert float(local_ncc(fixed[:, :1], moving[:, :1], mask[:1], window=9)) < -0.8
