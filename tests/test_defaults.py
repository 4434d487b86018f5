"""Each default is defined once, in the Python API; the command line uses the same values."""

import dataclasses
import inspect

import click
import pytest

from mvmm.atlas_build import GroupwiseSettings
from mvmm.core.settings import BayesNetSettings, PathologySettings, RegNetSettings, TrainingSettings
from mvmm.cli import main
from mvmm.data.atlas import Atlas
from mvmm.data.phantom import make_phantom
from mvmm.data.subject import Subject
from mvmm.experiments.mscmr import ExperimentSettings
from mvmm.joint import RegistrationSettings, default_registration
from mvmm.multi_atlas import MultiAtlasSettings
from mvmm.register import PairwiseSettings
from mvmm.segment import segment_subject

# command → (Python owners of its defaults, option names that differ from the Python parameter's)
COMMANDS = {
    ("segment",): ((segment_subject, RegistrationSettings, MultiAtlasSettings, PathologySettings),
                   {"pathology_rule": "rule", "register_atlas": "atlas", "register_images": "images", "images": None,
                    "atlas": None, "atlas_set": None, "atlas_set_size": "size",
                    # MultiAtlasSettings' or FitGuidedSettings' by --atlas-set-guide (its help names both)
                    "atlas_set_transform": None,
                    "atlas_set_workers": "workers"}),
    ("register",): ((PairwiseSettings,), {"transform_kind": "transform"}),
    ("atlas", "build"): ((GroupwiseSettings,), {"register_kind": "register", "sigma": "sigma_mm"}),
    ("experiment", "mscmr"): ((ExperimentSettings,), {"roi_margin": "roi_margin_mm"}),
    ("train", "bayes"): ((BayesNetSettings, TrainingSettings), {}),
    ("train", "regnet"): ((RegNetSettings, TrainingSettings), {}),
}


def python_default(owner, name):
    if dataclasses.is_dataclass(owner):
        for f in dataclasses.fields(owner):
            if f.name == name:
                if f.default_factory is not dataclasses.MISSING:
                    return tuple(f.default_factory())
                return f.default
        return inspect.Parameter.empty
    parameter = inspect.signature(owner).parameters.get(name)
    return parameter.default if parameter is not None else inspect.Parameter.empty


def command(path):
    cmd = main
    for name in path:
        cmd = cmd.commands[name]
    return cmd


@pytest.mark.parametrize("path", list(COMMANDS), ids=" ".join)
def test_every_cli_default_is_the_python_default(path):
    owners, renamed = COMMANDS[path]
    compared = 0
    for option in command(path).params:
        if not isinstance(option, click.Option) or option.is_flag:
            continue
        name = renamed.get(option.name, option.name)
        if name is None:  # an option that only shares a Python name (segment's --images are files)
            continue
        for owner in owners:
            expected = python_default(owner, name)
            if expected is inspect.Parameter.empty:
                continue
            shown = option.default
            if option.multiple:  # no default and an empty or None one are the same
                shown = tuple(shown) if isinstance(shown, (list, tuple)) else ()
                expected = tuple(expected or ())
            if option.name == "register_atlas" and path == ("segment",):
                # chosen per subject by default_registration (the default with an atlas, none without)
                assert shown in (None, getattr(click.core, "UNSET", None))
            else:
                flag = f"{' '.join(path)} --{option.name.replace('_', '-')}"
                assert shown == expected, f"{flag}: {shown!r} != {expected!r}"
            compared += 1
            break
    assert compared >= 4


def test_python_registration_defaults_are_segment_s():
    settings = RegistrationSettings()
    assert (settings.atlas, settings.images) == ("affine", "none")  # the README's recommendation
    phantom = make_phantom(0, ndim=2)
    lge = phantom.images["LGE"]
    with_atlas = Subject([lge], Atlas.builtin_cardiac(lge.grid))
    assert with_atlas.atlas is not None and default_registration(with_atlas) == settings
    assert default_registration(Subject([lge], atlas=None)).atlas == "none"
    assert inspect.signature(segment_subject).parameters["registration"].default == "default"
