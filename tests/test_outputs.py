"""Outputs people can trust: complete or absent, never stale, readable by colleagues, errors in one line."""

import errno
import os
import stat
import struct

import numpy as np
import pytest
from click.testing import CliRunner

from mvmm.cli import main
from mvmm.core.errors import InputError
from mvmm.core.outputs import MANIFEST_NAME, OutputError, staged_output_dir
from mvmm.data import io
from mvmm.data.phantom import write_phantom


@pytest.fixture(scope="module")
def case2d(tmp_path_factory):
    """A small 2D phantom on disk (segmenting it takes seconds)."""
    return write_phantom(tmp_path_factory.mktemp("case2d") / "case", seed=0, ndim=2)


def segment(case, out, *extra):
    args = ["segment", "--images", case["LGE"], case["C0"], "--out", out, "-q", "--device", "cpu", *extra]
    return CliRunner().invoke(main, [str(a) for a in args])


def leftovers(folder):
    """Everything in ``folder`` (recursively), as relative paths."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def test_a_failed_write_leaves_nothing_not_even_the_folders_it_created(tmp_path):
    out = tmp_path / "new" / "deeper" / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with staged_output_dir(out, force=False) as stage:
            (stage / "a.json").write_text("{}")
            raise RuntimeError("boom")
    assert leftovers(tmp_path) == []
    # a file that does not read back whole is refused, and nothing is moved into place
    with pytest.raises(OutputError, match="not a complete PNG"):
        with staged_output_dir(out, force=False) as stage:
            (stage / "figure.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    assert leftovers(tmp_path) == []


def test_disk_full_is_one_line_and_leaves_nothing(case2d, tmp_path, monkeypatch):
    calls = []
    original = io.write_array

    def write_until_full(path, array, grid):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return original(path, array, grid)

    monkeypatch.setattr(io, "write_array", write_until_full)
    out = tmp_path / "seg"
    result = segment(case2d, out)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert result.output.startswith("Error: --out: cannot write") and "No space left on device" in result.output
    assert len(calls) == 3 and leftovers(tmp_path) == []


def test_an_interrupted_run_says_so_and_leaves_nothing(case2d, tmp_path, monkeypatch):
    from mvmm import report

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(report.Figure, "savefig", interrupted)
    result = segment(case2d, tmp_path / "seg")
    assert result.exit_code == 130 and "interrupted" in result.output and "Traceback" not in result.output
    assert leftovers(tmp_path) == []


def test_force_replaces_the_previous_run_and_keeps_other_files(case2d, tmp_path):
    out = tmp_path / "seg"
    assert segment(case2d, out, "--register-images", "rigid").exit_code == 0
    assert (out / "labels_C0.nii.gz").exists() and (out / "transforms" / "C0_0.tfm").exists()
    (out / "notes.txt").write_text("mine")
    taken = segment(case2d, out, "--names", "A", "B")
    assert taken.exit_code == 1 and "--out:" in taken.output and "--force" in taken.output
    result = segment(case2d, out, "--names", "A", "B", "--force")
    assert result.exit_code == 0, result.output
    names = {p.name for p in out.iterdir()}
    # the first run's per-image labels and C0 transform are gone, not left to be mistaken for this run's
    assert "labels_C0.nii.gz" not in names and {"labels_A.nii.gz", "labels_B.nii.gz", "notes.txt"} <= names
    assert not (out / "transforms" / "C0_0.tfm").exists()
    assert (out / "notes.txt").read_text() == "mine" and not [n for n in names if ".partial-" in n]
    assert MANIFEST_NAME in names


def test_outputs_follow_the_umask(case2d, tmp_path):
    previous = os.umask(0o022)
    try:
        assert segment(case2d, tmp_path / "seg").exit_code == 0
    finally:
        os.umask(previous)
    for path in [tmp_path / "seg", *(tmp_path / "seg").rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o755 if path.is_dir() else 0o644), (path, oct(mode))


def test_an_output_folder_that_cannot_be_created_is_one_line(case2d, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = segment(case2d, blocker / "seg")
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert result.output.startswith("Error: --out: cannot create"), result.output
    assert leftovers(tmp_path) == ["file"]


def test_truncated_corrupt_empty_and_absurd_files_are_named(case2d, tmp_path):
    array, grid, _ = io.read_array(case2d["LGE"], "t")
    plain = tmp_path / "plain.nii"
    io.write_array(plain, array, grid)
    truncated = tmp_path / "truncated.nii"
    truncated.write_bytes(plain.read_bytes()[:-500])
    with pytest.raises(InputError, match=r"^images: .*truncated.nii is truncated"):
        io.read_array(truncated, "images")
    gz = case2d["LGE"].read_bytes()
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(gz[: len(gz) // 2])
    with pytest.raises(InputError, match=r"^images: .*cut.nii.gz is truncated or corrupt"):
        io.read_array(cut, "images")
    from mvmm.core.grid import Grid
    for spacing, match in (((1000.0, 1.0), "spacing"), ((1e-6, 1.0), "spacing")):
        odd = tmp_path / f"odd{spacing[0]}.nii.gz"
        io.write_array(odd, array, Grid(grid.size, spacing, grid.origin, grid.direction))
        with pytest.raises(InputError, match=rf"^images: .*odd.* has voxel {match}"):
            io.read_array(odd, "images")
    # a header with an axis of size 0 (ITK reads it as 1, and takes part of the voxels as the image)
    raw = bytearray(plain.read_bytes())
    dims = list(struct.unpack("<8h", raw[40:56]))
    dims[2] = 0
    raw[40:56] = struct.pack("<8h", *dims)
    zero = tmp_path / "zero.nii"
    zero.write_bytes(bytes(raw))
    with pytest.raises(InputError, match=r"^images: .*zero.nii has an axis of size 0"):
        io.read_array(zero, "images")
    # on the command line: one line naming the flag and the file, no traceback
    result = segment({"LGE": truncated, "C0": case2d["C0"]}, tmp_path / "seg")
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert result.output.startswith("Error: --images: ") and "truncated.nii is truncated" in result.output
    assert not (tmp_path / "seg").exists()
    np.testing.assert_equal(io.read_array(plain, "images")[0], array)


def test_a_label_map_given_as_an_image_is_warned_about_and_a_mask_on_another_grid_is_said(case2d, caplog):
    from mvmm.data.image import Image
    from mvmm.data.subject import Subject

    lge, truth = Image.read(case2d["LGE"], "LGE"), Image.read(case2d["LGE_truth"], "labels")
    with caplog.at_level("INFO"):
        lge.check_intensities()
        assert not caplog.records
        truth.check_intensities()
    assert "looks like a label map" in caplog.text and "`images`" in caplog.text
    caplog.clear()
    mask = Image((truth.data > 0).float(), truth.grid, "mask")
    coarse = Image.from_array(np.ones(lge.grid.resampled(3.0).shape, np.float32), lge.grid.resampled(3.0), "m")
    with caplog.at_level("INFO"):
        Subject([lge], masks={"LGE": mask})
        assert "resampled by the headers" not in caplog.text
        Subject([lge], masks={"LGE": coarse})
    assert "is on another grid than its image: it is resampled by the headers" in caplog.text


def test_no_progress_bars_or_carriage_returns_when_stderr_is_not_a_terminal(case2d, tmp_path):
    result = CliRunner().invoke(main, [str(a) for a in ["segment", "--images", case2d["LGE"], case2d["C0"],
                                                        "--out", tmp_path / "seg2", "--device", "cpu"]])
    assert result.exit_code == 0, result.output
    assert "\r" not in result.output and "outer/s" not in result.output and "it/s" not in result.output
    assert "EM:" in result.output  # the summary still prints


def test_the_convergence_figure_shows_the_registration_levels_and_the_final_em(tmp_path, monkeypatch):
    from mvmm import report
    from mvmm.core.outputs import verify_output

    drawn = {}
    original = report._save

    def keep(fig, path, rect=(0, 0, 1, 1)):
        drawn["axes"] = fig.axes
        original(fig, path, rect)

    monkeypatch.setattr(report, "_save", keep)
    history = [{"level": level, "outer": i, "log_likelihood": 2.0 + 0.01 * i,
                "log_likelihood_after_registration": 2.005 + 0.01 * i, "penalty": 0.001}
               for level, count in (("rigid", 3), ("affine", 2), ("affine, full resolution", 2)) for i in range(count)]
    report.convergence_figure(tmp_path / "c.png", [2.2784, 2.27841, 2.278411], history)
    verify_output(tmp_path / "c.png")
    registration, em = drawn["axes"]
    names = [t.get_text() for t in registration.texts]
    assert names == ["rigid", "affine", "affine, full resolution"]
    # one line per level and curve (levels are not joined), whole-number ticks, no offset notation
    assert len(registration.lines) == 6 and len(em.lines) == 1
    assert all(float(t).is_integer() for t in em.get_xticks())
    assert em.yaxis.get_major_formatter().get_offset() == ""
    report.convergence_figure(tmp_path / "em.png", [1.0, 1.5], None)
    assert len(drawn["axes"]) == 1


def test_the_overview_shows_slices_through_the_structure_with_coverage_and_entropy(tmp_path, monkeypatch):
    from mvmm import report
    from mvmm.core.grid import Grid
    from mvmm.data.labels import CARDIAC_LABELS

    drawn = {}
    monkeypatch.setattr(report, "_save", lambda fig, path, rect=None, layout=True: drawn.update(fig=fig))
    # the stack is the last ITK axis (thick slices); the heart occupies slices 4–11 of 16
    grid = Grid((40, 36, 16), (1.5, 1.5, 6.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))
    labels = np.zeros(grid.shape, np.int16)
    labels[4:12, 10:20, 12:22] = 500
    images = np.random.default_rng(0).normal(size=(2,) + grid.shape).astype(np.float32)
    coverage = np.ones((2,) + grid.shape, bool)
    coverage[1, :, :, :5] = False  # C0 misses a strip
    entropy = np.zeros(grid.shape, np.float32)
    report.overview_figure(tmp_path / "o.png", images, coverage, labels, ["LGE", "C0"], CARDIAC_LABELS, grid,
                           entropy)
    axes = drawn["fig"].axes
    titles = " ".join(ax.get_title() for ax in axes)
    # three rows (a quarter, half, three quarters through the heart), four columns, and the colour bars
    # slices 1-based, their distance (mm) from the first slice of the stack
    assert "slice 7/16, 36 mm" in titles and "slice 9/16, 48 mm" in titles and "slice 10/16, 54 mm" in titles
    assert sum(ax.get_title().startswith("entropy") for ax in axes) == 3 and len(axes) == 3 * 4 + 3
    legend = [t.get_text() for t in drawn["fig"].legends[0].get_texts()]
    assert legend == ["Myo", "LV", "RV", "not covered"]


def test_ctrl_c_while_the_command_line_loads_is_an_interruption_not_a_traceback(monkeypatch, capsys):
    import sys

    from mvmm.__main__ import run

    class Loading:
        def __getattr__(self, name):
            raise KeyboardInterrupt

    monkeypatch.setitem(sys.modules, "mvmm.cli", Loading())
    with pytest.raises(SystemExit) as stop:
        run()
    assert stop.value.code == 130 and capsys.readouterr().err == "mvmm: interrupted\n"
