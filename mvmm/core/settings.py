"""The settings users choose, with their defaults and choices, in plain Python.

Every default and every list of choices is defined here once; the solvers, the Python API and the
command line read them from here. The module imports neither torch nor SimpleITK, so that
``mvmm --help`` and the option parsing start at once (the command line imports the heavy modules
only when a command runs).

Also here: the coarse-to-fine schedule the registration settings describe (:func:`schedule`,
:class:`Level`, :class:`OuterLoop`), which :mod:`mvmm.spatial.coarse_to_fine` runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import List, Mapping, Optional, Sequence

from mvmm.core.errors import InputError, require_field_choice, require_positive

# ---------------------------------------------------------------- choices and constants
METRICS = ("ssd", "ncc", "mi", "dice")  # pairwise similarity (mvmm.spatial.similarity)
INIT_METHODS = ("header", "geometry", "moments")  # initial placement (mvmm.spatial.init)
FRAMES = ("world", "axes")  # how atlas label maps are related (mvmm.atlas_build, mvmm.data.atlas)
POSTPROCESSING = ("none", "cardiac")  # mvmm.postprocess
BUILTIN_CARDIAC = "builtin:cardiac"  # the built-in atlas, as --atlas names it
NO_ATLAS = "none"
DEFAULT_SIGMA_MM = 2.0  # smoothing of label-map atlases
# The background mixes several tissues (fat, lung, liver, air) in every sequence.
BACKGROUND_SUBTYPES = 2


@dataclass(frozen=True)
class SegmentationDefaults:
    """Defaults of :func:`mvmm.segment.segment_subject` (and ``mvmm segment``) beyond the registration."""

    background_subtypes: int = BACKGROUND_SUBTYPES
    mrf_beta: float = 0.0
    max_iter: int = 200
    tol: float = 1e-5
    postprocess: str = "none"
    bias_correction: str = "none"
    prior_votes: bool = False  # the registered atlas votes beside the model (Segmentation.prior_votes)


SEGMENTATION = SegmentationDefaults()
BIAS_CORRECTIONS = ("none", "n4")  # intensity non-uniformity correction before the fit (mvmm.data.bias)
LR_SCHEDULES = ("constant", "cosine")  # the learning rate over the epochs (TrainingSettings, mvmm.nets.train)

# ---------------------------------------------------------------- presets of `mvmm segment`
PRESETS = ("auto", "cardiac", "none")
CARDIAC_TISSUES = ("Myo", "LV", "RV")  # an atlas with these tissues is cardiac (`--preset auto`)
# What `--preset cardiac` sets, by segment's option names (explicit options override it): the
# MS-CMRSeg experiment's em-all settings (ExperimentSettings takes its defaults from here), chosen on
# patients 1–25 with leave-one-out atlases (docs/mscmr.md). On those patients plain `mvmm segment`
# without them gave LGE Dice 0.721 / 0.876 / 0.699, with them 0.755 / 0.886 / 0.804. Subtype items
# apply to the images so named.
CARDIAC_PRESET = {
    "roi_margin_mm": 5.0,  # fit near the moved atlas's foreground
    "subtypes": ("LGE:Myo=2",),  # normal and enhanced (scarred) LGE myocardium
    "proportions": "atlas",  # held equal: the prior is the registered atlas
    "postprocess": "cardiac",  # papillary muscles counted as LV, islands removed
    "atlas_search_fov": True,  # find the heart in the whole field of view by the atlas's template
    "atlas_search_mm": 10.0,  # start search of the atlas by log-likelihood
    "affine_weight": 0.3,
    "template_metric": "none",  # placed by the search and log L, not by a template (same Dice, docs/mscmr.md)
    # the posterior is the mean of the model's and the registered atlas's: intensities the model misreads
    # (bright scar as blood) cost less; chosen on the development fold, 0.15.0 (docs/mscmr.md)
    "prior_votes": True,
}

# A cardiac fit whose posterior moved less than this from its registered atlas (the mean total-variation
# distance over the atlas's heart, mvmm.segment.Segmentation.posterior_shift) most likely sits on the wrong
# anatomy: the images told the model nothing the atlas had not. Chosen on the development fold's LGE-alone
# fits (patients 1, 6, 11, 16, 21: patient 1 lost the heart at 0.070, the others found it at >= 0.102; the
# midpoint); tested on the other 20 patients and on LGE + C0 (docs/mscmr.md, "When the fit lost the heart")
CARDIAC_MIN_POSTERIOR_SHIFT = 0.086

# ---------------------------------------------------------------- the coarse-to-fine schedule
LINEAR_KINDS = ("rigid", "affine")
NONLINEAR_KINDS = ("ffd", "svf")


@dataclass(frozen=True)
class Level:
    """One level of the schedule.

    Attributes
    ----------
    name : str
        E.g. ``"affine"``, ``"ffd 20 mm"``, ``"svf 40 mm, full resolution"``.
    kinds : dict of str to str or None
        What each moving object optimises at this level: ``"rigid"``/``"affine"`` (its linear part),
        ``"ffd"``/``"svf"`` (its deformation, the linear part held), or None (held fixed).
    control_spacing : float, optional
        Control-point spacing (mm) of a non-linear level.
    full_resolution : bool
        Run on the full grid instead of the coarse registration grid.
    """

    name: str
    kinds: Mapping[str, Optional[str]] = field(default_factory=dict)
    control_spacing: Optional[float] = None
    full_resolution: bool = False


def _kind_at(final: str, stage: str) -> Optional[str]:
    """What an object whose final kind is ``final`` optimises at ``stage``."""
    if final == "none":
        return None
    if stage in NONLINEAR_KINDS:
        return final  # the deformation, or a linear object's continuing linear part
    linear = "affine" if final in NONLINEAR_KINDS else final
    return "rigid" if "rigid" in (stage, linear) else "affine"


def schedule(kinds: Mapping[str, str], control_spacing: float, nonlinear_levels: int,
             full_resolution: bool = False) -> List[Level]:
    """The coarse-to-fine levels that take each object to its final kind.

    Parameters
    ----------
    kinds : dict of str to {"none", "rigid", "affine", "ffd", "svf"}
        Final transform kind of each moving object (at most one non-linear kind among them).
    control_spacing : float
        Control spacing (mm) of the first non-linear level; each further level halves it.
    nonlinear_levels : int
    full_resolution : bool
        Repeat the last level on the full grid.

    Returns
    -------
    list of Level
        Empty when nothing moves. Rigid first; affine when any object goes beyond rigid; then
        the non-linear levels.
    """
    finals = set(kinds.values())
    unknown = finals - {"none", *LINEAR_KINDS, *NONLINEAR_KINDS}
    if unknown:
        raise ValueError(f"kinds: unknown transform kinds {sorted(unknown)}")
    nonlinear = sorted(finals & set(NONLINEAR_KINDS))
    if len(nonlinear) > 1:
        raise ValueError(f"kinds: one non-linear kind per schedule, got {nonlinear}")
    if finals <= {"none"}:
        return []
    stages = [("rigid", None)]
    if finals & {"affine", *NONLINEAR_KINDS}:
        stages.append(("affine", None))
    for kind in nonlinear:
        stages += [(kind, control_spacing / 2 ** i) for i in range(nonlinear_levels)]
    levels = [Level(stage if spacing is None else f"{stage} {spacing:g} mm",
                    {name: _kind_at(final, stage) for name, final in kinds.items()}, spacing)
              for stage, spacing in stages]
    if full_resolution:
        levels.append(replace(levels[-1], name=levels[-1].name + ", full resolution", full_resolution=True))
    return levels


@dataclass(frozen=True)
class OuterLoop:
    """How hard a level works.

    Attributes
    ----------
    steps : int
        Adam steps per outer iteration.
    max_outer : int
        Outer iterations per level at most.
    step_mm, step_decay, min_step_mm : float
        Adam's step (about mm of motion) in the first outer iteration, its factor per further
        outer iteration, and its floor.
    tol : float
        A level stops when the monitored value changes by less than ``tol`` (relative) over an
        outer iteration.
    """

    steps: int
    max_outer: int
    step_mm: float
    step_decay: float
    min_step_mm: float
    tol: float

    def step_at(self, outer: int) -> float:
        """Adam's step in outer iteration ``outer`` (from 1)."""
        return max(self.step_mm * self.step_decay ** (outer - 1), self.min_step_mm)

