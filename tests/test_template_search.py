"""Finding the heart in a large field of view by the atlas's template (mvmm.data.template_search), and the
joint solver's levels on the part of the field of view the region of interest can reach."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from mvmm.core.grid import Grid
from mvmm.amortized import network_start, segment_with_model
from mvmm.core.settings import BayesNetSettings, RegistrationSettings, TrainingSettings
from mvmm.data.atlas import Atlas
from mvmm.data.image import Image
from mvmm.data.labels import CARDIAC_LABELS
from mvmm.data.roi import region_box
from mvmm.data.subject import Subject
from mvmm.data.template_search import in_plane_only, match_template
from mvmm.nets.data import SubjectRow, intensity_normalisation, prepare_case
from mvmm.nets.model_dir import load_model
from mvmm.segment import segment_subject
from mvmm.spatial.transforms import RigidTransform
from mvmm.training import train_bayes
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
    with caplog.at_level("WARNING", logger="mvmm.data.template_search"):
        result = segment_subject(Subject([case], atlas=label_only, roi_margin_mm=5.0), registration=settings,
                                 max_iter=3)
    assert result.registration.fov_search is None
    assert "has no intensity template of LGE: the heart is not searched for" in caplog.text


def _crop_around_heart(case: Image, size_mm: float = 100.0) -> Image:
    """A ``size_mm`` window of ``case`` around its heart, as MS-CMRSeg's crops are."""
    spacing = np.asarray(case.grid.spacing)
    low = np.round((HEART_SHIFT - size_mm / 2 - np.asarray(case.grid.origin)) / spacing).astype(int)
    n = int(round(size_mm / spacing[0]))
    window = tuple(slice(a, a + n) for a in reversed(low))  # array axes are ITK's reversed
    grid = Grid((n, n), case.grid.spacing, tuple(case.grid.index_to_world_matrix[:2] @ np.r_[low, 1.0]),
                case.grid.direction)
    return Image.from_array(case.data[0].numpy()[window], grid, "LGE", "crop")


NETWORK = BayesNetSettings(grid_size=(40, 40), grid_spacing=(2.0, 2.0), channels=(4, 8), features=4).resolved(2)


@pytest.fixture(scope="module")
def crop_model(atlas_with_template, tmp_path_factory):
    """A tiny network trained (two epochs) on a crop around the heart of an uncropped case: the model,
    the case, its truth and the crop."""
    folder = tmp_path_factory.mktemp("crop_model")
    case, truth = uncropped_case(np.random.default_rng(6))
    crop = _crop_around_heart(case)
    crop.write(folder / "crop.nii.gz")
    train_bayes([SubjectRow("crop", {"LGE": folder / "crop.nii.gz"})], ["LGE"], atlas_with_template,
                folder / "model", NETWORK, TrainingSettings(epochs=2), device="cpu", progress=False)
    return load_model(folder / "model"), case, truth, crop


def test_a_network_sees_an_uncropped_scan_as_it_sees_its_crop(crop_model):
    """The networks' case (mvmm.nets.data.prepare_case) of a scan much wider than the network grid: the
    atlas starts where the classical path starts it (mvmm.amortized.network_start: template, then the
    likelihood's local search), the grid moves with it, and each image is normalised over its voxels
    on that grid, so the network sees what the crop around the heart shows it; a crop is left as it
    was (grid at its centre, its file's own statistics)."""
    model, case, _, crop = crop_model
    views = {}
    for name, image in (("uncropped", case), ("crop", crop)):
        subject = Subject([image], atlas=model.atlas.placed_for(image.grid), roi_margin_mm=10.0)
        start, search = network_start(subject, model.config, torch.device("cpu"))
        views[name] = prepare_case(subject, model.config.network, start=start, fov_search=search)
    wide, cropped = views["uncropped"], views["crop"]
    assert np.allclose(wide.fov_search["shift_mm"], HEART_SHIFT, atol=4.0)  # the template's 4 mm step
    assert np.abs(np.asarray(wide.grid.center_world()) - HEART_SHIFT).max() <= 4.0
    prior = np.asarray(CARDIAC_LABELS.values)[wide.prior.argmax(0).numpy()]
    assert mean_dice(prior, heart(wide.grid, HEART_SHIFT), wide.grid) > 0.85  # the placed prior lies on the heart
    assert cropped.fov_search is None and np.allclose(cropped.grid.center_world(), crop.grid.center_world())
    assert (float(cropped.offsets[0]), float(cropped.scales[0])) == intensity_normalisation(crop.data[0])
    assert float(wide.scales[0]) == pytest.approx(float(cropped.scales[0]), rel=0.1)
    assert abs(float(wide.offsets[0]) - float(cropped.offsets[0])) < 0.1 * float(cropped.scales[0])
    # the whole file's statistics (mostly air and zero-filled corners) would not be the crop's
    assert abs(intensity_normalisation(case.data[0])[1] - float(cropped.scales[0])) > 0.3 * float(cropped.scales[0])


def test_a_model_segments_an_uncropped_scan_where_its_heart_is(crop_model):
    """End to end through segment_with_model: a network trained on a crop, run on the uncropped scan,
    finds the heart and says so in the result (report.json ``registration.fov_search``)."""
    model, case, truth, _ = crop_model
    result = segment_with_model([case], model, refine=20)
    assert np.allclose(result.registration.fov_search["start_shift_mm"], HEART_SHIFT, atol=4.0)
    assert result.timings["start_s"] > 0  # the search's own time, apart from loading
    assert mean_dice(result.label_map(), truth, case.grid) > 0.8
