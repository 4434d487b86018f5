"""N4 bias-field correction before the fit (mvmm.data.bias)."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mvmm.cli import main
from mvmm.core.errors import InputError
from mvmm.core.grid import Grid
from mvmm.data import io
from mvmm.data.atlas import Atlas
from mvmm.data.bias import bias_corrected, n4_corrected, shrink_factors
from mvmm.data.image import Image
from mvmm.data.phantom import make_phantom
from mvmm.data.subject import Subject
from mvmm.segment import segment_subject


def shaded(image: Image, strength: float = 0.5):
    """``image`` times a smooth multiplicative field (a coil's shading: brighter towards −x), and the field."""
    points = image.grid.world_points(dtype=torch.float64)
    x = points[..., 0] - points[..., 0].mean()
    field = torch.exp(strength * x / x.abs().max())
    return Image((image.data * field).float(), image.grid, image.name, image.source), field.numpy()


def test_n4_divides_out_a_known_shading():
    clean = make_phantom(0, ndim=2, bias_amplitude=0.0).images["C0"]
    biased, field = shaded(clean)
    corrected, spread = n4_corrected(biased)
    assert corrected.grid is biased.grid and corrected.data.shape == biased.data.shape
    tissue = clean.data[0].numpy() > np.quantile(clean.data[0].numpy(), 0.5)
    # what is left of the shading: the ratio to the clean image varies little over the bright tissue
    before = biased.data[0].numpy()[tissue] / clean.data[0].numpy()[tissue]
    after = corrected.data[0].numpy()[tissue] / clean.data[0].numpy()[tissue]
    assert np.std(np.log(after)) < 0.4 * np.std(np.log(before)), (np.std(np.log(after)), np.std(np.log(before)))
    assert 1.5 < spread < 4.0  # the field found spans about the e^±0.5 put in


def test_n4_keeps_padding_and_negative_noise():
    image = make_phantom(1, ndim=2).images["LGE"]  # its noise dips below 0 around the dark background
    data = image.data.clone()
    data[:, :10, :] = 0.0  # a rotated field of view's zero-filled corner
    image = Image(data, image.grid, image.name, image.source)
    assert float(data.min()) < 0
    corrected, _ = n4_corrected(image)
    assert torch.all(corrected.data[:, :10, :] == 0)
    assert torch.isfinite(corrected.data).all()


def test_shrink_factors_leave_a_stacks_slices():
    def grid(spacing):
        return Grid((64, 64, 12), spacing, (0.0, 0.0, 0.0), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))

    assert shrink_factors(grid((0.73, 0.73, 5.0))) == [4, 4, 1]
    assert shrink_factors(grid((1.0, 1.0, 1.2))) == [4, 4, 4]


def test_bias_corrected_subject_and_errors():
    phantom = make_phantom(0, ndim=2)
    subject = Subject([phantom.images["LGE"], phantom.images["C0"]])
    same, record = bias_corrected(subject, "none")
    assert same is subject and record == {"method": "none"}
    corrected, record = bias_corrected(subject, "n4")
    assert record["method"] == "n4" and set(record["field_spread"]) == {"LGE", "C0"}
    assert not torch.equal(corrected.images[0].data, subject.images[0].data)
    assert subject.images[0].data is phantom.images["LGE"].data  # the caller's images are not changed
    with pytest.raises(InputError, match="bias_correction"):
        bias_corrected(subject, "n3")
    negative = Image(-torch.rand_like(phantom.images["C0"].data), phantom.images["C0"].grid, "C0", "negative")
    with pytest.raises(InputError, match="bias_correction.*no foreground"):
        bias_corrected(Subject([negative]), "n4")


def test_segment_subject_fits_the_corrected_images():
    phantom = make_phantom(0, ndim=2)
    lge = phantom.images["LGE"]
    subject = Subject([lge, phantom.images["C0"]], Atlas.builtin_cardiac(lge.grid))
    result = segment_subject(subject, registration=None, bias_correction="n4", max_iter=5)
    assert result.settings["bias_correction"]["method"] == "n4" and result.timings["bias_s"] > 0
    expected, _ = n4_corrected(lge)
    assert torch.allclose(result.subject.images[0].data, expected.data)
    plain = segment_subject(subject, registration=None, max_iter=5)
    assert plain.settings["bias_correction"] == {"method": "none"}
    assert plain.subject.images[0].data is lge.data


def test_cli_bias_correction(tmp_path):
    phantom = make_phantom(0, ndim=2)
    paths = {}
    for name in ("LGE", "C0"):
        paths[name] = tmp_path / f"{name}.nii.gz"
        io.write_array(paths[name], phantom.images[name].data[0].numpy(), phantom.images[name].grid)
    runner = CliRunner()
    result = runner.invoke(main, ["segment", "--images", str(paths["LGE"]), str(paths["C0"]), "--register-atlas",
                                  "none", "--bias-correction", "n4", "--out", str(tmp_path / "a"), "-q"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["settings"]["bias_correction"]["method"] == "n4" and report["timings_s"]["bias_s"] > 0
    result = runner.invoke(main, ["segment", "--images", str(paths["LGE"]), str(paths["C0"]), "--register-atlas",
                                  "none", "--out", str(tmp_path / "b"), "-q"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    assert report["settings"]["bias_correction"] == {"method": "none"}  # not the cardiac preset's
