import numpy as np
import pytest
import torch
from scipy import ndimage

from mvmm.data.atlas import Atlas
from mvmm.core.grid import Grid
from mvmm.data.image import Image
from mvmm.data.labels import LabelSet
from mvmm.data.phantom import make_phantom
from mvmm.data.roi import dilate_mm
from mvmm.data.subject import Subject
from mvmm.core.errors import InputError
from mvmm.metrics import evaluate_labels
from mvmm.segment import segment_subject


def test_dilation_reaches_the_margin_in_mm_along_each_axis():
    mask = torch.zeros(5, 21, 21, dtype=torch.bool)  # [z, y, x] with spacing 5, 2, 1 mm
    mask[2, 10, 10] = True
    grown = dilate_mm(mask, (5.0, 2.0, 1.0), 4.5)
    z, y, x = grown.nonzero().unbind(1)
    assert (z.min().item(), z.max().item()) == (2, 2)  # 4.5 mm < one 5-mm slice
    assert (y.min().item(), y.max().item()) == (8, 12)  # two 2-mm voxels
    assert (x.min().item(), x.max().item()) == (6, 14)  # four 1-mm voxels
    assert torch.equal(dilate_mm(mask, (5.0, 2.0, 1.0), 0.0), mask)


def roi_case(margin):
    phantom = make_phantom(seed=2, ndim=2)
    lge = phantom.images["LGE"]
    atlas = Atlas.from_label_maps([phantom.truth["LGE"].data[0].round().numpy().astype(np.int64)], lge.grid)
    return phantom, Subject([lge, phantom.images["C0"]], atlas=atlas, roi_margin_mm=margin)


def test_roi_keeps_the_likelihood_near_the_atlas_foreground_and_labels_the_rest_background():
    phantom, subject = roi_case(6.0)
    sample = subject.sample()
    foreground = (sample.prior[subject.atlas.labels.background_index] < 1 - 1e-3).numpy()
    radius = [int(6.0 // s) for s in reversed(subject.images[0].grid.spacing)]
    expected = ndimage.binary_dilation(foreground, structure=np.ones([2 * r + 1 for r in radius], bool))
    roi = sample.coverage.any(0)
    # the reference (LGE) covers its whole grid: its coverage is exactly the dilated foreground
    assert np.array_equal(sample.coverage[0].numpy(), expected) and 0.05 < roi.float().mean() < 0.9
    result = segment_subject(subject, device="cpu", registration=None)
    assert result.report()["settings"]["roi_margin_mm"] == 6.0
    labels = result.label_map()
    assert set(np.unique(labels[~roi.numpy()])) == {0}
    truth = phantom.truth["LGE"].data[0].round().numpy().astype(np.int64)
    scores = evaluate_labels(labels, truth, tuple(reversed(subject.images[0].grid.spacing)), subject.class_labels)
    assert min(scores[s]["dice"] for s in ("Myo", "LV", "RV")) > 0.7


@pytest.mark.parametrize("margin, atlas, match", [(5.0, False, "needs an atlas"), (-1.0, True, "≥ 0"),
                                                   (float("nan"), True, "≥ 0")])
def test_roi_margin_is_checked(margin, atlas, match):
    phantom, subject = roi_case(None)
    with pytest.raises(InputError, match=match):
        Subject(subject.images, atlas=subject.atlas if atlas else None, roi_margin_mm=margin)


def test_roi_that_misses_every_image_is_reported():
    grid = Grid((20, 20), (1.0, 1.0), (0.0, 0.0), (1, 0, 0, 1))
    image = Image.from_array(np.random.default_rng(0).normal(size=(20, 20)).astype(np.float32), grid, "A")
    labels = np.zeros((20, 20), dtype=np.int64)
    labels[-4:, -4:] = 200
    atlas_grid = Grid((20, 20), (1.0, 1.0), (15.0, 15.0), (1, 0, 0, 1))  # its foreground lies off the image
    atlas = Atlas.from_label_maps([labels], atlas_grid, LabelSet(["bg", "Myo"], [0, 200]), sigma_mm=0.0)
    with pytest.raises(InputError, match="^roi_margin_mm: no voxel covered"):
        Subject([image], atlas=atlas, roi_margin_mm=1.0).sample()
