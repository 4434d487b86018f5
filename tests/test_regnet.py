"""The registration network (mvmm.nets.regnet): training on image similarity, `mvmm train regnet`,
`mvmm register --model`. Tiny networks on 2D phantoms, a few steps."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mvmm.cli import main
from mvmm.core.grid import Grid
from mvmm.core.settings import RegNetSettings, TrainingSettings
from mvmm.data import io
from mvmm.data.image import Image
from mvmm.data.phantom import write_phantom
from mvmm.nets.data import SubjectRow
from mvmm.nets.model_dir import load_model
from mvmm.register import predict_registration
from mvmm.spatial.transforms import map_grid
from mvmm.spatial.warp import sample_image
from mvmm.training import train_regnet

TINY = RegNetSettings(grid_size=(48, 48), grid_spacing=(3.0, 3.0), channels=(8, 16, 32), features=8, metric="mi")


def shifted(path, out, shift_mm):
    """The image of ``path`` with its header moved by ``shift_mm`` (what sat at x now sits at x + shift)."""
    array, grid, _ = io.read_array(path, "path")
    moved = Grid(grid.size, grid.spacing, tuple(np.asarray(grid.origin) + shift_mm), grid.direction)
    io.write_array(out, array, moved)
    return out


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    return root, {seed: write_phantom(root / f"s{seed}", seed=seed, ndim=2) for seed in range(30, 37)}


def overlap_dice(fixed_truth: Image, moving_truth: Image, transform) -> float:
    """Mean foreground Dice of the moving labels brought onto the fixed grid through ``transform``."""
    with torch.no_grad():
        points = map_grid(transform, fixed_truth.grid)
        values, _ = sample_image(moving_truth.data.float(), moving_truth.grid, points, mode="nearest")
    a, b = fixed_truth.data[0].round().long(), values[0].round().long()
    return float(np.mean([2 * ((a == v) & (b == v)).sum() / ((a == v).sum() + (b == v).sum()) for v in (200, 500, 600)]))


@pytest.fixture(scope="module")
def trained(pairs, tmp_path_factory):
    """A registration network trained for 40 epochs on six phantom pairs (C0 → LGE)."""
    root, cases = pairs
    rows = [SubjectRow(f"s{s}", {"LGE": cases[s]["LGE"], "C0": cases[s]["C0"]}) for s in range(30, 36)]
    out = tmp_path_factory.mktemp("regnet") / "model"
    training = TrainingSettings(epochs=40, lr=3e-3, shift_mm=8.0, rotation_deg=5.0, seed=2)
    return out, train_regnet(rows, "LGE", "C0", out, TINY, training, device="cpu", progress=False)


def test_training_lowers_the_loss_and_the_network_undoes_a_shift(pairs, trained, tmp_path):
    root, cases = pairs
    out, result = trained
    log = json.loads((out / "log.json").read_text())["epochs"]
    assert np.mean([h["loss"] for h in log[-5:]]) < log[0]["loss"]
    assert json.loads((out / "config.json").read_text())["kind"] == "regnet" and result["epochs"] == 40
    # a held-out pair whose moving header is off by 6 mm: the prediction brings the labels back together
    moving = shifted(cases[36]["C0"], tmp_path / "C0_shifted.nii.gz", np.array([6.0, -4.0]))
    moving_truth = shifted(cases[36]["C0_truth"], tmp_path / "C0_truth_shifted.nii.gz", np.array([6.0, -4.0]))
    fixed = Image.read(cases[36]["LGE"], "LGE")
    transform, before, after = predict_registration(fixed, Image.read(moving, "C0"), load_model(out), "cpu")
    assert after < before
    truth_f, truth_m = Image.read(cases[36]["LGE_truth"], "f"), Image.read(moving_truth, "m")
    from mvmm.spatial.transforms import IdentityTransform

    headers, network = overlap_dice(truth_f, truth_m, IdentityTransform()), overlap_dice(truth_f, truth_m, transform)
    assert network > headers + 0.05, (headers, network)


def test_cli_register_with_model_and_kind_checks(pairs, tmp_path):
    root, cases = pairs
    table = tmp_path / "pairs.csv"
    table.write_text("subject,LGE,C0\n" + "".join(f"s{s},{cases[s]['LGE']},{cases[s]['C0']}\n" for s in (30, 31, 32)))
    runner = CliRunner()
    out = tmp_path / "regnet"
    result = runner.invoke(main, ["train", "regnet", "--data", str(table), "--fixed", "LGE", "--moving", "C0",
                                  "--epochs", "2", "--out", str(out), "--device", "cpu", "-q"])
    assert result.exit_code == 0, result.output
    reg = tmp_path / "reg"
    result = runner.invoke(main, ["register", "--fixed", str(cases[33]["LGE"]), "--moving", str(cases[33]["C0"]),
                                  "--model", str(out), "--out", str(reg), "-q"])
    assert result.exit_code == 0, result.output
    report = json.loads((reg / "report.json").read_text())
    assert report["model"] == str(out) and report["metric"] == "mi" and report["jacobian"]["folding_share"] == 0
    assert (reg / "moved.nii.gz").exists() and (reg / "transforms" / "transforms.json").exists()
    # a registration network is not a segmentation model, and the other way round
    bad = runner.invoke(main, ["segment", "--images", str(cases[33]["LGE"]), str(cases[33]["C0"]), "--model", str(out),
                               "--out", str(tmp_path / "s"), "-q"])
    assert bad.exit_code != 0 and "'regnet' model; this needs a 'bayes' model" in bad.output


def test_segment_starts_the_image_registration_from_the_network(pairs, trained, tmp_path):
    """segment --images-model: the C0 whose header is off by 6 mm is placed by the network, so its
    native labels fit its anatomy better than by the headers."""
    root, cases = pairs
    out, _ = trained
    moving = shifted(cases[36]["C0"], tmp_path / "C0.nii.gz", np.array([6.0, -4.0]))
    truth = Image.read(shifted(cases[36]["C0_truth"], tmp_path / "C0_truth.nii.gz", np.array([6.0, -4.0])), "t")
    runner, dice = CliRunner(), {}
    for name, extra in (("headers", []), ("network", ["--images-model", str(out)])):
        result = runner.invoke(main, ["segment", "--images", str(cases[36]["LGE"]), str(moving), "--out",
                                      str(tmp_path / name), "--device", "cpu", "-q"] + extra)
        assert result.exit_code == 0, result.output
        labels = Image.read(tmp_path / name / "labels_C0.nii.gz", "l").data[0].round().long()
        reference = truth.data[0].round().long()
        dice[name] = np.mean([float(2 * ((labels == v) & (reference == v)).sum()
                                    / ((labels == v).sum() + (reference == v).sum())) for v in (200, 500, 600)])
    index = json.loads((tmp_path / "network" / "transforms" / "transforms.json").read_text())
    assert any(step["type"] != "linear" for step in index["transforms"]["C0"])
    assert dice["network"] > dice["headers"] + 0.03, dice
    bad = runner.invoke(main, ["segment", "--images", str(cases[36]["C0"]), str(cases[36]["LGE"]), "--images-model",
                               str(out), "--out", str(tmp_path / "bad"), "--device", "cpu", "-q"])
    assert bad.exit_code != 0 and "--images-model: the network registers onto LGE" in bad.output
