"""Slices of a non-reference stack moved in-plane, one breath-hold each (mvmm.slice_alignment): the transform is
exact and in-plane, and the likelihood of each slice given the rest of the case finds a known displacement."""

import dataclasses

import numpy as np
import pytest
import torch

from mvmm.core.grid import Grid
from mvmm.core.settings import FitGuidedSettings
from mvmm.data.atlas import Atlas
from mvmm.data.atlas_set import AtlasEntry
from mvmm.data.image import Image
from mvmm.data.phantom import make_phantom
from mvmm.data.subject import Subject
from mvmm.segment import segment_subject
from mvmm.slice_alignment import align_slices, with_aligned_slices
from mvmm.spatial.transforms import SliceShiftTransform


def oblique_stack() -> Grid:
    angle = 0.4
    direction = np.array([[np.cos(angle), 0.0, np.sin(angle)], [0.0, 1.0, 0.0], [-np.sin(angle), 0.0, np.cos(angle)]])
    return Grid((20, 16, 4), (1.5, 1.5, 8.0), (3.0, -2.0, 5.0), tuple(direction.ravel()))


def test_slice_shifts_are_in_plane_interpolated_between_slices_and_exactly_invertible():
    grid = oblique_stack()
    normal = torch.as_tensor(grid.direction_matrix[:, 2])
    shifts = torch.tensor([[1.0, 2.0, 0.0], [0.0, -3.0, 1.0], [2.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    shifts[3] = 5.0 * normal  # across the slices only
    shift = SliceShiftTransform(grid, 2, shifts)
    # only the in-plane part is kept: a move along the slice normal would change which slice a point is on
    assert torch.allclose(shift.shifts @ normal, torch.zeros(4, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(shift.shifts[3], torch.zeros(3, dtype=torch.float64), atol=1e-12)
    points = grid.world_points(dtype=torch.float64)  # voxel centres: each slice moved by its own shift
    moved = shift.inverse()(points)
    for j in range(4):
        assert torch.allclose(moved[j] - points[j], shift.shifts[j].expand_as(points[j]), atol=1e-9)
    # half-way between slices 0 and 1: the mean of their shifts; beyond the last: the last's
    between = grid.index_to_world(torch.tensor([[4.0, 5.0, 0.5], [4.0, 5.0, 7.0]], dtype=torch.float64))
    expected = torch.stack([(shift.shifts[0] + shift.shifts[1]) / 2, shift.shifts[3]])
    assert torch.allclose(between - shift(between), expected, atol=1e-9)
    # the inverse is exact everywhere, not only at the voxel centres
    anywhere = grid.index_to_world(torch.rand(50, 3, dtype=torch.float64) * torch.tensor([19.0, 15.0, 5.0]) - 0.5)
    assert torch.allclose(shift.inverse()(shift(anywhere)), anywhere, atol=1e-9)
    assert torch.allclose(shift(shift.inverse()(anywhere)), anywhere, atol=1e-9)


def test_slice_shifts_need_one_shift_per_slice():
    with pytest.raises(ValueError, match="^shifts: expected shape \\[4, 3\\]"):
        SliceShiftTransform(oblique_stack(), 2, torch.zeros(3, 3))


def rolled(image: Image, steps) -> Image:
    """``image`` with slice j's content moved by ``steps[j]`` = (x, y) whole voxels (ITK axes 0, 1)."""
    data = image.data[0].numpy().copy()  # array order (slice, y, x)
    for j, (dx, dy) in enumerate(steps):
        data[j] = np.roll(data[j], (dy, dx), axis=(0, 1))
    return Image.from_array(data, image.grid, image.name, "rolled")


@pytest.fixture(scope="module")
def fitted_phantom():
    phantom = make_phantom(seed=2)
    lge, c0 = phantom.images["LGE"], phantom.images["C0"]
    prior = Atlas.from_label_maps([phantom.truth["LGE"].data[0].round().numpy().astype(np.int64)], lge.grid, sigma_mm=2.0)
    subject = Subject([lge, c0], atlas=prior, roi_margin_mm=15.0)
    return subject, segment_subject(subject, device="cpu", registration=None, seed=0, postprocess="none")


def test_the_likelihood_finds_each_slice_where_the_rest_of_the_case_puts_it(fitted_phantom):
    subject, fit = fitted_phantom
    c0 = subject.image("C0")
    assert c0.grid.size[2] == 11 and np.argmax(c0.grid.spacing) == 2  # the stack axis is ITK's z
    heart = np.flatnonzero([(s != 0).any() for s in make_phantom(seed=2).truth["C0"].data[0].numpy()])
    steps = [(0, 0)] * 11
    for j, step in zip(heart, [(3, 0), (-2, 2), (0, -3), (2, 2), (-3, -1), (1, -2), (0, 3), (-2, 0)]):
        steps[j] = step  # the slices through the heart displaced, up to 3 voxels (4.8 mm)
    displaced = dataclasses.replace(subject, images=[subject.images[0], rolled(c0, steps)])
    shift, report = align_slices(displaced, fit.model, "C0", radius_mm=7.0)
    found = np.asarray(report["shifts_voxels"])
    # slice j's content belongs back where it came from: the opposite of its displacement, to the voxel
    assert np.array_equal(found[heart], -np.asarray(steps)[heart])
    moved = [j for j in heart if steps[j] != (0, 0)]
    assert len(moved) == 8 and np.all(np.asarray(report["gain"])[moved] > 0)
    assert np.allclose(shift.shifts.numpy(), report["shifts_mm"], atol=1e-3)
    # the case as it was needs no move where the heart is
    _, unmoved = align_slices(subject, fit.model, "C0", radius_mm=7.0)
    assert np.abs(np.asarray(unmoved["shifts_voxels"])[heart]).max() == 0
    # composed into the image's transform: at the C0's voxel centres (on its slices) the displaced C0 is read
    # where its content went, which gives the original back (away from the borders np.roll wrapped)
    aligned, reports = with_aligned_slices(displaced, fit.model, ["C0"], radius_mm=7.0)
    assert set(reports) == {"C0"} and "C0" in aligned.transforms
    original = c0.data[0][heart][:, 4:-4, 4:-4]
    read = aligned.sample(c0.grid, roi=False).images[1][heart][:, 4:-4, 4:-4]
    assert torch.allclose(read, original, atol=1e-4)
    assert not torch.allclose(displaced.sample(c0.grid, roi=False).images[1][heart][:, 4:-4, 4:-4], original, atol=1e-2)


def test_aligning_slices_needs_a_prior_and_a_non_reference_image(fitted_phantom):
    subject, fit = fitted_phantom
    with pytest.raises(ValueError, match="^name: 'LGE' is the reference"):
        align_slices(subject, fit.model, "LGE", radius_mm=4.0)
    with pytest.raises(ValueError, match="^radius_mm: expected > 0"):
        align_slices(subject, fit.model, "C0", radius_mm=0.0)
    with pytest.raises(ValueError, match="^subject: aligning slices needs a prior"):
        align_slices(dataclasses.replace(subject, atlas=None, roi_margin_mm=None), fit.model, "C0", radius_mm=4.0)


def test_a_fit_guided_refit_puts_the_other_images_slices_back_first(tmp_path):
    phantom = make_phantom(seed=2)
    lge, c0 = phantom.images["LGE"], phantom.images["C0"]
    truth = phantom.truth["C0"].data[0].round().numpy().astype(np.int64)
    heart = np.flatnonzero([(s != 0).any() for s in truth])
    steps = [(0, 0)] * 11
    for j, step in zip(heart, [(3, 0), (-2, 2), (0, -3), (2, 2), (-3, -1), (1, -2), (0, 3), (-2, 0)]):
        steps[j] = step
    displaced_truth = rolled(phantom.truth["C0"], steps).data[0].round().numpy().astype(np.int64)
    entries = []
    for seed in (5, 7):  # other hearts' labelled LGE
        other = make_phantom(seed=seed)
        paths = tmp_path / f"subject{seed}_LGE.nii.gz", tmp_path / f"subject{seed}_LGE_manual.nii.gz"
        other.images["LGE"].write(paths[0])
        other.truth["LGE"].write(paths[1])
        entries.append(AtlasEntry(f"subject{seed}", "LGE", *paths))
    prior = Atlas.from_label_maps([phantom.truth["LGE"].data[0].round().numpy().astype(np.int64)], lge.grid, sigma_mm=4.0)
    subject = Subject([lge, rolled(c0, steps)], atlas=prior, roi_margin_mm=15.0)
    fits = {}
    for radius in (0.0, 7.0):
        settings = FitGuidedSettings(transform="affine", fusion="vote", search_voxels=0, workers=1, slice_shift_mm=radius)
        fits[radius] = segment_subject(subject, device="cpu", registration=None, seed=0, postprocess="none",
                                       atlas_set=entries, fit_guided=settings)
    assert "slice_alignment" not in fits[0.0].settings
    found = np.asarray(fits[7.0].settings["slice_alignment"]["C0"]["shifts_voxels"])
    moved = [j for j in heart if steps[j] != (0, 0)]
    assert np.abs(found[moved] + np.asarray(steps)[moved]).max() <= 1
    assert fits[7.0].timings["slice_alignment_s"] > 0
    # on the C0's own grid its labels follow its slices: the displaced truth is met better
    recall = {r: float(np.mean([(fit.label_map_on("C0") == v)[displaced_truth == v].mean() for v in (200, 500, 600)]))
           for r, fit in fits.items()}
    assert recall[7.0] > recall[0.0] + 0.05