# ---------------------------------------------------------------- registration settings
# λ of the bending energy against the mean squared difference of probability maps (label maps registered to
# label maps or to a posterior): GroupwiseSettings and FitGuidedSettings, whose docstrings say why this value
PROBABILITY_SSD_BENDING_WEIGHT = 1.0
ATLAS_MODELS = ("none",) + LINEAR_KINDS + NONLINEAR_KINDS
IMAGE_MODELS = ("none",) + LINEAR_KINDS
ATLAS_INITS = ("header", "geometry")
IMAGE_INITS = ("mi", "header")
TEMPLATE_METRICS = ("none", "ncc", "mi")  # atlas placement by its intensity template (mvmm.joint)
TRANSFORM_KINDS = LINEAR_KINDS + NONLINEAR_KINDS  # pairwise
BUILD_MODELS = ("none",) + LINEAR_KINDS + NONLINEAR_KINDS  # group-wise


@dataclass
class RegistrationSettings:
    """What moves, how, and how hard the solver works.

    Attributes
    ----------
    atlas : {"none", "rigid", "affine", "ffd", "svf"}
        Atlas transform; ``"affine"`` (the default) runs rigid then affine, ``"ffd"`` then B-spline
        levels, ``"svf"`` then diffeomorphic stationary-velocity levels (a B-spline velocity).
        On MS-CMRSeg an FFD atlas level still loses to affine (docs).
    images : {"none", "rigid", "affine"}
        Transform of each non-reference image (the reference is fixed). ``"none"`` by default: on
        MS-CMRSeg no rigid motion of C0 tried beats the headers (docs).
    template_metric : {"ncc", "mi", "none"}
        When the atlas carries an intensity template of one of the case's sequences
        (:func:`mvmm.atlas_build.build_atlas` with ``images``), the atlas is first placed by registering
        that template to the case's image with this similarity (:mod:`mvmm.register`), then the
        likelihood levels of ``atlas`` refine it; ``"none"`` ignores templates. Atlases without a
        template are placed as before (``atlas_init``, ``atlas_search_mm``).
    template_transform : {"rigid", "affine", "ffd", "svf"}
        Final transform of the template registration (rigid → affine → non-linear levels of
        ``control_spacing``, checked for folding).
    template_sequence : str, optional
        The sequence whose template drives the placement; default: the reference image's, else the
        first image (in order) the atlas has a template for.
    atlas_init : {"header", "geometry"}
        Initial atlas placement: as its header says, or its field-of-view centre on the reference's.
    atlas_search_fov : bool
        Before the levels, move the atlas's start to where its intensity template of one of the
        case's sequences (the reference's first) best correlates with that image, over every
        in-plane translation of the field of view (:mod:`mvmm.data.template_search`): the heart
        found in an uncropped scan. Needs an atlas with templates (``mvmm atlas build --images``);
        an atlas without is left at its start (a warning when the field of view is much wider
        than the atlas). With ``template_metric``, the template's registration starts there.
    atlas_search_mm : float
        Then try the atlas start moved by −d, 0, +d mm along each axis of the reference
        (3^ndim placements) and keep the one whose freshly fitted model explains the images best
        (highest log L after ``search_em_steps`` EM iterations); 0 turns the search off.
    search_em_steps : int
    images_init : {"mi", "header"}
        Initial placement of moving images: a rigid registration to the reference by mutual
        information (:mod:`mvmm.register`), or the headers.
    images_model : str, optional
        A registration network's model directory (``mvmm train regnet``, fixed = the reference's
        sequence, moving = an image's): that image starts from the network's deformation (held;
        ``images`` levels then refine a linear map after it) instead of ``images_init``.
    control_spacing : float
        Control-point spacing (mm) of the first FFD/SVF level; each further level halves it.
    ffd_levels : int
        Non-linear (FFD or SVF) levels.
    bending_weight : float
        λ of the bending energy (mm² · nats per voxel). At 10, the atlas's FFD folded 10–23 % of the
        voxels on the 3D phantom and on MS-CMRSeg; 1000 kept it unfolded on both (README).
    affine_weight : float
        μ of the affine levels' prior ``Σ log² σ_i(A)`` on the scaling and shear of each affine
        transform (nats per voxel); without it an affine atlas can drift on real images, shrinking
        or stretching until the foreground covers only what its Gaussians explain best.
    em_steps, grad_steps : int
        EM iterations and gradient steps per outer iteration.
    step_mm, step_decay, min_step_mm : float
        Adam's step (about mm of motion per step) in the first outer iteration of a level; it is
        multiplied by ``step_decay`` each outer iteration, down to ``min_step_mm``.
    max_outer : int
        Outer iterations per level at most.
    tol : float
        A level stops when the relative change of log L over an outer iteration falls below it.
    grid_spacing : float
        The registration works on the reference grid resampled to at least this spacing (mm)
        per axis (an image pyramid of two levels); the final EM runs on the full reference grid.
    refine_full_resolution : bool
        Repeat the last level on the full reference grid (slower, more precise).
    """

    atlas: str = "affine"
    images: str = "none"
    template_metric: str = "ncc"
    template_transform: str = "affine"
    template_sequence: Optional[str] = None
    atlas_init: str = "header"
    atlas_search_fov: bool = False
    atlas_search_mm: float = 0.0
    search_em_steps: int = 10
    images_init: str = "mi"
    images_model: Optional[str] = None
    control_spacing: float = 40.0
    ffd_levels: int = 2
    bending_weight: float = 1000.0
    affine_weight: float = 1.0
    em_steps: int = 3
    grad_steps: int = 10
    step_mm: float = 1.0
    step_decay: float = 0.7
    min_step_mm: float = 0.05
    max_outer: int = 15
    tol: float = 1e-4
    grid_spacing: float = 2.5
    refine_full_resolution: bool = True

    def __post_init__(self):
        require_field_choice(self, "atlas", ATLAS_MODELS)
        require_field_choice(self, "images", IMAGE_MODELS)
        require_field_choice(self, "images_init", IMAGE_INITS)
        require_field_choice(self, "atlas_init", ATLAS_INITS)
        require_field_choice(self, "template_metric", TEMPLATE_METRICS)
        require_field_choice(self, "template_transform", TRANSFORM_KINDS)
        if {self.atlas, self.template_transform} <= set(NONLINEAR_KINDS) and self.atlas != self.template_transform:
            raise InputError(f"RegistrationSettings.template_transform: a {self.template_transform} from the template "
                             f"cannot be continued by `RegistrationSettings.atlas`={self.atlas}; use one non-linear kind")
        require_positive(self, ("control_spacing", "grid_spacing", "step_mm", "min_step_mm"))
        require_positive(self, ("bending_weight", "affine_weight", "atlas_search_mm"), strict=False)

    @property
    def active(self) -> bool:
        return self.atlas != "none" or self.images != "none" or self.images_model is not None

    def check_subject(self, subject) -> None:
        """Raise ``InputError`` if what these settings move is not there: no atlas, or no second image."""
        if self.atlas != "none" and subject.atlas is None:
            raise InputError(f"RegistrationSettings.atlas: {self.atlas!r} moves the atlas, but the subject has none "
                             f"(`atlas` none); give an atlas or set `RegistrationSettings.atlas`=none")
        if self.images != "none" and len(subject.names) < 2:
            raise InputError(f"RegistrationSettings.images: {self.images!r} moves the non-reference images, but "
                             f"there is only the reference ({subject.reference!r}); set "
                             f"`RegistrationSettings.images`=none")

    def levels(self) -> List[Level]:
        """The coarse-to-fine schedule: at each level, what the atlas and the moving images optimise."""
        return schedule({"atlas": self.atlas, "images": self.images}, self.control_spacing, self.ffd_levels,
                        self.refine_full_resolution)

    def loop(self) -> OuterLoop:
        return OuterLoop(self.grad_steps, self.max_outer, self.step_mm, self.step_decay, self.min_step_mm, self.tol)


