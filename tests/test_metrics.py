import math

import numpy as np
import pytest

from mvmm.data.labels import CARDIAC_LABELS
from mvmm.metrics import evaluate_labels, structure_metrics


def test_dice_of_known_overlap():
    a = np.zeros((10, 10), bool)
    b = np.zeros((10, 10), bool)
    a[:, :5] = True  # 50 voxels
    b[:, 2:6] = True  # 40 voxels, 30 shared
    assert structure_metrics(a, b, (1.0, 1.0))["dice"] == pytest.approx(2 * 30 / 90)


def test_surface_distances_honour_anisotropic_spacing():
    a = np.zeros((4, 20, 20), bool)
    b = np.zeros((4, 20, 20), bool)
    a[:, 5:10, 5:10] = True
    b[:, 5:10, 8:13] = True  # shifted by 3 voxels along the last (x) axis
    iso = structure_metrics(a, b, (1.0, 1.0, 1.0))
    aniso = structure_metrics(a, b, (1.0, 1.0, 2.5))
    assert iso["hd"] == pytest.approx(3.0)
    assert aniso["hd"] == pytest.approx(7.5)  # 3 voxels of 2.5 mm
    assert aniso["hd95"] <= aniso["hd"] and 0 < aniso["msd"] < aniso["hd95"]
    same = structure_metrics(a, a, (1.0, 1.0, 2.5))
    assert same["dice"] == 1.0 and same["hd"] == 0.0 and same["msd"] == 0.0


def test_empty_structures():
    a = np.zeros((5, 5), bool)
    b = a.copy()
    b[2, 2] = True
    m = structure_metrics(a, b, (1, 1))
    assert m["dice"] == 0.0 and math.isnan(m["hd95"])
    assert math.isnan(structure_metrics(a, a, (1, 1))["dice"])


def test_evaluate_labels_reports_each_foreground_structure_with_volumes():
    truth = np.zeros((3, 10, 10), np.int16)
    truth[:, 2:5, 2:5], truth[:, 5:8, 5:8] = 200, 500
    out = evaluate_labels(truth, truth, (5.0, 1.0, 1.0), CARDIAC_LABELS)
    assert set(out) == {"Myo", "LV", "RV"}
    assert out["Myo"]["dice"] == 1.0 and out["Myo"]["volume_truth_ml"] == pytest.approx(27 * 5 / 1000)
    assert math.isnan(out["RV"]["dice"])


def test_agreement_gives_correlation_bias_and_limits():
    from mvmm.metrics import agreement

    stats = agreement([2.0, 4.0, 6.0, 9.0], [1.0, 3.0, 5.0, 7.0])
    diff = np.array([1.0, 1.0, 1.0, 2.0])
    assert stats["bias"] == pytest.approx(1.25)
    assert stats["high"] - stats["low"] == pytest.approx(2 * 1.96 * diff.std(ddof=1))
    assert stats["r"] == pytest.approx(np.corrcoef([2, 4, 6, 9], [1, 3, 5, 7])[0, 1])
    assert np.isnan(agreement([1.0, 2.0], [1.0, 3.0])["r"]) and np.isnan(agreement([1.0], [2.0])["low"])
