"""Joint label fusion's weights (mvmm.joint_fusion): atlases that err alike share their weight."""

import numpy as np

from mvmm.data.labels import LabelSet
from mvmm.joint_fusion import disagreement, joint_fusion_weights
from mvmm.multi_atlas import local_ncc, weighted_vote

SHAPE = (3, 40, 40)
WINDOW = (0.5, 2.0, 2.0)  # voxels per array axis
LABELS = LabelSet(("background", "disc"), (0, 1))


def disc_atlas(rng, shift, noise, inside=None):
    """A disc shifted by ``shift`` voxels to the right: its image (with Gaussian noise) and one-hot labels."""
    _, yy, xx = np.mgrid[:SHAPE[0], :SHAPE[1], :SHAPE[2]]
    disc = (yy - 20) ** 2 + (xx - 20 - shift) ** 2 < 10 ** 2
    return {"image": disc + rng.normal(0, noise, SHAPE), "labels": np.stack([~disc, disc]).astype(np.float64),
            "inside": np.ones(SHAPE, bool) if inside is None else inside}


def test_copies_of_an_atlas_share_its_weight_instead_of_outvoting_the_others():
    """A right atlas (its image noisy) and a wrong one (shifted by 2 voxels, a clean image) disagree on two
    crescents: joint fusion gives the right one about as much there whether the wrong one comes once or three
    times (its copies' errors are the same errors); equal votes and local NCC weights let the copies outvote it."""
    rng = np.random.default_rng(0)
    case = disc_atlas(rng, 0, 0.1)["image"]
    right, wrong = disc_atlas(rng, 0, 0.8), disc_atlas(rng, 2, 0.1)
    share = {}
    for copies in (1, 3):
        atlases = [right] + [wrong] * copies
        where = disagreement(atlases)
        joint = joint_fusion_weights(case, atlases, WINDOW)
        assert np.allclose(sum(joint), 1.0)
        scores = [np.exp(local_ncc(case, a["image"], a["inside"], WINDOW) / 0.1) for a in atlases]
        fused = weighted_vote(atlases, joint, LABELS, np.ones(3), 0.0)
        assert np.allclose(fused.sum(0), 1.0) and fused.min() >= 0
        voted = weighted_vote(atlases, [np.ones(SHAPE)] * len(atlases), LABELS, np.ones(3), 0.0)
        right_class = right["labels"].argmax(0)[None]  # the fused probability of the right atlas's label
        share[copies] = {"joint": joint[0][where].mean(), "local-ncc": (scores[0] / sum(scores))[where].mean(),
                         "vote": np.take_along_axis(voted, right_class, 0)[0][where].mean()}
    assert abs(share[3]["joint"] - share[1]["joint"]) < 0.06, share
    assert share[1]["local-ncc"] - share[3]["local-ncc"] > 0.15, share
    assert share[1]["vote"] - share[3]["vote"] > 0.2, share  # 1/2 → 1/4


def test_weights_are_equal_where_the_atlases_agree_and_near_zero_where_one_is_absent():
    rng = np.random.default_rng(1)
    case = disc_atlas(rng, 0, 0.1)["image"]
    half = np.zeros(SHAPE, bool)
    half[:, :, :20] = True
    atlases = [disc_atlas(rng, 0, 0.3), disc_atlas(rng, 1, 0.3), disc_atlas(rng, 0, 0.3, inside=half)]
    weights = joint_fusion_weights(case, atlases, WINDOW)
    where = disagreement(atlases)
    assert where.any() and not where[:, :, :5].any()  # far from the disc's edge every atlas says background
    assert all(np.allclose(w[~where], 1 / 3) for w in weights)
    outside = where & ~half
    assert outside.any() and np.abs(weights[2][outside]).max() < 0.01
    assert np.allclose(sum(weights), 1.0)


def test_the_local_search_moves_an_atlas_off_by_two_pixels_onto_the_case_in_plane_only():
    """An atlas registered 2 voxels off: with a search radius of 3 its labels match the case's again (its image
    found the better match), with 0 nothing moves; the thick slice axis is never searched."""
    from mvmm.joint_fusion import search_radius, searched_atlases

    rng = np.random.default_rng(2)
    case = disc_atlas(rng, 0, 0.05)
    off, right = disc_atlas(rng, 2, 0.05), disc_atlas(rng, 0, 0.05)
    assert search_radius([8.0, 1.25, 1.3], 3) == [0, 3, 3] and search_radius([1.0, 1.0, 1.0], 2) == [2, 2, 2]
    wrong = (off["labels"].argmax(0) != case["labels"].argmax(0)).sum()
    assert wrong > 50
    moved, kept = searched_atlases(case["image"], [off, right], [0, 3, 3], WINDOW)
    assert (moved["labels"].argmax(0) != case["labels"].argmax(0)).sum() < 0.1 * wrong
    assert np.array_equal(kept["labels"], right["labels"])  # the right one stays where it is
    assert moved["inside"].all()  # everything it moved to came from inside its field of view
    unmoved = searched_atlases(case["image"], [off, right], [0, 0, 0], WINDOW)[0]
    assert np.array_equal(unmoved["labels"], off["labels"]) and np.array_equal(unmoved["image"], off["image"])


def test_the_fit_guided_fusion_searches_by_default_and_not_when_told_not_to():
    """Atlases all 1–2 voxels off: searched, the fused disc is near the case's; not, it is theirs."""
    import torch

    from mvmm.core.grid import Grid
    from mvmm.core.settings import FitGuidedSettings
    from mvmm.data.image import Image
    from mvmm.multi_atlas import fuse_labels

    rng = np.random.default_rng(3)
    truth = disc_atlas(rng, 0, 0.05)
    grid = Grid(SHAPE[::-1], (1.0, 1.0, 4.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))
    case = Image(torch.from_numpy(truth["image"][None]).float(), grid, "LGE")
    atlases = [disc_atlas(rng, 2, 0.05), disc_atlas(rng, 2, 0.05), disc_atlas(rng, 1, 0.05)]
    assert FitGuidedSettings().search_voxels == 3
    errors = {}
    for search in (0, 3):
        fused = fuse_labels(case, atlases, LABELS, FitGuidedSettings(search_voxels=search, sigma_mm=0.0))
        errors[search] = (fused.argmax(0) != truth["labels"].argmax(0)).sum()
    assert errors[3] < 0.4 * errors[0], errors  # (114 → 36: along the edge a pixel of either side may match)