@dataclass
class PairwiseSettings:
    """How a pair is registered.

    Attributes
    ----------
    transform : {"rigid", "affine", "ffd", "svf"}
        The final transform model (``"affine"`` runs rigid first, ``"ffd"`` rigid, affine, FFD;
        ``"svf"`` rigid, affine, a diffeomorphic stationary velocity field).
    metric : {"mi", "ncc", "ssd", "dice"}
        Similarity (see :mod:`mvmm.spatial.similarity`).
    init : {"geometry", "moments", "header"}
        Initial translation: field-of-view centres, intensity centres of mass, or none.
    control_spacing : float
        Control spacing (mm) of the first FFD/SVF level; halved at each further one.
    ffd_levels : int
        Non-linear (FFD or SVF) levels.
    bending_weight : float
        λ of the bending energy (mm⁻² per voxel) against the similarity.
    grid_spacing : float
        The loss is evaluated on the fixed grid resampled so no axis is finer than this (mm).
    full_resolution : bool
        Repeat the last level on the full fixed grid.
    steps, max_outer : int
        Adam steps per outer iteration; outer iterations per level at most.
    step_mm, step_decay, min_step_mm, tol : float
        First step (≈ mm of motion), its decay per outer iteration and floor; a level stops when
        the loss changes by less than ``tol`` (relative) over an outer iteration.
    bins, window : int
        Histogram bins of MI; window (voxels) of local NCC.
    """

    transform: str = "affine"
    metric: str = "mi"
    init: str = "geometry"
    control_spacing: float = 40.0
    ffd_levels: int = 2
    bending_weight: float = 1000.0
    grid_spacing: float = 2.0
    full_resolution: bool = False
    steps: int = 15
    max_outer: int = 10
    step_mm: float = 2.0
    step_decay: float = 0.6
    min_step_mm: float = 0.05
    tol: float = 1e-4
    bins: int = 32
    window: int = 9

    def __post_init__(self):
        require_field_choice(self, "transform", TRANSFORM_KINDS)
        require_field_choice(self, "metric", METRICS)
        require_field_choice(self, "init", INIT_METHODS)
        require_positive(self, ("control_spacing", "grid_spacing", "step_mm", "min_step_mm"))
        require_positive(self, ("bending_weight",), strict=False)
        if self.bins < 4:
            raise InputError(f"PairwiseSettings.bins: expected at least 4, got {self.bins}")

    def loop(self) -> OuterLoop:
        return OuterLoop(self.steps, self.max_outer, self.step_mm, self.step_decay, self.min_step_mm, self.tol)

    def levels(self) -> List[Level]:
        """The coarse-to-fine schedule of ``transform`` (the moving image is ``"moving"``)."""
        return schedule({"moving": self.transform}, self.control_spacing, self.ffd_levels, self.full_resolution)


@dataclass
class GroupwiseSettings:
    """How label maps are brought together.

    Attributes
    ----------
    register : {"none", "rigid", "affine", "ffd", "svf"}
        Final transform model of each map (``"none"``, the default as for ``mvmm atlas build``:
        the average as the frame places the maps).
    frame : {"world", "axes"}
        Space the maps are related in (see the module notes).
    spacing : sequence of float, optional
        Template voxel size (mm, ITK order); default: the median input spacing per axis, at
        least 1.5 mm.
    margin_mm : float
        Template field of view beyond the labelled anatomy of every map.
    rounds : int
        Template updates (each followed by registering every map to it) per level.
    sigma_mm : float
        Gaussian smoothing of the final mean (mm).
    control_spacing : float
        Control spacing (mm) of the first FFD/SVF level.
    ffd_levels : int
        Non-linear (FFD or SVF) levels.
    bending_weight : float
        λ of the bending energy against the mean squared difference of probability maps (SSD),
        a different scale from the pairwise and joint solvers' MI and log L, hence its own value.
        At 1, eight MS-CMRSeg LGE label maps (patients 1–8, axes frame, one 40 mm level) folded
        no voxel (det ∇T 0.15–3.6, template Dice 0.908 / 0.942 / 0.934); at 1000 det ∇T stayed
        within 0.58–1.56 and the template overlap fell (0.884 / 0.921 / 0.917). Each map's FFD
        is checked for folding after the build (a warning, and ``ffd_jacobians`` in the report).
    grid_spacing : float
        Registration works on the template grid coarsened to at least this spacing (mm).
    steps, max_outer : int
        Adam steps per outer iteration and outer iterations per level, per map.
    """

    register: str = "none"
    frame: str = "world"
    spacing: Optional[Sequence[float]] = None
    margin_mm: float = 15.0
    rounds: int = 2
    sigma_mm: float = DEFAULT_SIGMA_MM
    control_spacing: float = 40.0
    ffd_levels: int = 1
    bending_weight: float = PROBABILITY_SSD_BENDING_WEIGHT
    grid_spacing: float = 3.0
    steps: int = 10
    max_outer: int = 3

    def __post_init__(self):
        require_field_choice(self, "register", BUILD_MODELS)
        require_field_choice(self, "frame", FRAMES)
        require_positive(self, ("rounds", "control_spacing", "grid_spacing"))
        require_positive(self, ("sigma_mm", "margin_mm", "bending_weight"), strict=False)
        if self.spacing is not None and any(not s > 0 for s in self.spacing):
            raise InputError(f"GroupwiseSettings.spacing: expected positive values in mm, got {list(self.spacing)}")

    def pairwise(self) -> PairwiseSettings:
        return PairwiseSettings(transform=self.register if self.register != "none" else "rigid", metric="ssd",
                                init="header", control_spacing=self.control_spacing, ffd_levels=self.ffd_levels,
                                bending_weight=self.bending_weight, grid_spacing=self.grid_spacing,
                                steps=self.steps, max_outer=self.max_outer)


