"""The ``mvmm`` command line: one click group; every command is a thin call into the Python API."""

from __future__ import annotations

import inspect
import json
import logging
import math
import re
import sys
from pathlib import Path
from typing import Optional

import click
from click.core import ParameterSource

from mvmm import __version__
from mvmm.core.errors import InputError
from mvmm.core.outputs import OutputError
# Only plain-Python modules at import: `mvmm --help` and option parsing start at once; each command
# imports torch and the rest of mvmm when it runs.
from mvmm.core.settings import (ACWE_VARIANCES, ATLAS_INITS, ATLAS_MODELS, BIAS_CORRECTIONS, BUILD_MODELS, BUILTIN_CARDIAC, DEFAULT_SIGMA_MM,
                                EXPERIMENT_METHODS, FRAMES, IMAGE_INITS, IMAGE_MODELS, INIT_METHODS, METRICS,
                                ATLAS_SET_GUIDES, FUSIONS, LR_SCHEDULES, PATHOLOGY_RULES, POSTPROCESSING, PRESETS, PRIORS,
                                TEMPLATE_METRICS, TRANSFORM_KINDS,
                                REGNET_METRICS, AcweNetSettings, BayesNetSettings, ExperimentSettings, GroupwiseSettings,
                                FitGuidedSettings, MultiAtlasSettings, PairwiseSettings, PathologySettings, PriorVaeSettings,
                                RegNetSettings,
                                TrainingSettings, VaeSegSettings,
                                RegistrationSettings,
                                SegmentationDefaults)

log = logging.getLogger("mvmm")


def default(owner, name: str):
    """The default of parameter ``name`` of a settings class or function: each default is defined
    once, in the Python API, and the command line shows and uses that value."""
    value = inspect.signature(owner).parameters[name].default
    if value is inspect.Parameter.empty:
        raise KeyError(f"{owner.__name__}.{name} has no default")
    return value


def default_list(owner, name: str) -> tuple:
    """A list default (a dataclass ``default_factory``) as the tuple click wants."""
    return tuple(owner.__dataclass_fields__[name].default_factory())
DEVICE = click.Choice(["auto", "cpu", "cuda"], case_sensitive=False)


class MarginOrNone(click.ParamType):
    """A margin in mm (≥ 0), or ``none`` for no margin-limited region."""

    name = "margin"

    def convert(self, value, param, ctx):
        if value is None or isinstance(value, float):
            return value
        if str(value).lower() == "none":
            return None
        try:
            margin = float(value)
        except ValueError:
            self.fail(f"expected a number of mm or 'none', got {value!r}", param, ctx)
        if not (math.isfinite(margin) and margin >= 0):
            self.fail(f"must be a finite number of mm ≥ 0, got {value!r}", param, ctx)
        return margin


MARGIN = MarginOrNone()


class FiniteFloat(click.ParamType):
    """A finite number (no NaN or infinity) at least ``min`` (above it when ``strict``): every numeric
    option is checked here, at the command line's boundary, before any work starts."""

    name = "number"

    def __init__(self, min: Optional[float] = None, strict: bool = False):
        self.min, self.strict = min, strict

    def convert(self, value, param, ctx):
        if isinstance(value, float):
            number = value
        else:
            try:
                number = float(value)
            except (TypeError, ValueError):
                self.fail(f"expected a number, got {value!r}", param, ctx)
        if not math.isfinite(number):
            self.fail(f"expected a finite number, got {value!r}", param, ctx)
        if self.min is not None and (number <= self.min if self.strict else number < self.min):
            self.fail(f"must be {'>' if self.strict else '≥'} {self.min:g}, got {value!r}", param, ctx)
        return number


NON_NEGATIVE = FiniteFloat(min=0.0)
POSITIVE = FiniteFloat(min=0.0, strict=True)
COUNT = click.IntRange(min=1)
SEED = click.IntRange(min=0)


class MultiValueCommand(click.Command):
    """A command whose ``multiple=True`` options take several values after one flag.

    click options take one value per flag; ``--images a.nii b.nii`` is what users of this field
    type, so the arguments are rewritten to ``--images a.nii --images b.nii`` before parsing.
    """

    def parse_args(self, ctx, args):
        multi = {opt for p in self.params if isinstance(p, click.Option) and p.multiple for opt in p.opts}
        rewritten, current = [], None
        for token in args:
            if token == "--":
                current = None
            elif token.startswith("-"):
                current = token if token in multi else None
                if current:
                    continue
            elif current is not None:
                rewritten.append(current)
            rewritten.append(token)
        return super().parse_args(ctx, rewritten)


# Python parameters (function arguments and ``Settings.field``) whose flag is not their name with
# dashes; any other parameter ``name`` or ``Settings.name`` is ``--name`` where the command has it.
PARAMETER_FLAGS = {
    "masks": "--mask", "roi_margin_mm": "--roi-margin", "learn_proportions": "--proportions",
    "sigma_mm": "--atlas-sigma", "paths": "--label-maps",
    "fixed_path": "--fixed", "moving_path": "--moving", "pred_path": "--pred", "truth_path": "--truth",
    "image_path": "--image", "transforms_path": "--transforms", "out_path": "--out", "reference_path": "--reference",
    "RegistrationSettings.atlas": "--register-atlas", "RegistrationSettings.images": "--register-images",
    "GroupwiseSettings.sigma_mm": "--sigma", "ExperimentSettings.roi_margin_mm": "--roi-margin",
    "MultiAtlasSettings.size": "--atlas-set-size", "MultiAtlasSettings.transform": "--atlas-set-transform",
    "MultiAtlasSettings.workers": "--atlas-set-workers", "FitGuidedSettings.transform": "--atlas-set-transform",
    "FitGuidedSettings.workers": "--atlas-set-workers", "atlas_set_size": "--atlas-set-size",
    "MultiAtlasSettings.fusion": "--atlas-set-fusion", "FitGuidedSettings.fusion": "--atlas-set-fusion",
    "MultiAtlasSettings.search_voxels": "--atlas-set-search", "FitGuidedSettings.search_voxels": "--atlas-set-search",
    "FitGuidedSettings.prior_weight": "--atlas-set-prior-weight",
    "FitGuidedSettings.slice_shift_mm": "--atlas-set-slice-shift",
    "atlas_set_labels": "--atlas-set-labels", "ExperimentSettings.atlas_set_size": "--atlas-set-size",
    "ExperimentSettings.model": "--model", "model": "--model", "resume": "--resume",
    "RegistrationSettings.images_model": "--images-model",
    "BayesNetSettings.grid_size": "--grid-size", "BayesNetSettings.subtypes": "--subtypes",
    "TrainingSettings.batch_size": "--batch-size", "TrainingSettings.lr": "--lr",
    "labelled": "--labelled-patients", "maps": "--labels", "prior": "--prior",
    "PathologySettings.rule": "--pathology-rule", "ExperimentSettings.pathology_rule": "--pathology-rule",
}
_PARAMETER = re.compile(r"^([A-Za-z_][\w.]*):|`([A-Za-z_][\w.]*)`")


def flag_of(parameter: str, flags) -> Optional[str]:
    """The flag among ``flags`` (a command's options) that sets Python ``parameter``, or None."""
    field = parameter.rpartition(".")[2]
    for candidate in (PARAMETER_FLAGS.get(parameter), "--" + field.replace("_", "-")):
        if candidate in flags:
            return candidate
    return None


def in_flags(message: str, flags, leading: bool = True) -> str:
    """A library message as the command line says it: the leading parameter (an :class:`InputError`'s;
    ``leading=False`` for log messages) and those in backticks become the command's flags (a
    parameter the command has no flag for keeps its name)."""
    def replace(match):
        if match.group(1) and not leading:
            return match.group(0)
        parameter = match.group(1) or match.group(2)
        flag = flag_of(parameter, flags) or parameter
        return f"{flag}:" if match.group(1) else flag
    return _PARAMETER.sub(replace, message)


class FlagsInLogs(logging.Filter):
    """Rewrites the parameters a library log message names in backticks into the running command's flags."""

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = click.get_current_context(silent=True)
        if ctx is not None and "`" in str(record.msg):
            record.msg, record.args = in_flags(record.getMessage(), command_flags(ctx.command), leading=False), ()
        return True


def command_flags(command: click.Command) -> set:
    return {opt for param in command.params for opt in getattr(param, "opts", ())}


