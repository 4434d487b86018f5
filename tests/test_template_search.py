"""Finding the heart in a large field of view by the atlas's template (mvmm.data.template_search), and the
joint solver's levels on the part of the field of view the region of interest can reach."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from mvmm.core.grid import Grid
from mvmm.core.settings import RegistrationSettings
from mvmm.data.atlas import Atlas
from mvmm.data.image import Image
from mvmm.data.labels import CARDIAC_LABELS
from mvmm.data.roi import region_box
from mvmm.data.subject import Subject
from mvmm.data.template_search import in_plane_only, match_template
from mvmm.segment import segment_subject
from mvmm.spatial.transforms import RigidTransform
from test_multi_atlas import INTENSITY, heart, mean_dice

HEART_SHIFT = np.array([52.0, -38.0])  # where the case's heart sits from its field-of-view centre (mm)


def _scan(labels: np.ndarray, rng, noise=0.03) -> np.ndarray:
    return (np.vectorize(INTENSITY.get)(labels) + rng.normal(0, noise, labels.shape)).astype(np.float32)


@pytest.fixture(scope="module")
def atlas_with_template():
    """A world atlas of a 2D heart centred at the origin, with an LGE template (its mean image)."""
    grid = Grid((96, 96), (1.25, 1.25), (-59.375, -59.375), (1, 0, 0, 1))
    labels = heart(grid, (0.0, 0.0))
    atlas = Atlas.from_label_maps([labels], grid, CARDIAC_LABELS)
    template = torch.from_numpy(_scan(labels, np.random.default_rng(0), noise=0.0))
    return replace(atlas, templates={"LGE": template})


def uncropped_case(rng, distractor=True):
    """A 240 × 220 mm scan centred at the origin, its heart 64 mm off-centre, a bright round
    distractor (a vessel) on the other side and zero-filled corners (a rotated field of view)."""
    grid = Grid((192, 176), (1.25, 1.25), (-119.375, -109.375), (1, 0, 0, 1))
    truth = heart(grid, HEART_SHIFT)
    image = _scan(truth, rng)
    points = grid.world_points(dtype=torch.float64).numpy()
    if distractor:
        image[np.hypot(points[..., 0] + 60, points[..., 1] - 50) < 13] = INTENSITY[500]
    image[np.hypot(points[..., 0] / 125, points[..., 1] / 118) > 1] = 0.0
    return Image.from_array(image, grid, "LGE", "uncropped"), truth


def test_the_template_finds_the_heart_anywhere_in_the_field_of_view(atlas_with_template):
    case, _ = uncropped_case(np.random.default_rng(1))
    start = RigidTransform(2, center=case.grid.center_world())
    match = match_template(case, atlas_with_template, "LGE", start)
    assert match is not None and np.abs(match.shift_mm - HEART_SHIFT).max() <= 4.0, match  # the search's 4 mm step
    assert match.ncc > 0.9 and match.ncc > match.ncc_start + 0.5 and match.translations > 100
    # from a start already moved, the search reports what is left
    moved = RigidTransform(2, params=torch.tensor([0.0, -30.0, 20.0], dtype=torch.float64), center=start.center)
    again = match_template(case, atlas_with_template, "LGE", moved)
    assert np.abs(again.shift_mm - (HEART_SHIFT - np.array([30.0, -20.0]))).max() <= 4.0, again


def test_no_translation_counts_when_the_image_is_smaller_than_the_template(atlas_with_template):
    grid = Grid((40, 40), (1.25, 1.25), (-25.0, -25.0), (1, 0, 0, 1))
    case = Image.from_array(_scan(heart(grid, (0.0, 0.0)), np.random.default_rng(2)), grid, "LGE", "small")
    assert match_template(case, atlas_with_template, "LGE", RigidTransform(2, center=(0.0, 0.0))) is None


def test_slice_stacks_are_searched_in_plane_only():
    stack = Grid((64, 64, 10), (1.5, 1.5, 8.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    assert in_plane_only(stack) == 2
    assert in_plane_only(replace(stack, spacing=(1.5, 1.5, 1.5))) is None
    assert in_plane_only(Grid((64, 64), (1.5, 1.5), (0.0, 0.0), (1, 0, 0, 1))) is None


def test_region_box_and_subgrid_keep_the_voxels_where_they_were():
    reference = Grid((100, 80), (1.0, 1.5), (10.0, -20.0), (0, -1, 1, 0))
    coarse = reference.coarsened(3.0)
    region = torch.zeros(coarse.shape, dtype=torch.bool)
    region[5:9, 10:14] = True
    low, high = region_box(region, coarse, reference, margin_mm=6.0)
    sub = reference.subgrid(low, high)
    # the sub-grid's voxels are the reference's: same points at the same indices
    assert np.allclose(sub.world_points(dtype=torch.float64)[0, 0].numpy(),
                       reference.world_points(dtype=torch.float64)[low[1], low[0]].numpy())
    # it holds the region and the margin around it
    points = coarse.world_points(dtype=torch.float64)[region].numpy()
    inside = (sub.world_to_index_matrix @ np.c_[points, np.ones(len(points))].T)[:2]
    assert inside.min() >= 6.0 / 1.5 - 1 and (inside.T < np.asarray(sub.size) - 6.0 / 1.5 + 1).all()
    with pytest.raises(ValueError, match="subgrid: index range"):
        reference.subgrid((0, 0), (100, 10))


def test_an_uncropped_case_is_segmented_where_its_heart_is(atlas_with_template):
    case, truth = uncropped_case(np.random.default_rng(3))
    subject = Subject([case], atlas=atlas_with_template, roi_margin_mm=5.0)
    base = RegistrationSettings(atlas="affine", template_metric="none", atlas_search_mm=5.0, max_outer=4,
                                affine_weight=0.3)

    def prior_dice(settings):
        result = segment_subject(subject, registration=settings, max_iter=10, learn_proportions=False)
        prior = np.asarray(CARDIAC_LABELS.values)[result.common.prior.argmax(0).numpy()]
        return mean_dice(prior, truth, case.grid), result

    lost, _ = prior_dice(base)  # from the field-of-view centre the ±5 mm search and the levels do not reach it
    found, result = prior_dice(replace(base, atlas_search_fov=True))
    assert lost < 0.3 and found > 0.85, (lost, found)
    record = result.registration.fov_search
    assert record["sequence"] == "LGE" and np.allclose(record["shift_mm"], HEART_SHIFT, atol=4.0)
    assert {"fov search", "search"} <= set(result.timings["registration_split_s"])  # then the local search
    # the levels ran on the part of the field of view around the heart, not all of it
    work = result.registration.work_grid
    assert work["of"] == list(case.grid.size) and np.prod(work["size"]) < 0.5 * np.prod(work["of"]), work
    # the final posterior is on the whole reference grid
    assert tuple(result.posterior.shape[1:]) == case.grid.shape


def test_an_atlas_without_template_is_left_at_its_start_and_says_so(atlas_with_template, caplog):
    case, _ = uncropped_case(np.random.default_rng(4), distractor=False)
    label_only = replace(atlas_with_template, templates={})
    settings = RegistrationSettings(atlas="rigid", template_metric="none", atlas_search_fov=True, max_outer=1)
    with caplog.at_level("WARNING", logger="mvmm.joint"):
        result = segment_subject(Subject([case], atlas=label_only, roi_margin_mm=5.0), registration=settings,
                                 max_iter=3)
    assert result.registration.fov_search is None
    assert "has no intensity template of LGE: the heart is not searched for" in caplog.text