CLASSICAL_METHODS = ("atlas", "em-lge", "em-all", "gmm")
# the Bayesian CNN alone, refined, and its posterior averaged with em-all's (mvmm.nets.bayes)
BAYES_METHODS = ("bayes", "bayes-refine", "bayes-ensemble")
VAE_METHODS = ("vae-seg", "vae-seg-refine")  # the network on the anatomical prior, alone and refined (.vae_seg)
NETWORK_METHODS = BAYES_METHODS + VAE_METHODS
EXPERIMENT_METHODS = CLASSICAL_METHODS + NETWORK_METHODS
# the experiment's spatial priors (mvmm.experiments.mscmr); multi-atlas-fit: the atlas patients' labels registered
# to em-all's first fit with the group-wise atlas (FitGuidedSettings)
PRIORS = ("groupwise", "template", "multi-atlas", "multi-atlas-fit")
ATLAS_SET_GUIDES = ("image", "fit")  # what an atlas set is registered to (mvmm segment --atlas-set-guide)
FUSIONS = ("local-ncc", "joint", "vote")  # label fusion of a multi-atlas prior (mvmm.multi_atlas, mvmm.joint_fusion)
# the local NCC weighting of a multi-atlas vote (MultiAtlasSettings, FitGuidedSettings): a Gaussian window of this
# standard deviation (mm) and exp(LNCC / temperature); the fit-guided prior took the image-guided one's values unchanged
LOCAL_NCC_WINDOW_MM = 5.0
LOCAL_NCC_TEMPERATURE = 0.1


@dataclass
class MultiAtlasSettings:
    """How a multi-atlas prior is made (:mod:`mvmm.multi_atlas`, ``mvmm segment --atlas-set``).

    Attributes
    ----------
    transform : {"rigid", "affine", "ffd", "svf"}
        Final transform of each atlas image registered to the case (rigid → affine → non-linear).
    metric : {"ncc", "mi", "ssd"}
        Similarity of the registrations: local NCC for atlases of the case's sequence, MI for others.
    size : int, optional
        Keep the ``size`` atlases most similar to the case after the affine step (global NCC on the
        overlap, the selection of Aljabar et al. 2009) for the non-linear step and the fusion; None
        keeps all.
    fusion : {"local-ncc", "joint", "vote"}
        ``"local-ncc"``: each atlas votes at x with weight ``exp(LNCC_i(x) / temperature)``, LNCC
        the Gaussian-windowed correlation of the case and the registered atlas image around x
        (locally weighted voting, Artaechevarria et al. 2009); ``"joint"``: joint label fusion (Wang et
        al. 2013, :mod:`mvmm.joint_fusion`), weights that also account for atlases erring alike;
        ``"vote"``: equal weights.
    search_voxels : int
        As :class:`FitGuidedSettings` (0 here: not measured for this prior).
    window_mm : float
        Standard deviation (mm) of the Gaussian window of the local NCC (and of joint fusion's).
    temperature : float
        How sharply better-matching atlases win (LNCC is in [−1, 1]).
    sigma_mm : float
        Gaussian smoothing (mm) of the fused probabilities, so that the prior is soft like an atlas.
    control_spacing, ffd_levels, bending_weight, grid_spacing : float or int
        As :class:`PairwiseSettings`.
    workers : int
        Worker processes for the independent registrations (0: one per available core; 1: in this
        process, as on CUDA).
    """

    transform: str = "affine"
    metric: str = "ncc"
    size: Optional[int] = None
    fusion: str = "local-ncc"
    search_voxels: int = 0
    window_mm: float = LOCAL_NCC_WINDOW_MM
    temperature: float = LOCAL_NCC_TEMPERATURE
    sigma_mm: float = 1.0
    control_spacing: float = 40.0
    ffd_levels: int = 2
    bending_weight: float = 1000.0
    grid_spacing: float = 3.0
    workers: int = 0

    def __post_init__(self):
        require_field_choice(self, "transform", TRANSFORM_KINDS)
        require_field_choice(self, "metric", ("ncc", "mi", "ssd"))
        require_field_choice(self, "fusion", FUSIONS)
        require_positive(self, ("window_mm", "temperature", "control_spacing", "grid_spacing", "ffd_levels"))
        require_positive(self, ("sigma_mm", "bending_weight", "workers", "search_voxels"), strict=False)
        if self.size is not None and self.size < 1:
            raise InputError(f"MultiAtlasSettings.size: expected at least 1 (or None for all), got {self.size}")

    def pairwise(self, transform: str) -> PairwiseSettings:
        """Pairwise settings of one atlas registration up to ``transform``."""
        return PairwiseSettings(transform=transform, metric=self.metric, init="header",
                                control_spacing=self.control_spacing, ffd_levels=self.ffd_levels,
                                bending_weight=self.bending_weight, grid_spacing=self.grid_spacing)


PATHOLOGY_RULES = ("sd", "subtype")


@dataclass(frozen=True)
class PathologySettings:
    """How scar and oedema are decided from a fit with named pathology subtypes (:mod:`mvmm.pathology`; ``mvmm
    segment --pathology``).

    Attributes
    ----------
    rule : {"sd", "subtype"}
        ``"sd"``: a myocardial voxel is scar where the LGE is more than ``scar_sd`` standard deviations above the
        fitted normal myocardium's mean, and oedema where the T2 is more than ``oedema_sd`` above its normal level
        (and it is not scar) — the n-SD criterion of cardiac MR practice, with the model's own normal-myocardium
        Gaussian (its darkest named subtype, sharing the tissue's variance) as the remote reference.
        ``"subtype"``: where the pathological subtype is the most probable level of the myocardium (0.7.0–0.27.0).
        The probability maps are the subtypes' posteriors under either rule.
    scar_sd, oedema_sd : float
        The ``"sd"`` rule's thresholds. Defaults chosen on the MS-CMRSeg development fold's patients with T2 (1, 6,
        11, 16) only: docs/mscmr.md, "Pathology by the n-SD criterion".
    """

    rule: str = "sd"
    scar_sd: float = 1.5
    oedema_sd: float = 1.0

    def __post_init__(self):
        require_field_choice(self, "rule", PATHOLOGY_RULES)
        require_positive(self, ("scar_sd", "oedema_sd"), strict=False)
        for name in ("scar_sd", "oedema_sd"):
            value = getattr(self, name)
            if not math.isfinite(value):
                raise InputError(f"PathologySettings.{name}: expected a finite number of standard deviations, "
                                 f"got {value}")

    def threshold_sd(self, pathology: str) -> float:
        """The ``"sd"`` rule's threshold of ``pathology`` (scar or oedema)."""
        return {"scar": self.scar_sd, "oedema": self.oedema_sd}[pathology]