class MvmmGroup(click.Group):
    """Turns input errors raised anywhere in a command into a one-line message, in the command's flags,
    and exit code 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (InputError, OutputError) as err:
            command = self.get_command(ctx, ctx.invoked_subcommand) if ctx.invoked_subcommand else None
            flags = command_flags(command) if command is not None else set()
            raise click.ClickException(in_flags(str(err), flags)) from None
        except KeyboardInterrupt:
            # outputs are staged and moved into place only when complete: nothing half-written is left
            click.echo("mvmm: interrupted; no partial output was left", err=True)
            raise click.exceptions.Exit(130) from None


def _show_progress(quiet: bool) -> bool:
    """Progress bars only for a person watching: not with --quiet, and not when stderr is a file or a
    pipe (a redirected bar is kilobytes of carriage returns)."""
    return not quiet and sys.stderr.isatty()


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="mvmm: %(message)s",
                        stream=sys.stderr, force=True)
    for handler in logging.getLogger().handlers:
        handler.addFilter(FlagsInLogs())
    logging.captureWarnings(True)


def _apply_threads(ctx, param, value):
    from mvmm.core.devices import set_threads

    set_threads(value)
    return value


def threads_option(func):
    """--threads, applied as soon as it is parsed (torch's default can oversubscribe a shared machine)."""
    return click.option("--threads", type=COUNT, default=None, expose_value=False, callback=_apply_threads,
                        help="CPU threads for torch (and NumPy's BLAS with threadpoolctl). Default: the cores "
                             "this process may use.")(func)


def common_options(func):
    """--device, --threads, --seed and --quiet, shared by the commands that compute."""
    func = threads_option(func)
    func = click.option("--quiet", "-q", is_flag=True, help="Only warnings and errors; no progress bars.")(func)
    func = click.option("--seed", type=SEED, default=0, show_default=True,
                        help="Seed of every random choice (initialisation, phantom noise).")(func)
    func = click.option("--device", type=DEVICE, default="auto", show_default=True,
                        help="Where tensors live: auto picks CUDA when available.")(func)
    return func


def pathology_rule_options(func):
    """--pathology-rule, --scar-sd and --oedema-sd (:class:`PathologySettings`), shared by segment and the experiment."""
    func = click.option("--oedema-sd", type=NON_NEGATIVE, default=default(PathologySettings, "oedema_sd"), show_default=True,
                        help="With --pathology-rule sd: oedema where the T2 is more than this many standard deviations "
                             "above the fitted normal myocardium's mean (and not scar).")(func)
    func = click.option("--scar-sd", type=NON_NEGATIVE, default=default(PathologySettings, "scar_sd"), show_default=True,
                        help="With --pathology-rule sd: scar where the LGE is more than this many standard deviations "
                             "above the fitted normal myocardium's mean.")(func)
    func = click.option("--pathology-rule", type=click.Choice(PATHOLOGY_RULES), default=default(PathologySettings, "rule"),
                        show_default=True,
                        help="With --pathology: how scar and oedema are decided from the myocardium's fitted subtypes: "
                             "sd, the n-SD criterion against the normal subtype (--scar-sd, --oedema-sd); subtype, "
                             "where the pathological subtype is the most probable (before 0.28.0).")(func)
    return func


def _require_pathology_for_rule(pathology: bool) -> None:
    """The pathology rule's options decide scar and oedema: given without ``pathology`` they would do nothing."""
    ctx = click.get_current_context()
    given = [name for name in ("pathology_rule", "scar_sd", "oedema_sd")
             if ctx.get_parameter_source(name) != ParameterSource.DEFAULT]
    if given and not pathology:
        raise InputError(f"{given[0]}: it decides scar and oedema from the myocardium's subtypes; give `pathology`")


@click.group(cls=MvmmGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mvmm")
def main():
    """mvmm: joint segmentation of several images of one subject with a multivariate mixture model."""


@main.command(cls=MultiValueCommand)
@click.option("--images", multiple=True, required=True, type=click.Path(path_type=Path), metavar="PATH...",
              help="Source images of one subject (any format SimpleITK reads), e.g. LGE.nii.gz C0.nii.gz T2.nii.gz.")
@click.option("--names", multiple=True, help="One name per image (default: file names without extension).")
@click.option("--atlas", multiple=True, metavar="PATH|builtin:cardiac|none",
              help=f"Probability atlas (K maps), label map(s) on one grid, {BUILTIN_CARDIAC} (default), "
                   "or none for a plain mixture.")
@click.option("--atlas-set", type=click.Path(path_type=Path), metavar="DIR|CSV",
              help="Multi-atlas prior: labelled images of other subjects (a folder of NAME_SEQ images with "
                   "NAME_SEQ_manual label maps beside them, or a CSV with subject,sequence,image,labels), those of "
                   "the reference's sequence; see --atlas-set-guide.")
@click.option("--atlas-set-guide", type=click.Choice(ATLAS_SET_GUIDES), default=ATLAS_SET_GUIDES[0], show_default=True,
              help="image: instead of --atlas, the atlas images registered to the reference image and their labels "
                   "fused by local NCC. fit: the case fitted with --atlas first, then the atlas label maps "
                   "registered to that fit's posterior, averaged, and the case fitted again on them.")
@click.option("--atlas-set-size", type=COUNT, default=default(MultiAtlasSettings, "size"),
              help="Keep the N atlases most similar to the case after the affine step (default: all; "
                   "--atlas-set-guide image).")
@click.option("--atlas-set-transform", type=click.Choice(TRANSFORM_KINDS),
              help=f"Final transform of each atlas registration (rigid, affine, then FFD or SVF levels); default "
                   f"{default(MultiAtlasSettings, 'transform')}, with --atlas-set-guide fit "
                   f"{default(FitGuidedSettings, 'transform')}.")
@click.option("--atlas-set-fusion", type=click.Choice(FUSIONS),
              help=f"How the registered atlases' labels are fused: local-ncc weighs each atlas where its image (warped "
                   f"as its labels) matches the reference image; joint is joint label fusion (ANTs): weights from "
                   f"the same images that also account for atlases erring alike; vote averages them. Default "
                   f"{default(MultiAtlasSettings, 'fusion')}, with --atlas-set-guide fit "
                   f"{default(FitGuidedSettings, 'fusion')} (an atlas set of another sequence votes equally).")
@click.option("--atlas-set-search", type=click.IntRange(min=0), default=None,
              help=f"Before local-ncc or joint fusion, take each atlas's labels at a voxel from the in-plane offset "
                   f"within N voxels whose image best matches the reference's there (ANTs joint fusion's search "
                   f"radius; 0: none). Default {default(MultiAtlasSettings, 'search_voxels')}, with --atlas-set-guide "
                   f"fit {default(FitGuidedSettings, 'search_voxels')}.")
@click.option("--atlas-set-prior-weight", type=NON_NEGATIVE, default=default(FitGuidedSettings, "prior_weight"),
              show_default=True,
              help="With --atlas-set-guide fit and the atlas's vote (--prior-votes, the cardiac preset's): the fused "
                   "prior's weight against the model's 1 in the refit's posterior on the reference's grid, "
                   "(p + w prior) / (1 + w). Above 1 because joint (or local-ncc) fusion already weighed the atlases "
                   "by that image; an equal vote's prior, and the prior on the other images' own grids, vote with 1.")
@click.option("--atlas-set-slice-shift", metavar="MM", type=NON_NEGATIVE,
              default=default(FitGuidedSettings, "slice_shift_mm"), show_default=True,
              help="With --atlas-set-guide fit: before the refit, move each slice of the other images in its own plane "
                   "(whole voxels within MM) to where the first fit and the fused prior say it lies; a stack's slices "
                   "are breath-holds of their own. 0: they keep the first fit's placement.")
@click.option("--atlas-set-workers", type=click.IntRange(min=0), default=default(MultiAtlasSettings, "workers"),
              show_default=True, help="Worker processes for the atlas registrations (0: one per available core).")
@click.option("--atlas-set-labels", metavar="NAME=VALUE,...",
              help="The atlas set's label values named by tissue when they are not the case's, e.g. RV=1,Myo=2,LV=3 "
                   "for ACDC's label maps (matched to the atlas's classes by name). With --atlas-set-guide fit, a set "
                   "without the reference's sequence (another data set's) gives all its label maps.")
@click.option("--labels", "labels_text", metavar="NAME=VALUE,...",
              help="Tissue names and label values, e.g. bg=0,Myo=200,LV=500,RV=600 (checked against the atlas).")
@click.option("--atlas-sigma", type=NON_NEGATIVE, default=DEFAULT_SIGMA_MM, show_default=True,
              help="Gaussian smoothing (mm) of label-map atlases.")
@click.option("--mask", "masks", multiple=True, metavar="NAME=PATH",
              help="Restrict an image to a mask (nonzero = use), e.g. T2=t2_mask.nii.gz.")
@click.option("--reference", help="Name of the image whose grid is the common space (default: the first).")
@click.option("--preset", type=click.Choice(PRESETS), default="auto", show_default=True,
              help="Settings that work together: cardiac sets --roi-margin 5 --subtypes LGE:Myo=2 --proportions "
                   "atlas --postprocess cardiac --atlas-search-fov --atlas-search-mm 10 --affine-weight 0.3 "
                   "--template-metric none --prior-votes "
                   "(the MS-CMRSeg experiment's); auto is cardiac when the atlas has Myo, LV and RV, else none. "
                   "Options given explicitly override it.")
@click.option("--pathology", is_flag=True,
              help="Write scar and oedema (probability maps, MyoPS label maps, volumes, a figure) from the "
                   "myocardium's subtypes: LGE:Myo=normal,scar and T2:Myo=normal,oedema unless --subtypes names "
                   "them.")
@pathology_rule_options
@click.option("--roi-margin", type=MARGIN, metavar="MM|none",
              help="Fit only within MM of where the (moved) atlas allows a foreground tissue; outside, the "
                   "label is background (none, or no preset: everywhere an image covers).")
@click.option("--subtypes", multiple=True, metavar="IMAGE:TISSUE=N|NAMES",
              help="Gaussian subtypes per image and tissue, e.g. LGE:Myo=2 (* for all), or named darkest first, "
                   "e.g. LGE:Myo=normal,scar (named subtypes share their tissue's variance); default 1, "
                   "and --background-subtypes for the background.")
@click.option("--background-subtypes", type=COUNT,
              default=default(SegmentationDefaults, "background_subtypes"), show_default=True,
              help="Subtypes of the background class (label 0) in every image.")
@click.option("--mrf-beta", type=NON_NEGATIVE, default=default(SegmentationDefaults, "mrf_beta"), show_default=True,
              help="Weight of Potts MRF smoothing of the posterior (0: none).")
@click.option("--prior-votes/--no-prior-votes", default=default(SegmentationDefaults, "prior_votes"), show_default=True,
              help="The registered atlas votes beside the fitted model: the written posterior is the mean of the "
                   "model's and the atlas prior (what the model misreads, e.g. bright scar as blood, costs less; the "
                   "cardiac preset turns it on). Needs an atlas.")
@click.option("--postprocess", type=click.Choice(POSTPROCESSING),
              default=default(SegmentationDefaults, "postprocess"), show_default=True,
              help="Clean-up of the label maps: cardiac keeps each structure's largest component and counts what "
                   "the LV encloses or its convex hull holds of Myo as LV, slice by slice (short-axis stacks; "
                   "papillary muscles in the cavity, as MS-CMRSeg's labels count them).")
@click.option("--proportions", type=click.Choice(["learned", "atlas"]), default="learned", show_default=True,
              help="Global tissue proportions: estimated (learned), or held equal so that the prior is the atlas "
                   "itself (atlas), which keeps a tissue from spreading over a blurred atlas's margins.")
@click.option("--bias-correction", type=click.Choice(BIAS_CORRECTIONS),
              default=default(SegmentationDefaults, "bias_correction"), show_default=True,
              help="Divide every image by its N4 bias field (surface-coil shading) before the fit (SimpleITK's "
                   "N4, shrink 4 in-plane).")
@click.option("--max-iter", type=COUNT, default=default(SegmentationDefaults, "max_iter"),
              show_default=True, help="Maximum EM iterations.")
@click.option("--tol", type=NON_NEGATIVE, default=default(SegmentationDefaults, "tol"), show_default=True,
              help="Stop when the relative change of the log-likelihood falls below this.")
@click.option("--register-atlas", type=click.Choice(ATLAS_MODELS),
              help="Move the atlas while fitting: rigid; rigid then affine; or those then B-spline FFD levels, or "
                   "diffeomorphic SVF levels (a B-spline velocity), the control spacing halving. Default: "
                   f"{default(RegistrationSettings, 'atlas')} with an atlas, none without.")
@click.option("--register-images", type=click.Choice(IMAGE_MODELS),
              default=default(RegistrationSettings, "images"),
              show_default=True, help="Move each non-reference image while fitting (the reference stays).")
@click.option("--images-init", type=click.Choice(IMAGE_INITS),
              default=default(RegistrationSettings, "images_init"),
              show_default=True,
              help="With --register-images: start each moving image from a rigid mutual-information registration "
                   "to the reference (mi), or from its header.")
@click.option("--images-model", type=click.Path(path_type=Path), metavar="MODEL_DIR",
              default=default(RegistrationSettings, "images_model"),
              help="A registration network (mvmm train regnet, fixed = the reference's sequence): the image it "
                   "was trained to move starts from its predicted deformation instead of --images-init.")
@click.option("--template-metric", type=click.Choice(TEMPLATE_METRICS),
              default=default(RegistrationSettings, "template_metric"), show_default=True,
              help="An atlas with intensity templates (atlas build --images) is first placed by registering the "
                   "template of one of the case's sequences to that image with this similarity; none: ignore templates.")
@click.option("--template-transform", type=click.Choice(TRANSFORM_KINDS),
              default=default(RegistrationSettings, "template_transform"), show_default=True,
              help="Final transform of that template registration.")
@click.option("--template-sequence", metavar="NAME", default=default(RegistrationSettings, "template_sequence"),
              help="The image (and template) that places the atlas (default: the reference's, else the first "
                   "image the atlas has a template for).")
@click.option("--atlas-init", type=click.Choice(ATLAS_INITS),
              default=default(RegistrationSettings, "atlas_init"), show_default=True,
              help="Initial atlas placement: its header, or its field-of-view centre on the reference's.")
@click.option("--atlas-search-fov/--no-atlas-search-fov", default=default(RegistrationSettings, "atlas_search_fov"),
              show_default=True,
              help="First find the heart in the whole field of view: the atlas starts where its intensity template "
                   "(atlas build --images) best correlates with the image of its sequence (uncropped scans).")
@click.option("--atlas-search-mm", type=NON_NEGATIVE, default=default(RegistrationSettings, "atlas_search_mm"),
              show_default=True,
              help="Before registering the atlas, try it moved by -d, 0, +d mm along each axis and start from the "
                   "placement whose fitted model explains the images best (0: off). A cardiac fit from the "
                   "searched start whose images moved its posterior little from the atlas is fitted again from the "
                   "unsearched start, and the fit that moved further kept.")
@click.option("--control-spacing", type=POSITIVE, default=default(RegistrationSettings, "control_spacing"),
              show_default=True,
              help="FFD/SVF control-point spacing (mm) of the first level; halved at the next.")
@click.option("--bending-weight", type=NON_NEGATIVE, default=default(RegistrationSettings, "bending_weight"),
              show_default=True,
              help="Weight of the bending energy of the FFD (of the SVF's velocity) against the mean "
                   "log-likelihood per voxel (a folded "
                   "deformation is reported as a warning).")
@click.option("--affine-weight", type=NON_NEGATIVE, default=default(RegistrationSettings, "affine_weight"), show_default=True,
              help="Weight of the prior on the scaling and shear of affine transforms (sum of squared log "
                   "singular values) against the mean log-likelihood per voxel; 0: none.")
@click.option("--grid-spacing", "registration_grid", type=POSITIVE, metavar="MM",
              default=default(RegistrationSettings, "grid_spacing"), show_default=True,
              help="The registration levels run on the reference grid coarsened to at least this spacing (mm); "
                   "EM's final fit is on the full grid.")
@click.option("--full-resolution/--no-full-resolution", "full_resolution",
              default=default(RegistrationSettings, "refine_full_resolution"), show_default=True,
              help="Repeat the last registration level on the full reference grid (slower on large volumes).")
@click.option("--model", "model_dir", type=click.Path(path_type=Path), metavar="MODEL_DIR",
              help="A trained network, instead of the fit: mvmm train bayes (atlas warp and parameters in one "
                   "forward pass; the model carries its atlas and subtypes), vae-seg (a decoded prior and parameters) or "
                   "acwe (the segmentation itself).")
@click.option("--refine", type=click.IntRange(min=0), default=0, show_default=True,
              help="With --model: EM iterations from the network's prediction, its warp fixed (acwe: its map as the "
                   "prior; 0: the network alone). With a bayes or vae-seg model, --register-atlas instead runs the "
                   "joint registration and EM from the network's warp (vae-seg: its decoded prior).")
@click.option("--ensemble", is_flag=True,
              help="With a bayes --model: also fit the model's atlas as without --model (registration and EM, "
                   "the registration options and preset apply) and write the mean of the two posteriors on every "
                   "grid (the MS-CMRSeg experiment's bayes-ensemble; the fit's time plus the network's).")
@click.option("--samples", type=click.IntRange(min=0), default=0, show_default=True,
              help="With a vae-seg --model: latent codes drawn from the encoder's distribution; writes the "
                   "per-voxel variance of the posterior over them and the entropy of their mean "
                   "(uncertainty_variance, uncertainty_entropy); with --register-atlas, of the samples moved "
                   "as the registration moved the prior.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option("--force", is_flag=True, help="Overwrite files in an existing, non-empty output folder.")
@click.pass_context
@common_options
def segment(ctx, model_dir, refine, ensemble, samples, images, names, atlas, atlas_set, atlas_set_guide, atlas_set_size,
            atlas_set_transform, atlas_set_fusion, atlas_set_search, atlas_set_prior_weight, atlas_set_slice_shift,
            atlas_set_workers,
            atlas_set_labels, labels_text,
            atlas_sigma, masks, reference, preset, pathology, pathology_rule, scar_sd, oedema_sd, roi_margin, subtypes,
            background_subtypes,
            mrf_beta, prior_votes, postprocess, proportions, bias_correction, max_iter, tol, register_atlas, register_images, images_init, images_model,
            template_metric, template_transform, template_sequence, atlas_init, atlas_search_fov, atlas_search_mm,
            control_spacing,
            bending_weight, affine_weight, registration_grid, full_resolution, out, force, device, seed, quiet):
    """Segment several images of one subject jointly.

    Writes labels (common grid and each image's own grid), posteriors, entropy, the fitted
    parameters and a report into --out.
    """
    from mvmm.data.labels import resolve_labels
    from mvmm.core.outputs import check_output_dir
    from mvmm.joint import default_registration
    from dataclasses import replace

    from mvmm.segment import atlas_set_entries, load_subject, preset_values, segment_subject

    _setup_logging(quiet)
    check_output_dir(out, force)  # fail before any work if the folder is taken (nothing is created)
    _require_pathology_for_rule(pathology)
    if atlas_set_labels is not None and atlas_set is None:
        raise InputError("atlas_set_labels: it names the atlas set's label values; give `atlas_set`")
    if model_dir is not None and ensemble:
        return _segment_ensemble(ctx, model_dir, out, quiet)
    if model_dir is not None:
        return _segment_with_model(ctx, images, names, model_dir, refine, samples, mrf_beta, postprocess, preset,
                                   register_atlas, affine_weight, roi_margin, out, device, quiet)
    if refine or samples or ensemble:
        flag = "refine" if refine else "samples" if samples else "ensemble"
        raise InputError(f"{flag}: `{flag}` works on a network's prediction; give `model`")
    multi_atlas, fit_guided = None, _fit_guided_settings(ctx.params)
    if atlas_set is not None and fit_guided is None:
        multi_atlas = MultiAtlasSettings(size=atlas_set_size, transform=atlas_set_transform
                                         or default(MultiAtlasSettings, "transform"), workers=atlas_set_workers,
                                         fusion=atlas_set_fusion or default(MultiAtlasSettings, "fusion"),
                                         search_voxels=default(MultiAtlasSettings, "search_voxels")
                                         if atlas_set_search is None else atlas_set_search)
    subject = load_subject(list(images), names=list(names) or None, atlas=list(atlas) or None,
                           labels=resolve_labels(labels_text), masks=_parse_masks(masks),
                           reference=reference, atlas_sigma=atlas_sigma, roi_margin_mm=roi_margin,
                           atlas_set=atlas_set if multi_atlas is not None else None, multi_atlas=multi_atlas,
                           device=device, progress=_show_progress(quiet), atlas_set_labels=atlas_set_labels)
    guide_entries = (atlas_set_entries(atlas_set, subject.reference, atlas_set_labels, labels_only=True)
                     if fit_guided is not None else ())
    # the preset fills what was not given explicitly
    chosen = {key: value for key, value in preset_values(preset, subject, pathology).items()
              if ctx.get_parameter_source("roi_margin" if key == "roi_margin_mm" else key) == ParameterSource.DEFAULT}
    if "roi_margin_mm" in chosen:
        subject = replace(subject, roi_margin_mm=chosen["roi_margin_mm"])
    subtypes = chosen.get("subtypes", subtypes)
    proportions, postprocess = chosen.get("proportions", proportions), chosen.get("postprocess", postprocess)
    prior_votes = chosen.get("prior_votes", prior_votes)
    registration = default_registration(subject, **_registration_options(ctx.params, chosen))
    result = segment_subject(subject, subtypes=list(subtypes), background_subtypes=background_subtypes,
                             mrf_beta=mrf_beta, learn_proportions=proportions == "learned", max_iter=max_iter, tol=tol,
                             device=device, seed=seed, progress=_show_progress(quiet), registration=registration,
                             postprocess=postprocess, pathology=pathology, bias_correction=bias_correction,
                             prior_votes=prior_votes, atlas_set=guide_entries, fit_guided=fit_guided,
                             pathology_rule=PathologySettings(pathology_rule, scar_sd, oedema_sd))
    result.settings["preset"] = {"name": preset, "applied": sorted(chosen)}
    files = result.write(out, force=True)
    if result.registration is None and subject.atlas is not None and len(images) > 1:
        log.info("images and atlas placed by their headers only (see --register-images / --register-atlas)")
    if not quiet:
        click.echo(f"EM: {result.model.n_iter_} iterations, converged: {result.model.converged_}, "
                   f"device: {result.device}")
        for name, ml in result.volumes_ml().items():
            click.echo(f"  {name:<8} {ml:10.2f} ml")
        written = json.loads(files["report"].read_text()).get("pathology") or {}
        for name, v in written.get("common_grid", {}).items():
            share = "" if v["percent_of_tissue"] is None else f" ({v['percent_of_tissue']:.1f} % of {v['tissue']}"
            share += "" if not share or v["tissue_fraction_defined"] in (None, 1.0) else \
                f" on the {100 * v['tissue_fraction_defined']:.0f} % of it that shows {name}"
            click.echo(f"  {name:<8} {v['ml']:10.2f} ml{share}{')' if share else ''}")
        click.echo(f"outputs in {out}: {', '.join(sorted(p.name for p in files.values()))}")


def _fit_guided_settings(params: dict, model: bool = False) -> Optional[FitGuidedSettings]:
    """``segment``'s settings of an atlas set that follows the first fit (``--atlas-set-guide fit``), or
    None without one. ``model``: with ``--model`` an atlas set can only follow the fit (the model carries
    its atlas)."""
    if params["atlas_set"] is None:
        return None
    if params["atlas_set_guide"] != "fit":
        if model:
            raise InputError("atlas_set_guide: the model carries its atlas, so an atlas set can only follow the "
                             "fit (`atlas_set_guide` fit)")
        return None
    if params["atlas_set_size"] is not None:
        raise InputError("atlas_set_size: the atlases are chosen by their image similarity to the case; with "
                         "`atlas_set_guide` fit every atlas is registered to the first fit")
    search = params["atlas_set_search"]
    return FitGuidedSettings(transform=params["atlas_set_transform"] or default(FitGuidedSettings, "transform"),
                             fusion=params["atlas_set_fusion"] or default(FitGuidedSettings, "fusion"),
                             search_voxels=default(FitGuidedSettings, "search_voxels") if search is None else search,
                             prior_weight=params["atlas_set_prior_weight"],
                             slice_shift_mm=params["atlas_set_slice_shift"],
                             workers=params["atlas_set_workers"])


def _registration_options(params: dict, chosen: dict) -> dict:
    """The classical fit's registration settings from ``segment``'s options (``params``: their values by
    name) and what the preset ``chosen`` for those left at their defaults."""
    value = {**params, **chosen}
    images_model = value["images_model"]
    return dict(atlas=value["register_atlas"], images=value["register_images"], images_init=value["images_init"],
                atlas_init=value["atlas_init"], images_model=str(images_model) if images_model else None,
                template_metric=value["template_metric"], template_transform=value["template_transform"],
                template_sequence=value["template_sequence"], atlas_search_fov=value["atlas_search_fov"],
                atlas_search_mm=value["atlas_search_mm"], control_spacing=value["control_spacing"],
                bending_weight=value["bending_weight"], affine_weight=value["affine_weight"],
                grid_spacing=value["registration_grid"], refine_full_resolution=value["full_resolution"])


def _given(ctx, names) -> list:
    """The flags of the options in ``names`` given on the command line (not left at their defaults)."""
    return [param.opts[0] for param in ctx.command.params if param.name in names
            and ctx.get_parameter_source(param.name) not in (None, ParameterSource.DEFAULT)]


def _segment_ensemble(ctx, model_dir, out, quiet):
    """``segment --model --ensemble``: the model's one-pass answer and the classical fit of its atlas, whose
    options (registration, MRF, clean-up, bias correction) and preset apply; the model fixes the atlas,
    labels, subtypes and proportions."""
    from mvmm.amortized import segment_ensemble
    from mvmm.nets.model_dir import read_config
    from mvmm.segment import atlas_set_entries, model_preset_values, read_images

    p = ctx.params
    fixed = _given(ctx, {"atlas", "atlas_sigma", "labels_text", "subtypes", "background_subtypes",
                         "proportions", "masks", "reference", "pathology", "refine", "samples"})
    if fixed:
        raise InputError(f"ensemble: the model carries its atlas, labels and subtypes, and the ensemble is its "
                         f"one-pass answer; {', '.join(fixed)} cannot change them (drop them)")
    config = read_config(model_dir)
    fit_guided = _fit_guided_settings(p, model=True)  # the fit, then the atlas set's label maps on it
    guide_entries = (atlas_set_entries(p["atlas_set"], config.images[0], p["atlas_set_labels"], labels_only=True)
                     if fit_guided is not None else ())
    chosen = {key: value for key, value in model_preset_values(p["preset"], config.labels, fit=True).items()
              if not _given(ctx, {"roi_margin" if key == "roi_margin_mm" else key})}
    registration = RegistrationSettings(**{k: v for k, v in _registration_options(p, chosen).items() if v is not None})
    result = segment_ensemble(read_images(list(p["images"]), list(p["names"]) or None), model_dir,
                              registration=registration, roi_margin_mm=chosen.get("roi_margin_mm", p["roi_margin"]),
                              mrf_beta=p["mrf_beta"], postprocess=chosen.get("postprocess", p["postprocess"]),
                              bias_correction=p["bias_correction"], max_iter=p["max_iter"], tol=p["tol"],
                              prior_votes=chosen.get("prior_votes", p["prior_votes"]), device=p["device"],
                              seed=p["seed"], progress=_show_progress(quiet), atlas_set=guide_entries,
                              fit_guided=fit_guided)
    result.settings["preset"] = {"name": p["preset"], "applied": sorted(chosen)}
    files = result.write(out, force=True)
    if not quiet:
        fit, network = result.members
        click.echo(f"fit: {fit.timings['registration_s'] + fit.timings['fit_s']:.2f} s of registration and EM; "
                   f"network {network.timings['network_s']:.2f} s; device: {result.device}")
        for name, ml in result.volumes_ml().items():
            click.echo(f"  {name:<8} {ml:10.2f} ml")
        click.echo(f"outputs in {out}: {', '.join(sorted(p.name for p in files.values()))}")


def _segment_with_model(ctx, images, names, model_dir, refine, samples, mrf_beta, postprocess, preset, register_atlas,
                        affine_weight, roi_margin, out, device, quiet):
    """``segment --model``: options of the classical fit that the model fixes are refused, not ignored;
    ``--register-atlas`` continues from the network's warp with the joint solver; the preset (auto:
    cardiac for a model of cardiac labels) fills the clean-up and the refinement's settings not given."""
    from mvmm.amortized import segment_with_model
    from mvmm.nets.model_dir import read_config
    from mvmm.segment import atlas_set_entries, model_preset_values, read_images

    fixed = _given(ctx, {"atlas", "atlas_sigma", "labels_text", "subtypes", "background_subtypes",
                         "register_images", "template_metric", "template_transform", "atlas_search_fov",
                         "atlas_search_mm", "proportions", "masks", "reference", "images_model", "pathology",
                         "bias_correction"})
    if fixed:
        raise InputError(f"model: the model carries its atlas, labels, subtypes and registration; "
                         f"{', '.join(fixed)} cannot change them (drop them, or segment without --model)")
    # the refinement's settings only where there is a registration to use them (the atlas's vote: a
    # bayes model's atlas; a vae-seg model's decoded prior does not vote)
    config = read_config(model_dir)
    # the atlas set follows a bayes model's refinement by registration, a vae-seg model's answer or refinement
    fit_guided = _fit_guided_settings(ctx.params, model=True)
    if fit_guided is not None and not _given(ctx, {"register_atlas"}) and config.kind != "vae-seg":
        raise InputError("atlas_set: with a bayes `model` the atlas set follows the network's refinement by "
                         "registration; give `register_atlas` (or `ensemble`)")
    guide_entries = (atlas_set_entries(ctx.params["atlas_set"], config.images[0], ctx.params["atlas_set_labels"],
                                       labels_only=True) if fit_guided is not None else ())
    chosen = {key: value for key, value in model_preset_values(preset, config.labels).items()
              if not _given(ctx, {"roi_margin" if key == "roi_margin_mm" else key})
              and (key == "postprocess" or _given(ctx, {"register_atlas"}))
              and (key != "prior_votes" or config.kind == "bayes")}
    postprocess, affine_weight = chosen.get("postprocess", postprocess), chosen.get("affine_weight", affine_weight)
    registration = None
    if _given(ctx, {"register_atlas"}):
        if refine:
            raise InputError("refine: --refine (EM with the network's warp fixed) and --register-atlas (registration "
                             "and EM from it) are two refinements; give one")
        registration = RegistrationSettings(atlas=register_atlas, images_init="header", template_metric="none",
                                            affine_weight=affine_weight)
    result = segment_with_model(read_images(list(images), list(names) or None), model_dir, refine=refine,
                                mrf_beta=mrf_beta, postprocess=postprocess, device=device,
                                progress=_show_progress(quiet), registration=registration,
                                roi_margin_mm=roi_margin if _given(ctx, {"roi_margin"}) else
                                chosen.get("roi_margin_mm") if registration is not None else None, samples=samples,
                                prior_votes=chosen.get("prior_votes", ctx.params["prior_votes"]),
                                atlas_set=guide_entries, fit_guided=fit_guided)
    result.settings["preset"] = {"name": preset, "applied": sorted(chosen)}
    files = result.write(out, force=True)
    if not quiet:
        t = result.timings
        how = (f"{register_atlas} registration and EM, {t['registration_s'] + t['fit_s']:.2f} s"
               if registration is not None else
               f"the atlas set's label maps on its answer and EM, {t['atlas_set_s'] + t['fit_s']:.2f} s"
               if fit_guided is not None else f"{refine} EM iterations, {t['refine_s']:.2f} s")
        click.echo(f"network {t['network_s']:.2f} s; refinement: {how}; device: {result.device}")
        for name, ml in result.volumes_ml().items():
            click.echo(f"  {name:<8} {ml:10.2f} ml")
        click.echo(f"outputs in {out}: {', '.join(sorted(p.name for p in files.values()))}")


def _name_path_pairs(items, flag: str, name: str = "NAME"):
    """``["A=x", "B=y"]`` → ``[("A", "x"), ("B", "y")]``; anything else is an error naming ``flag``."""
    pairs = []
    for item in items:
        key, sep, path = item.partition("=")
        if not sep or not key or not path:
            raise InputError(f"{flag}: expected {name}=PATH, got {item!r}")
        pairs.append((key, path))
    return pairs


def _parse_masks(items):
    return dict(_name_path_pairs(items, "--mask"))


@main.command()
@click.option("--pred", required=True, type=click.Path(path_type=Path), help="Predicted label map.")
@click.option("--truth", required=True, type=click.Path(path_type=Path), help="Reference label map (same grid).")
@click.option("--labels", "labels_text", metavar="NAME=VALUE,...",
              help="Names and values of the structures (default: the values found; 0 is background).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def evaluate(pred, truth, labels_text, as_json):
    """Dice, HD, HD95 and mean surface distance (mm) per structure."""
    from mvmm.data.labels import resolve_labels
    from mvmm.evaluate import evaluate_label_files
    from mvmm.evaluate import metrics_table

    metrics = evaluate_label_files(pred, truth, resolve_labels(labels_text))
    if as_json:
        click.echo(json.dumps({"pred": str(pred), "truth": str(truth), "metrics": metrics}))
    else:
        click.echo(metrics_table(metrics))


@main.command()
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of anatomy, placement, bias and noise.")
@click.option("--dims", type=click.Choice(["3", "2"]), default="3", show_default=True,
              help="3: short-axis stacks; 2: one mid-ventricular slice per sequence.")
@click.option("--force", is_flag=True, help="Overwrite files in an existing, non-empty output folder.")
def phantom(out, seed, dims, force):
    """Write a synthetic LGE/C0/T2 case with ground truth (labels, scar, oedema)."""
    from mvmm.data.phantom import write_phantom

    files = write_phantom(out, seed=seed, ndim=int(dims), force=force)
    click.echo(f"phantom (seed {seed}) in {out}: {', '.join(sorted(p.name for p in files.values()))}")


@main.command()
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option("--force", is_flag=True, help="Overwrite files in an existing, non-empty output folder.")
@click.option("--mrf-beta", type=NON_NEGATIVE, default=0.0, show_default=True, help="Potts MRF weight.")
@common_options
def demo(out, force, mrf_beta, device, seed, quiet):
    """Phantom → segment with the built-in atlas → evaluate; writes OUT/report.json."""
    from mvmm.demo import run_demo
    from mvmm.evaluate import metrics_table

    _setup_logging(quiet)
    report = run_demo(out, seed=seed, device=device, force=force, progress=_show_progress(quiet), mrf_beta=mrf_beta)
    click.echo(f"mvmm demo: phantom seed {seed}, LGE + C0 + T2, built-in atlas registered in "
               f"{report['registration_outer_iterations']} outer iterations, then {report['em_iterations']} EM "
               f"iteration(s) on the full grid, on {report['device']}")
    click.echo(metrics_table(report["metrics"]))
    click.echo(f"report: {Path(out) / 'report.json'}")


@main.command()
@click.option("--image", required=True, type=click.Path(path_type=Path), help="Image or label map to resample.")
@click.option("--transforms", "transforms_path", required=True, type=click.Path(path_type=Path),
              help="transforms.json (or its folder) written by mvmm segment.")
@click.option("--name", required=True, help="Whose transform: an image name or 'atlas'.")
@click.option("--reference", type=click.Path(path_type=Path),
              help="Image whose grid to sample on (default: the common grid of the transforms).")
@click.option("--label-map", "is_labels", is_flag=True,
              help="The image is a label map: nearest-neighbour sampling that keeps its values.")
@click.option("--labels", "old_is_labels", is_flag=True, hidden=True, help="Deprecated name of --label-map.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output image.")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
def warp(image, transforms_path, name, reference, is_labels, old_is_labels, out, force):
    """Bring an image (or labels) of NAME into the common space through its saved transform."""
    from mvmm.data.transform_files import warp_file

    if old_is_labels:
        click.echo("mvmm: warp --labels is deprecated (elsewhere --labels names NAME=VALUE pairs): use --label-map",
                   err=True)
        is_labels = True

    warp_file(image, transforms_path, name, out, reference, is_labels, force)
    click.echo(f"{image} → {out} through the transform of {name!r}")


@main.command()
@click.option("--fixed", required=True, type=click.Path(path_type=Path), help="Fixed image (its grid is the output space).")
@click.option("--moving", required=True, type=click.Path(path_type=Path), help="Moving image.")
@click.option("--transform", "transform_kind", type=click.Choice(TRANSFORM_KINDS),
              default=default(PairwiseSettings, "transform"),
              show_default=True,
              help="Transform model; affine runs rigid first, ffd runs rigid, affine, then FFD levels, svf the "
                   "same with diffeomorphic stationary-velocity levels (saved as a displacement field).")
@click.option("--metric", type=click.Choice(METRICS),
              default=default(PairwiseSettings, "metric"), show_default=True,
              help="mi: Mattes-style mutual information (other modalities); ncc: local normalised "
                   "cross-correlation; ssd: squared differences (same contrast); dice: soft Dice of probability maps.")
@click.option("--init", type=click.Choice(INIT_METHODS),
              default=default(PairwiseSettings, "init"), show_default=True,
              help="Initial translation: field-of-view centres, intensity centres of mass, or the headers as they are.")
@click.option("--fixed-mask", type=click.Path(path_type=Path), help="Only these fixed voxels count (nonzero).")
@click.option("--moving-mask", type=click.Path(path_type=Path), help="Only these moving voxels count (nonzero).")
@click.option("--control-spacing", type=POSITIVE, default=default(PairwiseSettings, "control_spacing"), show_default=True,
              help="FFD/SVF control-point spacing (mm) of the first non-linear level; halved at the next.")
@click.option("--bending-weight", type=NON_NEGATIVE, default=default(PairwiseSettings, "bending_weight"), show_default=True,
              help="Weight of the bending energy of the FFD (of the SVF's velocity) against the similarity loss "
                   "(a folded deformation is "
                   "reported as a warning).")
@click.option("--grid-spacing", type=POSITIVE, default=default(PairwiseSettings, "grid_spacing"), show_default=True,
              help="The loss is computed on the fixed grid coarsened to at least this spacing (mm).")
@click.option("--full-resolution", is_flag=True, help="Repeat the last level on the full fixed grid.")
@click.option("--model", "model_dir", type=click.Path(path_type=Path), metavar="MODEL_DIR",
              help="A registration network (mvmm train regnet): its SVF in one forward pass instead of the "
                   "optimisation (--transform, --metric and the other optimisation options then do not apply).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option("--force", is_flag=True, help="Overwrite files in an existing, non-empty output folder.")
@click.option("--device", type=DEVICE, default="auto", show_default=True,
              help="Where tensors live: auto picks CUDA when available.")
@click.option("--quiet", "-q", is_flag=True, help="Only warnings and errors; no progress bars.")
@threads_option
def register(fixed, moving, transform_kind, metric, init, fixed_mask, moving_mask, control_spacing, bending_weight,
             grid_spacing, full_resolution, model_dir, out, force, device, quiet):
    """Register MOVING to FIXED (pairwise); writes transforms/, moved.nii.gz and report.json into --out."""
    from mvmm.register import register_files, register_with_model

    _setup_logging(quiet)
    if model_dir is not None:
        if fixed_mask or moving_mask:
            raise InputError("model: the network reads the images' own coverage; --fixed-mask and --moving-mask "
                             "do not apply")
        report = register_with_model(fixed, moving, model_dir, out, device, force)
        click.echo(f"network SVF ({report['metric']}) on {report['device']} in {report['seconds']:.2f} s: "
                   f"loss {report['loss_before']:.4f} -> {report['loss_after']:.4f}; outputs in {out}")
        return
    settings = PairwiseSettings(transform=transform_kind, metric=metric, init=init, control_spacing=control_spacing,
                                bending_weight=bending_weight, grid_spacing=grid_spacing,
                                full_resolution=full_resolution)
    report = register_files(fixed, moving, out, settings, fixed_mask, moving_mask, device, force, progress=_show_progress(quiet))
    click.echo(f"{transform_kind} registration ({metric}) on {report['device']} in {report['seconds']:.1f} s: "
               f"loss {report['loss_before']:.4f} -> {report['loss_after']:.4f}; outputs in {out}")


@main.group(cls=MvmmGroup)
def atlas():
    """Build probabilistic atlases."""


@atlas.command("build", cls=MultiValueCommand)
@click.option("--label-maps", "label_maps", multiple=True, type=click.Path(path_type=Path), metavar="PATH...",
              help="Integer label maps (e.g. patient2_LGE_manual.nii.gz ...); any grids unless --register none "
                   "and --frame world, where maps on one grid are averaged as they are.")
@click.option("--labels", "old_label_maps", multiple=True, type=click.Path(path_type=Path), hidden=True,
              help="Deprecated name of --label-maps (--labels names NAME=VALUE pairs elsewhere).")
@click.option("--images", "template_images", multiple=True, metavar="SEQ=PATH",
              help="Intensity images of the label maps' subjects, one per label map and sequence, in the order of "
                   "--label-maps (e.g. --images LGE=p2_LGE.nii.gz --images LGE=p3_LGE.nii.gz ...): the atlas then "
                   "carries a mean template per sequence, which segment registers to the case's image of that "
                   "sequence (--template-metric).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output probability atlas (e.g. atlas.nii.gz).")
@click.option("--register", "register_kind", type=click.Choice(BUILD_MODELS),
              default=default(GroupwiseSettings, "register"), show_default=True,
              help="Group-wise registration of the maps to their evolving mean before averaging.")
@click.option("--frame", type=click.Choice(FRAMES), default=default(GroupwiseSettings, "frame"),
              show_default=True,
              help="world: relate maps by their headers; axes: by their image axes with the labelled anatomy's "
                   "centroid at the origin (short-axis stacks of different patients). An axes atlas is placed "
                   "on a target by its axes and field-of-view centre.")
@click.option("--sigma", type=NON_NEGATIVE, default=default(GroupwiseSettings, "sigma_mm"), show_default=True,
              help="Gaussian smoothing in mm.")
@click.option("--spacing", type=POSITIVE, multiple=True, help="Voxel size (mm) of the atlas grid (one value or one per axis).")
@click.option("--rounds", type=COUNT, default=default(GroupwiseSettings, "rounds"), show_default=True,
              help="Template updates per registration level.")
@click.option("--label-names", metavar="NAME=VALUE,...", help="Names of the label values (default: the values).")
@click.option("--force", is_flag=True, help="Overwrite an existing atlas file.")
@click.option("--device", type=DEVICE, default="auto", show_default=True,
              help="Where tensors live: auto picks CUDA when available.")
@click.option("--quiet", "-q", is_flag=True, help="Only warnings and errors; no progress bars.")
@threads_option
def atlas_build(label_maps, old_label_maps, template_images, out, register_kind, frame, sigma, spacing, rounds,
                label_names, force, device, quiet):
    """Average one-hot label maps into a probability atlas (+ a JSON sidecar of labels and how it was built)."""
    from mvmm.atlas_build import build_atlas
    from mvmm.data.atlas import Atlas
    from mvmm.data.labels import resolve_labels
    from mvmm.core.devices import resolve_device

    _setup_logging(quiet)
    if old_label_maps:
        log.warning("atlas build --labels is deprecated (elsewhere --labels names NAME=VALUE pairs): "
                    "use --label-maps")
    label_maps = tuple(label_maps) + tuple(old_label_maps)
    if not label_maps:
        raise click.UsageError("Missing option '--label-maps'.")
    if out.exists() and not force:
        raise InputError(f"--out: {out} exists; nothing was written (use --force to overwrite)")
    labels = resolve_labels(label_names)
    images = _parse_template_images(template_images)
    if register_kind == "none" and frame == "world" and not spacing and not images and _same_grids(label_maps):
        built, extra = Atlas.read(label_maps, labels=labels, sigma_mm=sigma, argname="--label-maps"), {}
    else:
        settings = GroupwiseSettings(register=register_kind, frame=frame, spacing=list(spacing) or None,
                                     sigma_mm=sigma, rounds=rounds)
        built, extra = build_atlas(label_maps, settings, labels, resolve_device(device), progress=_show_progress(quiet),
                                   images=images)
    built.save(out, extra={"build": extra} if extra else None)
    click.echo(f"atlas of {len(label_maps)} label map(s), labels {built.labels.as_dict()}, register {register_kind}, "
               f"frame {frame}, sigma {sigma} mm: {out}"
               + (f" (templates: {', '.join(built.templates)})" if built.templates else ""))
    if extra:
        dice = extra["dice_with_template"]
        for stage in ("initial", "final"):
            click.echo(f"  mean Dice of the maps with the mean ({stage}): "
                       + ", ".join(f"{k} {v:.3f}" for k, v in dice[stage].items()))


def _parse_template_images(items) -> dict:
    """``["LGE=a", "LGE=b", "C0=c", "C0=d"]`` → ``{"LGE": ["a", "b"], "C0": ["c", "d"]}``."""
    images = {}
    for sequence, path in _name_path_pairs(items, "--images", "SEQ"):
        images.setdefault(sequence, []).append(path)
    return images


def _same_grids(paths) -> bool:
    from mvmm.data import io

    grids = [io.read_grid(p, "--label-maps") for p in paths]
    return all(g.same_geometry(grids[0]) for g in grids[1:])


@main.command("check-manifest", cls=MultiValueCommand)
@click.argument("manifest")
@click.option("--data", required=True, type=click.Path(path_type=Path), help="Folder holding the data set's files.")
@click.option("--patients", help="Patients that must be there, e.g. 1-25 (default: those found).")
@click.option("--sequences", multiple=True, help="Sequences whose images must be there (default: all of the manifest).")
def check_manifest(manifest, data, patients, sequences):
    """Say what of data set MANIFEST (e.g. mscmr19) is in --data, and what is missing."""
    from mvmm.data.manifest import Manifest, parse_patients, scan

    described = Manifest.load(manifest)
    found = scan(described, data, parse_patients(patients) if patients else None,
                 list(sequences) or list(described.sequences), [described.evaluate_on])
    click.echo(found.summary(described))
    click.echo("cite: " + " | ".join(described.citation))
    click.echo("obtain: " + described.obtain)
    if found.problems:
        raise click.exceptions.Exit(1)


def training_data_options(func):
    """--data, --manifest, --patients of the train commands."""
    func = click.option("--patients", help="Training patients of a --data folder, e.g. 1-20 (default: all found).")(func)
    func = click.option("--manifest", default="mscmr19", show_default=True,
                        help="The data set a --data folder holds.")(func)
    return click.option("--data", required=True, type=click.Path(path_type=Path),
                        help="A folder of a described data set (see --manifest) or a CSV with a 'subject' column "
                             "and one column of image paths per sequence.")(func)


def training_options(func=None, *, smoothness: bool = True):
    """The TrainingSettings options and --out/--resume/--force of the train commands (``smoothness``:
    whether the network has a velocity field for --smoothness to weigh)."""
    if func is None:
        return lambda f: training_options(f, smoothness=smoothness)
    options = [
        click.option("--epochs", type=COUNT, default=default(TrainingSettings, "epochs"), show_default=True,
                     help="Epochs (with --resume: the total to reach)."),
        click.option("--batch-size", type=COUNT, default=default(TrainingSettings, "batch_size"), show_default=True),
        click.option("--lr", type=POSITIVE, default=default(TrainingSettings, "lr"), show_default=True,
                     help="Adam's learning rate (the first epoch's, under --lr-schedule cosine)."),
        click.option("--lr-schedule", type=click.Choice(LR_SCHEDULES), default=default(TrainingSettings, "lr_schedule"),
                     show_default=True, help="The learning rate over the epochs: constant, or cosine annealing from "
                                             "--lr towards 0 at the last epoch."),
    ] + ([
        click.option("--smoothness", type=NON_NEGATIVE, default=default(TrainingSettings, "smoothness"),
                     show_default=True, help="Weight of the velocity field's mean squared gradient."),
    ] if smoothness else []) + [
        click.option("--augment/--no-augment", default=default(TrainingSettings, "augment"), show_default=True,
                     help="Random intensity change and small in-plane motion of the (moving) images."),
        click.option("--out", required=True, type=click.Path(path_type=Path), help="The model directory."),
        click.option("--resume", is_flag=True, help="Continue the training run in --out from its last epoch."),
        click.option("--force", is_flag=True, help="Replace a non-empty --out (without --resume)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@main.group(cls=MvmmGroup)
def train():
    """Train networks that predict the model's parameters (amortized inference)."""


@train.command("bayes", cls=MultiValueCommand)
@training_data_options
@click.option("--sequences", multiple=True, required=True,
              help="Image names in the network's input order (the first places the network grid), e.g. LGE C0.")
@click.option("--atlas", multiple=True, required=True, type=click.Path(path_type=Path), metavar="PATH...",
              help="The atlas (mvmm atlas build output, or label maps): saved into the model.")
@click.option("--subtypes", multiple=True, default=default_list(BayesNetSettings, "subtypes"), metavar="IMAGE:TISSUE=N",
              help="Gaussian subtypes the network predicts, as for segment (e.g. LGE:Myo=2).")
@click.option("--background-subtypes", type=COUNT, default=default(BayesNetSettings, "background_subtypes"),
              show_default=True, help="Subtypes of the background in every image.")
@click.option("--labelled-patients", help="Patients of a --data folder whose manual labels (of the first sequence) "
                                          "add the cross-entropy of the model's posterior, e.g. 1-20 "
                                          "(semi-supervised; default: none, unsupervised). With a CSV: the rows "
                                          "with a 'labels' cell.")
@click.option("--label-weight", type=NON_NEGATIVE, default=default(BayesNetSettings, "label_weight"),
              show_default=True, help="Weight of the labelled cases' cross-entropy.")
@training_options
@common_options
def train_bayes_command(data, manifest, patients, sequences, atlas, subtypes, background_subtypes, labelled_patients,
                        label_weight, epochs, batch_size, lr, lr_schedule, smoothness, augment, out, resume, force,
                        device, seed, quiet):
    """The Bayesian segmentation CNN (Dalca et al. 2019) on unlabelled images: atlas warp and mixture
    parameters in one forward pass, trained on the model's own likelihood (and, with
    --labelled-patients, on a few label maps too)."""
    from mvmm.training import train_bayes

    _setup_logging(quiet)
    rows = _training_rows(data, manifest, patients, list(sequences), resume, force,
                          _labelled_patients(labelled_patients, data))
    names = [r.name for r in rows if r.labels is not None]
    network = BayesNetSettings(subtypes=list(subtypes), background_subtypes=background_subtypes,
                               label_weight=label_weight)
    training = TrainingSettings(epochs=epochs, batch_size=batch_size, lr=lr, lr_schedule=lr_schedule,
                                smoothness=smoothness, augment=augment, seed=seed)
    result = train_bayes(rows, list(sequences), list(atlas), out, network, training, device, resume=resume,
                         force=force, progress=_show_progress(quiet), labelled=names)
    click.echo(f"trained on {len(result['subjects'])} subjects ({len(names)} labelled) for {result['epochs']} "
               f"epochs in {result['seconds']:.0f} s (final loss {result['final_loss']:.4f}): {out}")


@train.command("regnet", cls=MultiValueCommand)
@training_data_options
@click.option("--fixed", "fixed_sequence", required=True, help="The fixed image's sequence, e.g. LGE.")
@click.option("--moving", "moving_sequence", required=True, help="The moving image's sequence, e.g. C0.")
@click.option("--metric", type=click.Choice(REGNET_METRICS), default=default(RegNetSettings, "metric"),
              show_default=True, help="Similarity: mutual information across sequences, local NCC within one.")
@training_options
@common_options
def train_regnet_command(data, manifest, patients, fixed_sequence, moving_sequence, metric, epochs, batch_size, lr,
                         lr_schedule, smoothness, augment, out, resume, force, device, seed, quiet):
    """A VoxelMorph-style registration network: fixed + moving image → diffeomorphic SVF, trained
    unsupervised on image similarity; used by mvmm register --model."""
    from mvmm.training import train_regnet

    _setup_logging(quiet)
    rows = _training_rows(data, manifest, patients, [fixed_sequence, moving_sequence], resume, force)
    training = TrainingSettings(epochs=epochs, batch_size=batch_size, lr=lr, lr_schedule=lr_schedule,
                                smoothness=smoothness, augment=augment, seed=seed)
    result = train_regnet(rows, fixed_sequence, moving_sequence, out, RegNetSettings(metric=metric), training, device,
                          resume=resume, force=force, progress=_show_progress(quiet))
    click.echo(f"trained on {len(result['subjects'])} pairs for {result['epochs']} epochs in "
               f"{result['seconds']:.0f} s (final loss {result['final_loss']:.4f}): {out}")


@train.command("acwe", cls=MultiValueCommand)
@training_data_options
@click.option("--sequences", multiple=True, required=True,
              help="Image names in the network's input order (the first places the network grid), e.g. C0, or LGE C0.")
@click.option("--classes", type=click.IntRange(min=2), default=default(AcweNetSettings, "classes"),
              help="Phases K of the Chan–Vese model (default: the atlas's or the labels' classes with --atlas or "
                   "--labelled-patients, else 2: dark and bright).")
@click.option("--length-weight", type=NON_NEGATIVE, default=default(AcweNetSettings, "length_weight"), show_default=True,
              help="Weight ν (mm) of the boundary length per voxel against the region energy per voxel.")
@click.option("--variances", type=click.Choice(ACWE_VARIANCES), default=default(AcweNetSettings, "variances"),
              show_default=True, help="equal: Chan–Vese's region term Σ P (I − c)²; fitted: each class's own "
                                      "variance (the Gaussian-mixture energy).")
@click.option("--atlas", multiple=True, type=click.Path(path_type=Path), metavar="PATH...",
              help="An atlas (mvmm atlas build output, or label maps): an input, the region and a prior term of the "
                   "energy; it names the classes. Saved into the model.")
@click.option("--labelled-patients", help="Patients of a --data folder whose manual labels (of the first sequence) "
                                          "add a cross-entropy term, e.g. 1-5 (semi-supervised). With a CSV: the "
                                          "rows with a 'labels' cell.")
@click.option("--labels", "labels_text", metavar="NAME=VALUE,...",
              help="The classes of those label maps without --atlas (default: the data set's, e.g. bg=0,Myo=200,"
                   "LV=500,RV=600).")
@click.option("--label-weight", type=NON_NEGATIVE, default=default(AcweNetSettings, "label_weight"), show_default=True,
              help="Weight of the labelled cases' cross-entropy.")
@training_options(smoothness=False)
@common_options
def train_acwe_command(data, manifest, patients, sequences, classes, length_weight, variances, atlas,
                       labelled_patients, labels_text, label_weight, epochs, batch_size, lr, lr_schedule, augment, out,
                       resume, force, device, seed, quiet):
    """The Chan–Vese CNN (Chen & Frey 2020): images → soft segmentation in one forward pass, trained by the
    active-contour-without-edges energy (vector-valued, multiphase, optionally with the atlas and a few
    labelled cases); used by mvmm segment --model."""
    from mvmm.data.labels import resolve_labels
    from mvmm.data.manifest import Manifest
    from mvmm.training import train_acwe

    _setup_logging(quiet)
    rows = _training_rows(data, manifest, patients, list(sequences), resume, force,
                          _labelled_patients(labelled_patients, data))
    names = [r.name for r in rows if r.labels is not None]
    labels = resolve_labels(labels_text)
    if names and labels is None and not atlas:
        labels = Manifest.load(manifest).labels
    network = AcweNetSettings(classes=classes, length_weight=length_weight, variances=variances,
                              label_weight=label_weight)
    training = TrainingSettings(epochs=epochs, batch_size=batch_size, lr=lr, lr_schedule=lr_schedule, augment=augment,
                                seed=seed)
    result = train_acwe(rows, list(sequences), out, network, training, atlas=list(atlas) or None, labels=labels,
                        labelled=names, device=device, resume=resume, force=force, progress=_show_progress(quiet))
    click.echo(f"trained on {len(result['subjects'])} subjects ({len(names)} labelled) for {result['epochs']} epochs "
               f"in {result['seconds']:.0f} s (final loss {result['final_loss']:.4f}), classes "
               f"{result['classes']}: {out}")


@train.command("prior", cls=MultiValueCommand)
@click.option("--labels", "maps", multiple=True, required=True, type=click.Path(path_type=Path), metavar="PATH...",
              help="Label maps (any data set and sequence), e.g. ../shared/data/acdc/*_gt.nii.gz.")
@click.option("--label-names", required=True, metavar="NAME=VALUE,...",
              help="The maps' values named by tissue, e.g. RV=1,Myo=2,LV=3 for ACDC; a name may take several "
                   "values (RV=1,Myo=2,LV=3,Myo=200,LV=500,RV=600: two data sets together). Maps the model yields "
                   "hold each name's first value.")
@click.option("--latent", type=COUNT, default=default(PriorVaeSettings, "latent"), show_default=True,
              help="Dimensions of the latent code.")
@training_options(smoothness=False)
@common_options
def train_prior_command(maps, label_names, latent, epochs, batch_size, lr, lr_schedule, augment, out, resume, force,
                        device, seed, quiet):
    """The anatomical prior (Dalca et al. 2018): a VAE on label maps alone, whose decoder later replaces the
    atlas (mvmm train vae-seg --prior)."""
    from mvmm.training import train_prior

    _setup_logging(quiet)
    if resume and force:
        raise InputError("resume: --resume continues --out; --force would replace it: give one")
    training = TrainingSettings(epochs=epochs, batch_size=batch_size, lr=lr, lr_schedule=lr_schedule, augment=augment,
                                seed=seed)
    result = train_prior(list(maps), label_names, out, PriorVaeSettings(latent=latent), training, device,
                         resume=resume, force=force, progress=_show_progress(quiet))
    click.echo(f"trained on {len(result['subjects'])} label maps for {result['epochs']} epochs in "
               f"{result['seconds']:.0f} s (final loss {result['final_loss']:.4f}), classes {result['classes']}: {out}")


@train.command("vae-seg", cls=MultiValueCommand)
@training_data_options
@click.option("--prior", "prior_dir", required=True, type=click.Path(path_type=Path), metavar="PRIOR_DIR",
              help="A prior model (mvmm train prior): its decoder, frozen, is the spatial prior; copied into --out.")
@click.option("--sequences", multiple=True, required=True,
              help="Image names in the network's input order (the first places the network grid), e.g. LGE C0.")
@click.option("--subtypes", multiple=True, default=default_list(VaeSegSettings, "subtypes"), metavar="IMAGE:TISSUE=N",
              help="Gaussian subtypes, as for segment (e.g. LGE:Myo=2).")
@click.option("--background-subtypes", type=COUNT, default=default(VaeSegSettings, "background_subtypes"),
              show_default=True, help="Subtypes of the background in every image.")
@click.option("--kl-weight", type=NON_NEGATIVE, default=default(VaeSegSettings, "kl_weight"), show_default=True,
              help="Weight of the latent code's KL term per voxel (1: the ELBO).")
@training_options(smoothness=False)
@common_options
def train_vae_seg_command(data, manifest, patients, prior_dir, sequences, subtypes, background_subtypes, kl_weight,
                          epochs, batch_size, lr, lr_schedule, augment, out, resume, force, device, seed, quiet):
    """Segmentation on a learned anatomical prior (Dalca et al. 2018): an image encoder predicts the prior's
    latent code from unlabelled images, trained by the mixture's likelihood; used by mvmm segment --model."""
    from mvmm.training import train_vae_seg

    _setup_logging(quiet)
    rows = _training_rows(data, manifest, patients, list(sequences), resume, force)
    network = VaeSegSettings(subtypes=list(subtypes), background_subtypes=background_subtypes, kl_weight=kl_weight)
    training = TrainingSettings(epochs=epochs, batch_size=batch_size, lr=lr, lr_schedule=lr_schedule, augment=augment,
                                seed=seed)
    result = train_vae_seg(rows, list(sequences), prior_dir, out, network, training, device, resume=resume,
                           force=force, progress=_show_progress(quiet))
    click.echo(f"trained on {len(result['subjects'])} subjects for {result['epochs']} epochs in "
               f"{result['seconds']:.0f} s (final loss {result['final_loss']:.4f}): {out}")


def _labelled_patients(text, data) -> list:
    """``--labelled-patients`` as patient numbers (patients of a --data folder, not of a CSV)."""
    from mvmm.data.manifest import parse_patients

    labelled = parse_patients(text) if text else []
    if labelled and data.is_file():
        raise InputError("labelled_patients: --labelled-patients selects patients of a --data folder; in a CSV, "
                         "fill the 'labels' cell of the labelled rows")
    return labelled


def _training_rows(data, manifest, patients, sequences, resume, force, labelled=()):
    from mvmm.data.manifest import parse_patients
    from mvmm.nets.data import subjects_from_csv, subjects_from_manifest

    if resume and force:
        raise InputError("resume: --resume continues --out; --force would replace it: give one")
    if data.is_file():
        if patients:
            raise InputError("patients: --patients selects patients of a --data folder; a CSV lists its subjects")
        return subjects_from_csv(data, sequences)
    return subjects_from_manifest(manifest, data, parse_patients(patients) if patients else None, sequences, labelled)


@main.group(cls=MvmmGroup)
def experiment():
    """Reproduce published experiments."""


@experiment.command("mscmr", cls=MultiValueCommand)
@click.option("--data", required=True, type=click.Path(path_type=Path),
              help="MS-CMRSeg folder (patientN_{LGE|DE,C0,T2}[_manual].nii.gz); targets come from here.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Experiment folder (resumable).")
@click.option("--atlas-data", type=click.Path(path_type=Path),
              help="Build the atlases from this folder's patients (default: leave-one-out within --data).")
@click.option("--lge-data", type=click.Path(path_type=Path),
              help="Take the targets' LGE images and LGE manual labels from this folder instead (e.g. mscmr_full: "
                   "the uncropped LGE as the scanner gave it); the atlases still come from --data or --atlas-data.")
@click.option("--patients", help="Target patients, e.g. 1-25 (default: all in --data).")
@click.option("--sequences", multiple=True, default=default_list(ExperimentSettings, "sequences"), show_default=True,
              help="Sequences of each target for em-all and gmm (LGE is always used).")
@click.option("--methods", multiple=True, type=click.Choice(EXPERIMENT_METHODS),
              default=default_list(ExperimentSettings, "methods"), show_default=True,
              help="Methods to run and report (atlas and em-all always run; the network methods bayes, vae-seg "
                   "and their -refine (the network's placement, then em-all's registration and EM), and bayes-ensemble "
                   "(bayes's and em-all's posteriors averaged, em-all's atlas voting with --prior-votes) need --folds or "
                   "--model).")
@click.option("--folds", type=click.IntRange(min=2), default=default(ExperimentSettings, "folds"),
              help="Cross-validation over the patients: per fold, the atlas from the other folds' labels and (for "
                   "the network methods) networks trained on their images; default: leave-one-out atlases.")
@click.option("--model", "model_dir", type=click.Path(path_type=Path),
              help="A trained model directory for the network methods of its kind: bayes for bayes*, vae-seg for "
                   "vae-seg* (instead of --folds).")
@click.option("--epochs", type=COUNT, default=default(ExperimentSettings, "epochs"), show_default=True,
              help="--folds: training epochs of each fold's network.")
@click.option("--vae-prior", type=click.Path(path_type=Path), metavar="PRIOR_DIR",
              default=default(ExperimentSettings, "vae_prior"),
              help="--folds: the anatomical prior (mvmm train prior, e.g. on ACDC labels) under every fold's vae-seg "
                   "network; default: a prior trained per fold on its training patients' LGE labels.")
@click.option("--prior-epochs", type=COUNT, default=default(ExperimentSettings, "prior_epochs"), show_default=True,
              help="--folds without --vae-prior: training epochs of each fold's prior.")
@click.option("--network-labels/--no-network-labels", default=default(ExperimentSettings, "network_labels"),
              show_default=True, help="--folds: train each fold's Bayesian CNN with its training patients' LGE labels "
                                      "too (semi-supervised; the labels its atlas is built from).")
@click.option("--prior", type=click.Choice(PRIORS), default=default(ExperimentSettings, "prior"), show_default=True,
              help="Spatial prior of each target, from the atlas patients only: their group-wise atlas placed by "
                   "the target's axes (groupwise), placed by registering its LGE intensity template (template), "
                   "their LGE images registered to the target's and their labels fused (multi-atlas), or their "
                   "label maps registered to em-all's fit with the group-wise atlas, averaged, and em-all fitted "
                   "again on them (multi-atlas-fit).")
@click.option("--template-sequence", default=default(ExperimentSettings, "template_sequence"), show_default=True,
              help="template: the sequence whose template, registered to the target's image of it, places the atlas.")
@click.option("--template-transform", type=click.Choice(TRANSFORM_KINDS),
              default=default(ExperimentSettings, "template_transform"), show_default=True,
              help="template: the final transform of that registration.")
@click.option("--atlas-set-size", type=COUNT, default=default(ExperimentSettings, "atlas_set_size"),
              help="multi-atlas: keep the N atlases most similar to the target after the affine step (default: all).")
@click.option("--atlas-register", type=click.Choice(BUILD_MODELS),
              default=default(ExperimentSettings, "atlas_register"),
              show_default=True, help="Group-wise registration of the atlas patients' labels.")
@click.option("--register-atlas", type=click.Choice(ATLAS_MODELS),
              default=default(ExperimentSettings, "register_atlas"),
              show_default=True, help="Registration of the atlas to each target inside the joint model (affine: "
                                      "rigid, then affine held near rigid by the prior on scaling and shear).")
@click.option("--register-images", type=click.Choice(IMAGE_MODELS),
              default=default(ExperimentSettings, "register_images"),
              show_default=True, help="Registration of the other sequences to the LGE inside the joint model.")
@click.option("--atlas-search-fov/--no-atlas-search-fov", default=default(ExperimentSettings, "atlas_search_fov"),
              show_default=True,
              help="First find the heart in the target's whole field of view by the atlas's LGE template, as for "
                   "segment.")
@click.option("--atlas-search-mm", type=NON_NEGATIVE, default=default(ExperimentSettings, "atlas_search_mm"),
              show_default=True,
              help="Search of the atlas start over -d, 0, +d mm per axis by log-likelihood (0: off).")
@click.option("--affine-weight", type=NON_NEGATIVE, default=default(ExperimentSettings, "affine_weight"), show_default=True,
              help="Weight of the prior on the atlas's affine scaling and shear, as for segment.")
@click.option("--roi-margin", type=MARGIN, default=default(ExperimentSettings, "roi_margin_mm"),
              show_default=True, metavar="MM|none",
              help="em-all and em-lge fit only within MM of the moved atlas's foreground (none: the whole field "
                   "of view).")
@click.option("--subtypes", multiple=True, default=default_list(ExperimentSettings, "subtypes"),
              show_default=True, metavar="IMAGE:TISSUE=N",
              help="Gaussian subtypes of em-all and em-lge, as for segment (the default: normal and scarred "
                   "LGE myocardium).")
@click.option("--proportions", type=click.Choice(["atlas", "learned"]),
              default=default(ExperimentSettings, "proportions"), show_default=True,
              help="Global tissue proportions of em-all and em-lge: held equal (the prior is the atlas) or "
                   "estimated, as for segment.")
@click.option("--pathology", is_flag=True,
              help="em-all with the named pathology subtypes (LGE:Myo=normal,scar, T2:Myo=normal,oedema) instead of "
                   "--subtypes' LGE and T2 myocardium; with T2, its scar and oedema on the T2 grid are evaluated "
                   "against the MyoPS labels (patientN_T2_pathology).")
@pathology_rule_options
@click.option("--mrf-beta", type=NON_NEGATIVE, default=default(ExperimentSettings, "mrf_beta"), show_default=True,
              help="Potts MRF weight of em-all and em-lge, as for segment (0: none).")
@click.option("--prior-votes/--no-prior-votes", default=default(ExperimentSettings, "prior_votes"), show_default=True,
              help="em-all's and em-lge's posterior is the mean of the model's and the registered atlas's, as for "
                   "segment's cardiac preset (bayes-ensemble: the atlas is a third voter).")
@click.option("--postprocess", type=click.Choice(POSTPROCESSING),
              default=default(ExperimentSettings, "postprocess"), show_default=True,
              help="Clean-up of the label maps of em-all and em-lge, as for segment.")
@click.option("--bias-correction", type=click.Choice(BIAS_CORRECTIONS),
              default=default(ExperimentSettings, "bias_correction"), show_default=True,
              help="N4 bias-field correction of the target's images before em-all and em-lge, as for segment "
                   "(the networks see the images as read).")
@click.option("--force", is_flag=True, help="Redo finished patients (and accept a folder with other settings).")
@common_options
def experiment_mscmr(data, out, atlas_data, lge_data, patients, sequences, methods, folds, model_dir, epochs,
                     vae_prior, prior_epochs, network_labels, prior,
                     template_sequence, template_transform,
                     atlas_set_size, atlas_register,
                     register_atlas, register_images,
                     atlas_search_fov, atlas_search_mm, affine_weight, roi_margin, subtypes, proportions, pathology,
                     pathology_rule, scar_sd, oedema_sd, mrf_beta, prior_votes, postprocess, bias_correction, force, device, seed, quiet):
    """Atlas, EM on LGE, EM on all sequences and a plain mixture on MS-CMRSeg; results.csv, summary.* and figures."""
    from mvmm.data.manifest import parse_patients
    from mvmm.experiments.mscmr import run_mscmr

    _setup_logging(quiet)
    _require_pathology_for_rule(pathology)
    settings = ExperimentSettings(sequences=list(sequences), methods=list(methods), folds=folds,
                                  model=str(model_dir) if model_dir else None, epochs=epochs,
                                  vae_prior=str(vae_prior) if vae_prior else None, prior_epochs=prior_epochs,
                                  network_labels=network_labels, prior=prior,
                                  template_sequence=template_sequence, template_transform=template_transform,
                                  atlas_set_size=atlas_set_size,
                                  atlas_register=atlas_register,
                                  register_atlas=register_atlas, register_images=register_images,
                                  atlas_search_fov=atlas_search_fov, atlas_search_mm=atlas_search_mm,
                                  affine_weight=affine_weight, roi_margin_mm=roi_margin, subtypes=list(subtypes), proportions=proportions,
                                  pathology=pathology, pathology_rule=pathology_rule, scar_sd=scar_sd, oedema_sd=oedema_sd,
                                  mrf_beta=mrf_beta, prior_votes=prior_votes, postprocess=postprocess,
                                  bias_correction=bias_correction, device=device, seed=seed)
    summary = run_mscmr(data, out, settings, parse_patients(patients) if patients else None, atlas_data, force,
                        progress=_show_progress(quiet), lge_data=lge_data)
    click.echo(f"{len(summary['patients'])} patients; mean LGE Dice (Myo / LV / RV), seconds per patient:")
    for method in settings.methods:
        stats = summary["methods"][method]
        click.echo(f"  {method:<12} " + " / ".join(f"{stats[s]['dice_mean']:.3f}" for s in ("Myo", "LV", "RV"))
                   + f"   {summary['seconds_per_patient'][method]:.1f} s")
    for sequence, stats in summary.get("em_all_native", {}).items():
        click.echo(f"  em-all on the {sequence} grid (its own manual labels) "
                   + " / ".join(f"{stats[s]['dice_mean']:.3f}" for s in ("Myo", "LV", "RV")))
    for region, v in summary.get("pathology", {}).items():
        click.echo(f"  em-all {region} (T2 grid, MyoPS labels): Dice {v['dice_mean']:.3f} over "
                   f"{v['patients_with_manual']} patients; volume r {v['volume_r']:.2f}, bias {v['bias_ml']:+.2f} ml")
    for patient, reason in summary.get("skipped", {}).items():
        click.echo(f"  skipped patient {patient}: {reason}")
    click.echo(f"tables and figures in {out}")


if __name__ == "__main__":  # pragma: no cover
    main()
