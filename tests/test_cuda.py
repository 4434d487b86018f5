"""The same code on CUDA: runs only where a GPU is present (CI has none and skips it)."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mvmm.cli import main
from mvmm.data import Atlas, Subject
from mvmm.mixture import ConvergenceWarning, MultivariateMixture

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")


def test_fit_on_cuda_matches_cpu(phantom3d):
    images = [phantom3d.images[n] for n in ("LGE", "C0", "T2")]
    subject = Subject(images, atlas=Atlas.builtin_cardiac(images[0].grid))
    results = {}
    for device in ("cpu", "cuda"):
        case = subject.sample(device=device)
        assert case.images.device.type == device and case.prior.device.type == device
        model = MultivariateMixture(n_subtypes=2, max_iter=30, tol=1e-12)
        with pytest.warns(ConvergenceWarning):
            model.fit(case.images, case.coverage, case.prior)
        results[device] = (model, model.predict(case.images, case.coverage, case.prior).cpu())
    np.testing.assert_allclose(results["cuda"][0].means_, results["cpu"][0].means_, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(results["cuda"][0].lower_bounds_, results["cpu"][0].lower_bounds_, rtol=1e-4)
    assert (results["cuda"][1] == results["cpu"][1]).float().mean() > 0.999


def test_cli_segment_on_cuda(phantom_files, tmp_path):
    result = CliRunner().invoke(main, ["segment", "--images", str(phantom_files["LGE"]), str(phantom_files["C0"]),
                                       "--out", str(tmp_path / "s"), "--device", "cuda", "-q"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "s" / "report.json").read_text())["device"].startswith("cuda")