@dataclass
class FitGuidedSettings:
    """How a fit-guided multi-atlas prior is made (:func:`mvmm.multi_atlas.fit_guided_prior`; ``mvmm segment
    --atlas-set DIR --atlas-set-guide fit``; the MS-CMRSeg experiment's ``--prior multi-atlas-fit``).

    A first fit with the probabilistic atlas finds the heart; then every atlas subject's label map (one-hot)
    is registered to that fit's posterior — probability maps on both sides, so the similarity is their mean
    squared difference, which does not care how the subjects' intensities differ (registering the atlas
    *images* to the case by NCC was loose between patients: docs/mscmr.md, 0.5.0) — and the warped labels,
    fused (each weighted where its image, warped by the same map, matches the case: ``fusion``) and smoothed, are
    the prior the model is fitted with again, nothing moving.

    Attributes
    ----------
    transform : {"rigid", "affine", "ffd", "svf"}
        Final transform of each label map (rigid → affine → non-linear).
    control_spacing, ffd_levels, grid_spacing, steps, max_outer : float or int
        As :class:`PairwiseSettings`.
    bending_weight : float
        λ of the bending energy against the SSD of probability maps (:class:`GroupwiseSettings`' scale
        and value).
    fusion : {"local-ncc", "joint", "vote"}
        ``"local-ncc"``: each registered label map votes at x with weight ``exp(LNCC_i(x) / temperature)``,
        LNCC the Gaussian-windowed correlation of the reference image and that atlas's image warped by the
        same map (as :class:`MultiAtlasSettings`); ``"joint"``: joint label fusion's weights from the same
        images (:mod:`mvmm.joint_fusion`). Either is used when every atlas's image is of the reference's
        sequence, else (another data set's label maps) the vote is equal. ``"vote"``: equal weights, the mean.
    search_voxels : int
        Before ``"local-ncc"`` or ``"joint"`` weights: each map's labels at x are taken from the in-plane offset
        within this many voxels whose image best matches the reference's around x (ANTs joint fusion's local
        search, :func:`mvmm.joint_fusion.searched_atlases`); 0: none.
    window_mm, temperature : float
        As :class:`MultiAtlasSettings`.
    sigma_mm : float
        Gaussian smoothing (mm) of the averaged labels, so that the prior is soft like an atlas.
    prior_weight : float
        Where the refit's atlas votes (``prior_votes``), the fused prior's weight w against the model's 1: the
        written posterior on the reference's grid is (p(k | I) + w π_k) / (1 + w) (on the other images' own grids,
        other breath-holds, the prior votes once; :attr:`mvmm.segment.Segmentation.prior_weight`). Above
        1 because this prior has seen the image already (``fusion`` weighs each map by how its image matches the
        case's), so the model's reading of the same intensities would otherwise count twice; a prior fused by an
        equal vote (``"vote"``, or maps of another sequence or data set) has not, and votes with weight 1.
    slice_shift_mm : float
        Before the refit, each slice of every other 3D image is moved in its own plane, by whole voxels within this
        radius (mm), to where the first fit's model and the fused prior say its content lies
        (:func:`mvmm.slice_alignment.align_slices`: a stack's slices are breath-holds of their own, which the headers
        and a global map cannot place); 0: the images keep the first fit's placement.
    workers : int
        Worker processes for the independent registrations (0: one per available core; 1: in this
        process, as on CUDA).

    The defaults were chosen on the MS-CMRSeg development fold (patients 1, 6, 11, 16, 21) only:
    docs/mscmr.md, "A multi-atlas prior from the first fit", "Joint label fusion for the fit-guided prior", "Joint
    fusion with a local search", "The fused prior's vote weighted by 3" and "The other images' slices aligned".
    """

    transform: str = "ffd"
    control_spacing: float = 40.0
    ffd_levels: int = 1
    bending_weight: float = PROBABILITY_SSD_BENDING_WEIGHT
    grid_spacing: float = 3.0
    steps: int = 10
    max_outer: int = 5
    fusion: str = "joint"
    search_voxels: int = 3
    window_mm: float = LOCAL_NCC_WINDOW_MM
    temperature: float = LOCAL_NCC_TEMPERATURE
    sigma_mm: float = 1.0
    prior_weight: float = 3.0
    slice_shift_mm: float = 4.5
    workers: int = 0

    def __post_init__(self):
        require_field_choice(self, "transform", TRANSFORM_KINDS)
        require_field_choice(self, "fusion", FUSIONS)
        require_positive(self, ("window_mm", "temperature"))
        require_positive(self, ("control_spacing", "grid_spacing", "ffd_levels", "steps", "max_outer"))
        require_positive(self, ("sigma_mm", "bending_weight", "workers", "search_voxels", "prior_weight",
                                "slice_shift_mm"), strict=False)
        if not math.isfinite(self.prior_weight):  # the prior alone has no model to weigh against
            raise InputError(f"FitGuidedSettings.prior_weight: expected a finite weight, got {self.prior_weight}")

    def pairwise(self) -> PairwiseSettings:
        """Pairwise settings of one label map's registration to the fit."""
        return PairwiseSettings(transform=self.transform, metric="ssd", init="header",
                                control_spacing=self.control_spacing, ffd_levels=self.ffd_levels,
                                bending_weight=self.bending_weight, grid_spacing=self.grid_spacing,
                                steps=self.steps, max_outer=self.max_outer)


