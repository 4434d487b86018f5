"""Orientation: the same image stored in any of its axis orders and signs gives the same result in world
space (an atlas placed along storage axes put the RV on the wrong side of a flipped image: Dice 0)."""

import itertools

import numpy as np
import pytest
import torch

from conftest import SHARED_DATA
from mvmm.data.anatomy import short_axis_frame, stack_axis
from mvmm.data.atlas import Atlas
from mvmm.data.image import Image
from mvmm.data.labels import CARDIAC_LABELS
from mvmm.data.phantom import make_phantom
from mvmm.data.subject import Subject
from mvmm.metrics import evaluate_labels
from mvmm.segment import segment_subject
from mvmm.spatial import sample_image

MSCMR_LGE = SHARED_DATA / "mscmr" / "patient1_LGE.nii.gz"


def storage_variants(ndim):
    """Every order and sign of the storage axes: 8 in 2D, 48 in 3D (the identity first)."""
    return [(order, flips) for order in itertools.permutations(range(ndim))
            for flips in itertools.product((False, True), repeat=ndim)]


def restored(image: Image, order, flips) -> Image:
    """``image`` with its storage axes permuted and flipped: the same voxels at the same world
    positions, only the array order and the header's direction, origin and spacing differ."""
    return image.reoriented(order, flips)


def on(grid, image: Image, mode="nearest"):
    """``image`` sampled at ``grid``'s voxel centres (by world position)."""
    return sample_image(image.data, image.grid, grid.world_points(dtype=torch.float64).float(), mode=mode)[0][0]


def test_variants_hold_the_same_voxels_at_the_same_world_positions():
    image = make_phantom(0, ndim=3).images["LGE"]
    for order, flips in storage_variants(3)[1::7]:
        variant = restored(image, order, flips)
        assert not variant.grid.same_geometry(image.grid) or order == (0, 1, 2)
        assert torch.allclose(on(image.grid, variant), image.data[0], atol=1e-5)


@pytest.mark.parametrize("source", ["phantom", "mscmr"])
def test_the_atlas_is_placed_the_same_for_every_storage_order(source):
    if source == "mscmr":
        if not MSCMR_LGE.exists():
            pytest.skip("MS-CMRSeg data not available")
        image = Image.read(MSCMR_LGE, "LGE")
    else:
        image = make_phantom(1, ndim=3).images["LGE"]
    points = image.grid.world_points()
    expected = Atlas.builtin_cardiac(image.grid).sample(points)[0]
    frame = short_axis_frame(image.grid)
    for order, flips in storage_variants(3):
        grid = restored(image, order, flips).grid
        assert np.allclose(short_axis_frame(grid), frame, atol=1e-6), (order, flips)
        assert grid.spacing[stack_axis(grid)] == max(grid.spacing)
        prior = Atlas.builtin_cardiac(grid).sample(points)[0]
        assert torch.allclose(prior, expected, atol=1e-4), (order, flips)
        # an atlas built in the heart's frame (group-wise "axes" atlases) is placed the same way
        axes_atlas = Atlas(expected.new_ones((4, 5, 5, 5)) / 4, image.grid.resampled(30.0), CARDIAC_LABELS,
                           "test", "axes")
        assert np.allclose(axes_atlas.placed_on(grid).grid.index_to_world_matrix,
                           axes_atlas.placed_on(image.grid).grid.index_to_world_matrix, atol=1e-6)


def test_a_flipped_or_permuted_2d_case_segments_the_same_in_world_space():
    phantom = make_phantom(0, ndim=2)
    lge, c0, truth = phantom.images["LGE"], phantom.images["C0"], phantom.truth["LGE"]
    spacing = tuple(reversed(lge.grid.spacing))
    reference = None
    for order, flips in storage_variants(2):
        images = [restored(lge, order, flips), restored(c0, order, flips)]
        result = segment_subject(Subject(images, Atlas.builtin_cardiac(images[0].grid)), registration="default",
                                 device="cpu", seed=0)
        labels = Image.from_array(result.label_map().astype(np.float32), images[0].grid, "labels")
        in_world = on(lge.grid, labels).numpy().astype(np.int64)  # back on the original grid, by position
        dice = {name: m["dice"] for name, m in
                evaluate_labels(in_world, truth.data[0].numpy().astype(np.int64), spacing, CARDIAC_LABELS).items()}
        assert min(dice.values()) > 0.85, (order, flips, dice)
        if reference is None:
            reference = in_world
        # the same labels where they are, up to the float noise of a different summation order
        assert (in_world == reference).mean() > 0.998, (order, flips)
