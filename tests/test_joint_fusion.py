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