@dataclass
class ExperimentSettings:
    """What the experiment does; a rerun resumes only with the same settings.

    Attributes
    ----------
    sequences : list of str
        Sequences of the target used by ``em-all`` and ``gmm`` (LGE is always among them, first).
    methods : list of str
        Which of ``atlas``, ``em-lge``, ``em-all``, ``gmm``, ``bayes``, ``bayes-refine``, ``bayes-ensemble``,
        ``vae-seg``, ``vae-seg-refine`` to run and report (``atlas`` and ``em-all`` always run: one is the other's
        registered prior). The network methods need ``folds`` or ``model``; the ``-refine`` ones
        continue from the network's placement with ``em-all``'s registration levels and EM;
        ``bayes-ensemble`` averages ``bayes``'s and ``em-all``'s posteriors (each weighted by its voters:
        with ``prior_votes``, em-all's model, its atlas and the network a third each).
    folds : int, optional
        Cross-validation over the given patients (patient i of the sorted list is in fold i mod
        ``folds``): for each fold the atlas is built from the other folds' labels and the networks are
        trained on their images (no label), and every method of a target of the fold uses that atlas.
        The ``vae-seg`` network sits on ``vae_prior``, or on a prior trained on the fold's LGE labels.
        None: leave-one-out atlases (as before).
    model : str, optional
        A trained model directory for the network methods of its kind (trained on other patients):
        a ``bayes`` model for ``bayes*``, a ``vae-seg`` model for ``vae-seg*``.
    epochs : int
        Training epochs of each fold's network (the rest of :class:`TrainingSettings` as default).
    vae_prior : str, optional
        ``folds``: an anatomical-prior model (``mvmm train prior``, e.g. on another data set's labels)
        under every fold's ``vae-seg`` network; None trains one per fold on its training patients'
        LGE labels (``prior_epochs``).
    prior_epochs : int
        ``folds`` without ``vae_prior``: training epochs of each fold's anatomical prior.
    network_labels : bool
        Train each fold's Bayesian CNN with its training patients' LGE label maps too (semi-supervised:
        the labels its atlas is built from; ``BayesNetSettings.label_weight``); False: on their
        images alone, as Dalca et al.
    prior : {"multi-atlas-fit", "groupwise", "template", "multi-atlas"}
        The spatial prior of each target, made only from the atlas patients: ``"groupwise"``, their
        group-wise atlas placed by the target's axes (then the start search); ``"template"``, the
        same atlas placed by registering its LGE intensity template to the target's LGE
        (``RegistrationSettings.template_*``); ``"multi-atlas"``, their LGE images registered to the
        target's LGE and their labels fused (:mod:`mvmm.multi_atlas`); ``"multi-atlas-fit"`` (the
        default since 0.19.0, the most accurate measured: docs/mscmr.md), ``"groupwise"``'s fit, then
        their LGE label maps registered to its posterior, averaged, and the fit repeated on them
        (:func:`mvmm.multi_atlas.fit_guided_prior`; about 4.5 times ``"groupwise"``'s time).
    template_sequence : str
        ``"template"``: the sequence whose template (and image of the target) places the atlas.
    template_transform : {"rigid", "affine", "ffd", "svf"}
        ``"template"``: the final transform of that registration (:class:`RegistrationSettings`).
    atlas_set_size : int, optional
        ``"multi-atlas"``: keep this many most similar atlases (None: all).
    atlas_register : {"none", "rigid", "affine", "ffd", "svf"}
        Group-wise registration when building each atlas. ``"ffd"`` (the default since 0.14.0): rigid,
        affine, then one FFD level — a sharper atlas, which keeps its affine mean as the coarse stage
        the joint solver places first (:attr:`mvmm.data.atlas.Atlas.coarse`); MS-CMRSeg 5-fold, 20
        held-out patients: em-all 0.749 / 0.877 / 0.798 (affine) → 0.757 / 0.882 / 0.813 (docs/mscmr.md).
    register_atlas : {"none", "rigid", "affine", "ffd", "svf"}
        Registration of the atlas to the target inside the joint model.
    register_images : {"none", "rigid", "affine"}
        Registration of the other sequences to the LGE inside the joint model.
    atlas_search_fov : bool
        Find the heart in the target's whole field of view by the atlas's LGE template first
        (see :class:`mvmm.joint.RegistrationSettings`).
    atlas_search_mm : float
        Search of the atlas start (see :class:`mvmm.joint.RegistrationSettings`); 0 for none.
    affine_weight : float
        Weight of the prior on the atlas's affine scaling and shear (``mvmm segment --affine-weight``).
    roi_margin_mm : float or None
        ``em-all`` and ``em-lge`` fit only within this many mm of the moved atlas's foreground
        (:mod:`mvmm.data.roi`); None fits the whole field of view.
    subtypes : list of str
        Gaussian subtypes of ``em-all`` and ``em-lge`` (``IMAGE:TISSUE=N``, as ``mvmm segment
        --subtypes``); by default the LGE myocardium has two, normal and enhanced (scar), the
        model of docs/model.md.
    proportions : {"atlas", "learned"}
        Global tissue proportions of ``em-all`` and ``em-lge``: held equal, so that the prior is
        the registered atlas (``mvmm segment --proportions atlas``), or estimated.
    pathology : bool
        ``em-all`` and ``em-lge`` with the named pathology subtypes (``LGE:Myo=normal,scar``,
        ``T2:Myo=normal,oedema``, for the sequences used; :mod:`mvmm.pathology`) instead of
        ``subtypes``' LGE items; with T2 among the sequences, em-all's scar and oedema on the T2 grid
        are evaluated against the patient's MyoPS pathology labels (``patientN_T2_pathology``).
    pathology_rule, scar_sd, oedema_sd
        With ``pathology``: how scar and oedema are decided (:class:`PathologySettings`' fields, the same defaults).
    mrf_beta : float
        Weight of the Potts MRF on the posteriors of ``em-all`` and ``em-lge`` (``mvmm segment
        --mrf-beta``); 0 for none.
    postprocess : {"cardiac", "none"}
        Clean-up of the label maps of ``em-all`` and ``em-lge`` (:mod:`mvmm.postprocess`): MS-CMRSeg's
        labels count papillary muscles and trabeculae as LV blood pool. ``atlas`` and ``gmm`` stay raw.
    prior_votes : bool
        ``em-all``'s and ``em-lge``'s posterior is the mean of the model's and the registered atlas's
        (:attr:`mvmm.segment.Segmentation.prior_votes`; in ``bayes-ensemble`` the atlas is the third voter).
    bias_correction : {"none", "n4"}
        Intensity non-uniformity correction of the target's images before ``em-all`` and ``em-lge``
        (:mod:`mvmm.data.bias`); the networks see the images as read, as in their training.
    device : str
    seed : int
    """

    sequences: List[str] = field(default_factory=lambda: ["LGE", "C0"])
    methods: List[str] = field(default_factory=lambda: list(CLASSICAL_METHODS))
    folds: Optional[int] = None
    model: Optional[str] = None
    epochs: int = 100
    vae_prior: Optional[str] = None
    prior_epochs: int = 100
    network_labels: bool = False
    prior: str = "multi-atlas-fit"
    template_sequence: str = "LGE"
    template_transform: str = "affine"
    atlas_set_size: Optional[int] = None
    atlas_register: str = "ffd"
    register_atlas: str = "affine"
    register_images: str = "none"
    atlas_search_fov: bool = CARDIAC_PRESET["atlas_search_fov"]
    atlas_search_mm: float = CARDIAC_PRESET["atlas_search_mm"]
    affine_weight: float = CARDIAC_PRESET["affine_weight"]
    roi_margin_mm: Optional[float] = CARDIAC_PRESET["roi_margin_mm"]
    subtypes: List[str] = field(default_factory=lambda: list(CARDIAC_PRESET["subtypes"]))
    proportions: str = CARDIAC_PRESET["proportions"]
    pathology: bool = False
    pathology_rule: str = PathologySettings.rule
    scar_sd: float = PathologySettings.scar_sd
    oedema_sd: float = PathologySettings.oedema_sd
    mrf_beta: float = 0.0
    postprocess: str = CARDIAC_PRESET["postprocess"]
    prior_votes: bool = CARDIAC_PRESET["prior_votes"]
    # not in the preset: on MS-CMRSeg N4 helped LGE + C0 a little and cost LGE + C0 + T2 (docs/mscmr.md)
    bias_correction: str = SEGMENTATION.bias_correction
    device: str = "auto"
    seed: int = 0

    def __post_init__(self):
        require_field_choice(self, "proportions", ("atlas", "learned"))
        require_field_choice(self, "bias_correction", BIAS_CORRECTIONS)
        require_field_choice(self, "prior", PRIORS)
        require_field_choice(self, "template_transform", TRANSFORM_KINDS)
        unknown = [m for m in self.methods if m not in EXPERIMENT_METHODS]
        if unknown:
            raise InputError(f"ExperimentSettings.methods: unknown {unknown}; choose from {', '.join(EXPERIMENT_METHODS)}")
        self.methods = [m for m in EXPERIMENT_METHODS if m in set(self.methods) | {"atlas", "em-all"}]
        if self.folds is not None and self.folds < 2:
            raise InputError(f"ExperimentSettings.folds: expected at least 2, got {self.folds}")
        if self.folds is not None and self.model is not None:
            raise InputError("ExperimentSettings.folds: give `folds` (train a network per fold) or `model`, not both")
        networks = [m for m in self.methods if m in NETWORK_METHODS]
        if networks and self.folds is None and self.model is None:
            raise InputError(f"ExperimentSettings.methods: {', '.join(networks)} need `folds` (networks "
                             f"trained per fold) or `model` (a trained model directory)")
        require_positive(self, ("epochs", "prior_epochs"))
        if self.vae_prior is not None and not (set(VAE_METHODS) & set(self.methods) and self.folds is not None):
            raise InputError(f"ExperimentSettings.vae_prior: the prior of each fold's vae-seg network; give it "
                             f"with `folds` and a method of {', '.join(VAE_METHODS)}")
        if self.atlas_set_size is not None and self.atlas_set_size < 1:
            raise InputError(f"ExperimentSettings.atlas_set_size: expected at least 1, got {self.atlas_set_size}")
        require_field_choice(self, "postprocess", POSTPROCESSING)
        self.pathology_settings()  # checked now
        require_positive(self, ("affine_weight", "atlas_search_mm", "mrf_beta"), strict=False)

    def pathology_settings(self) -> PathologySettings:
        """How ``pathology`` decides scar and oedema (:class:`PathologySettings` of the fields so named)."""
        return PathologySettings(rule=self.pathology_rule, scar_sd=self.scar_sd, oedema_sd=self.oedema_sd)


# ---------------------------------------------------------------- networks (mvmm.nets)
NETWORK_GRID_3D = ((72, 72, 16), (2.0, 2.0, 5.0))  # ITK order (in-plane, in-plane, stack): 144 x 144 x 80 mm
NETWORK_GRID_2D = ((72, 72), (2.0, 2.0))


@dataclass
class NetworkSettings:
    """The network grid and the U-Net + velocity field every mvmm network shares (:mod:`mvmm.nets.velocity`).

    Attributes
    ----------
    grid_size, grid_spacing : sequence, optional
        The network grid, ITK order, in the heart's frame of each case's reference (or fixed) image
        (:func:`mvmm.data.anatomy.short_axis_frame`), centred on its field of view; None: 72 x 72 x
        16 voxels of 2 x 2 x 5 mm (3D) or 72 x 72 of 2 x 2 mm (2D). Every size must be divisible by
        ``2 ** (len(channels) - 1)``.
    channels : sequence of int
        Features per level of the MONAI U-Net backbone (``monai.networks.nets.UNet``).
    features : int
        Channels of the backbone's output, which the heads read.
    control_spacing : float
        Control-point spacing (mm) of the stationary velocity field (a cubic B-spline, as the
        classical SVF; :class:`mvmm.spatial.nonlinear.StationaryVelocityField`).
    squarings : int
        Scaling-and-squaring steps of ``exp(v)``.
    """

    grid_size: Optional[Sequence[int]] = None
    grid_spacing: Optional[Sequence[float]] = None
    channels: Sequence[int] = (16, 32, 64, 64)
    features: int = 16
    control_spacing: float = 10.0
    squarings: int = 6

    def __post_init__(self):
        require_positive(self, ("features", "control_spacing", "squarings"))
        if len(self.channels) < 2 or any(int(c) < 1 for c in self.channels):
            raise InputError(f"{type(self).__name__}.channels: expected at least two positive counts, "
                             f"got {list(self.channels)}")
        self.channels = [int(c) for c in self.channels]

    def resolved(self, ndim: int):
        """These settings with the network grid filled in for ``ndim``-dimensional images, checked."""
        size, spacing = NETWORK_GRID_3D if ndim == 3 else NETWORK_GRID_2D
        size = [int(s) for s in (self.grid_size or size)]
        spacing = [float(s) for s in (self.grid_spacing or spacing)]
        name = f"{type(self).__name__}.grid_size"
        if len(size) != ndim or len(spacing) != ndim:
            raise InputError(f"{name}: {ndim}D images need {ndim} sizes and spacings, got {size} and {spacing}")
        factor = 2 ** (len(self.channels) - 1)
        if any(s % factor for s in size) or any(not s > 0 for s in spacing):
            raise InputError(f"{name}: every size must be a multiple of {factor} (the U-Net halves it "
                             f"{len(self.channels) - 1} times) and every spacing > 0, got {size}, {spacing}")
        return replace(self, grid_size=size, grid_spacing=spacing)


@dataclass
class BayesNetSettings(NetworkSettings):
    """The Bayesian segmentation CNN (:mod:`mvmm.nets.bayes`) and its data conventions; a model
    directory's ``config.json`` holds them, so a trained model is fully described by it. The grid
    and backbone fields are :class:`NetworkSettings`'.

    Attributes
    ----------
    roi_margin_mm : float
        The likelihood counts within this many mm of the atlas foreground (of the placed atlas in
        training, of the warped one when segmenting), as ``mvmm segment --roi-margin``.
    subtypes : list of str
        ``IMAGE:TISSUE=N`` subtype counts the appearance head predicts, as ``mvmm segment --subtypes``.
    background_subtypes : int
    proportions : {"atlas", "learned"}
        ``"atlas"``: the tissue proportions π are held equal, so that the prior is the warped atlas
        itself (as the experiment's ``--proportions atlas``); ``"learned"``: the head predicts them.
        Learned, on MS-CMRSeg the likelihood drove the background's share to 0.01 and the myocardium
        and RV grew into it (docs/mscmr.md, "Networks").
    label_weight : float
        Weight of the cross-entropy of the model's posterior on the voxels of labelled training cases
        (semi-supervised, as VoxelMorph's auxiliary segmentation loss); without labelled cases the
        training is Dalca et al.'s, unsupervised, and this weight is unused.
    """

    roi_margin_mm: float = 10.0
    subtypes: List[str] = field(default_factory=list)
    background_subtypes: int = BACKGROUND_SUBTYPES
    proportions: str = "atlas"
    label_weight: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        require_field_choice(self, "proportions", ("atlas", "learned"))
        require_positive(self, ("background_subtypes",))
        require_positive(self, ("roi_margin_mm", "label_weight"), strict=False)
        self.subtypes = list(self.subtypes)


ACWE_VARIANCES = ("equal", "fitted")
ACWE_GRID_3D = ((72, 72, 24), (2.0, 2.0, 5.0))  # 144 x 144 x 120 mm


@dataclass
class AcweNetSettings(NetworkSettings):
    """The Chan–Vese CNN (:mod:`mvmm.nets.acwe`): images (and the placed atlas) → soft segmentation,
    trained by the active-contour-without-edges energy. Grid and backbone fields are
    :class:`NetworkSettings`' (``features``, ``control_spacing`` and ``squarings`` are not used).

    The default 3D grid is 72 x 72 x 24 voxels of 2 x 2 x 5 mm (144 x 144 x 120 mm): the whole stack.

    Attributes
    ----------
    classes : int, optional
        K, the phases of the (multiphase) Chan–Vese model; None: the atlas's (or the labels') classes,
        else 2.
    length_weight : float
        ν, mm: weight of the mean boundary length per voxel (the total variation of the soft
        segmentation, in mm⁻¹) against the mean region energy per voxel. 0.01 was chosen on the
        development fold of MS-CMRSeg (docs/nets.md): at 0.1 training fell into the uniform map within
        an atlas's region and lost the thin myocardium with four classes.
    variances : {"equal", "fitted"}
        ``"equal"``: every class of an image has σ² = ½ in normalised units, so the region term is
        Chan–Vese's ``Σ_k Σ_x P_kx Σ_i (I_i(x) − c_ik)²``; ``"fitted"``: each class's soft variance
        (the Gaussian-mixture generalisation, region competition).
    label_weight : float
        Weight of the cross-entropy on the voxels of labelled training cases (semi-supervised).
    roi_margin_mm : float
        With an atlas: the energy counts within this many mm of the placed atlas's foreground
        (without one, wherever an image covers the network grid).
    """

    classes: Optional[int] = None
    length_weight: float = 0.01
    variances: str = "equal"
    label_weight: float = 1.0
    roi_margin_mm: float = 10.0

    def __post_init__(self):
        super().__post_init__()
        require_field_choice(self, "variances", ACWE_VARIANCES)
        require_positive(self, ("length_weight", "label_weight", "roi_margin_mm"), strict=False)
        if self.classes is not None and int(self.classes) < 2:
            raise InputError(f"AcweNetSettings.classes: expected at least 2, got {self.classes}")

    def resolved(self, ndim: int):
        """As :meth:`NetworkSettings.resolved`; in 3D the default grid has 24 slices (120 mm), not 16: the
        network's map is the segmentation, so the grid must hold a whole stack (a cine's 8–13 mm slices)."""
        if ndim == 3 and self.grid_size is None:
            return replace(self, grid_size=ACWE_GRID_3D[0], grid_spacing=self.grid_spacing or ACWE_GRID_3D[1]).resolved(3)
        return super().resolved(ndim)


@dataclass
class PriorVaeSettings(NetworkSettings):
    """The anatomical-prior VAE (:mod:`mvmm.nets.prior`) trained on label maps. Grid fields are
    :class:`NetworkSettings`' (the grid is centred on each map's foreground; ``features``,
    ``control_spacing`` and ``squarings`` are not used); ``channels`` are the VAE's levels, each a
    stride-2 convolution, so every grid size must be a multiple of ``2 ** len(channels)``.

    Attributes
    ----------
    latent : int
        Dimensions of the latent code z.
    """

    channels: Sequence[int] = (16, 32, 64)
    latent: int = 32

    def __post_init__(self):
        super().__post_init__()
        require_positive(self, ("latent",))

    def resolved(self, ndim: int):
        resolved = super().resolved(ndim)
        factor = 2 ** len(self.channels)
        if any(s % factor for s in resolved.grid_size):
            raise InputError(f"{type(self).__name__}.grid_size: every size must be a multiple of {factor} (the VAE "
                             f"halves it {len(self.channels)} times), got {resolved.grid_size}")
        return resolved


@dataclass
class VaeSegSettings(NetworkSettings):
    """The segmentation network on the anatomical prior (:mod:`mvmm.nets.vae_seg`): an image encoder
    predicts the prior's latent code; the frozen decoder gives π_kx; θ follows by EM steps under it.
    The grid is the prior's (filled in from the prior model); ``channels`` are the encoder's levels.

    Attributes
    ----------
    subtypes : list of str
        ``IMAGE:TISSUE=N`` subtype counts, as ``mvmm segment --subtypes``.
    background_subtypes : int
    em_steps : int
        EM iterations of the appearance under the decoded prior, from its prior-weighted moments
        (differentiable: the functional core's E- and M-step).
    kl_weight : float
        Weight of ``KL(q(z | I) ‖ N(0, I))`` per voxel of the region beside the mean negative
        log-likelihood per voxel (1: the ELBO).
    roi_margin_mm : float
        The likelihood counts within this many mm of the foreground of the prior's mean shape
        (decoded at z = 0): a fixed region, so that z cannot redraw where it is scored.
    """

    channels: Sequence[int] = (16, 32, 64)
    subtypes: List[str] = field(default_factory=list)
    background_subtypes: int = BACKGROUND_SUBTYPES
    em_steps: int = 3
    kl_weight: float = 1.0
    roi_margin_mm: float = 20.0

    def __post_init__(self):
        super().__post_init__()
        require_positive(self, ("background_subtypes", "em_steps"))
        require_positive(self, ("kl_weight", "roi_margin_mm"), strict=False)
        self.subtypes = list(self.subtypes)


REGNET_METRICS = ("ncc", "mi")


@dataclass
class RegNetSettings(NetworkSettings):
    """The VoxelMorph-style registration network (:mod:`mvmm.nets.regnet`): fixed + moving → SVF.
    The grid (in the fixed image's heart frame) and backbone fields are :class:`NetworkSettings`'.

    Attributes
    ----------
    metric : {"ncc", "mi"}
        Similarity of the fixed image and the warped moving one (:mod:`mvmm.spatial.similarity`):
        local NCC for similar contrasts, mutual information across sequences.
    """

    metric: str = "mi"

    def __post_init__(self):
        super().__post_init__()
        require_field_choice(self, "metric", REGNET_METRICS)


@dataclass
class TrainingSettings:
    """How a network is trained (:mod:`mvmm.nets.train`, ``mvmm train``).

    Attributes
    ----------
    epochs : int
        Passes over the training subjects (a resumed run continues up to this count).
    batch_size : int
    lr : float
        Adam's learning rate (the first epoch's, under a schedule).
    lr_schedule : {"constant", "cosine"}
        ``"cosine"``: epoch e of E trains at ``lr · (1 + cos(π (e − 1) / E)) / 2``, from ``lr`` down
        towards 0 (Loshchilov & Hutter's annealing without restarts), so that the last epochs settle
        instead of jumping with batch-to-batch noise; a function of the epoch alone, so a resumed run
        continues it exactly.
    smoothness : float
        λ of the velocity regulariser ``λ · mean ‖∇v‖²`` (v in mm, so ∇v has no unit), beside
        the mean negative log-likelihood per voxel.
    augment : bool
        Random intensity scaling and shift per image, and a small random rigid-plus-scale motion of
        the images (not of the atlas) in the stack's plane: what a registration network must undo.
    rotation_deg, shift_mm, scale : float
        Ranges of that motion: ±rotation about the stack axis, ±shift per axis, ±relative scaling.
    seed : int
        Seeds the weights, the batch order and the augmentation (same seed, same weights on CPU).
    """

    epochs: int = 100
    batch_size: int = 2
    lr: float = 1e-3
    lr_schedule: str = "constant"
    smoothness: float = 1.0
    augment: bool = True
    rotation_deg: float = 10.0
    shift_mm: float = 8.0
    scale: float = 0.05
    seed: int = 0

    def __post_init__(self):
        require_positive(self, ("epochs", "batch_size", "lr"))
        require_positive(self, ("smoothness", "rotation_deg", "shift_mm", "scale", "seed"), strict=False)
        require_field_choice(self, "lr_schedule", LR_SCHEDULES)
