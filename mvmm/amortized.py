"""Segmenting with a trained network (``mvmm segment --model``): :func:`segment_with_model` reads the
model directory and runs its kind — the Bayesian CNN (an atlas warp and θ), the Chan–Vese CNN (the
segmentation itself, :func:`segment_with_acwe`) or the prior-VAE network (a decoded prior and θ,
:func:`segment_with_vae`) — optionally refined by EM or by the joint solver.

The Chan–Vese and prior-VAE maps live on the case's network grid, which is placed in the world
(:func:`mvmm.nets.data.network_grid`); it becomes an :class:`~mvmm.data.atlas.Atlas` in world
coordinates, so that the classical machinery samples it on the reference grid and on every image's
own grid, and writes the usual outputs. θ is the mixture's M-step under the map (image units). Without
refinement the map is the posterior itself; ``refine`` > 0 runs that many EM iterations with the map,
floored (``REFINE_PRIOR_FLOOR``), as the spatial prior — the network's answer as an atlas for EM.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import replace
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from mvmm.core.devices import resolve_device
from mvmm.core.errors import InputError
from mvmm.core.settings import CARDIAC_PRESET, SEGMENTATION, RegistrationSettings
from mvmm.data.atlas import Atlas
from mvmm.data.atlas_set import AtlasEntry
from mvmm.data.image import Image
from mvmm.data.subject import Subject
from mvmm.data.template_search import fov_atlas_start
from mvmm.joint import JointSolver, RegistrationResult
from mvmm.multi_atlas import FitGuidedSettings
from mvmm.mixture.model import ConvergenceWarning, MultivariateMixture
from mvmm.postprocess import check_postprocess
from mvmm.segment import Segmentation, check_posterior_shift, segment_subject, vote_weighted_mean

REFINE_PRIOR_FLOOR = 0.05  # (1 − ε) P + ε / K: a network's saturated map would otherwise forbid EM to move


def ordered_images(images: Sequence[Image], config, path) -> list:
    """The case's images in the model's input order (names matched case-insensitively), renamed as the model's."""
    by_name = {im.name.lower(): im for im in images}
    missing = [n for n in config.images if n.lower() not in by_name]
    if missing or len(images) != len(config.images):
        raise InputError(f"images: the model {path} reads {', '.join(config.images)}; got "
                         f"{', '.join(im.name for im in images)} (name the images with `names`)")
    return [replace(by_name[n.lower()], name=n) for n in config.images]


def network_start(subject: Subject, config, device) -> Tuple[Optional[object], Optional[dict]]:
    """Where the atlas starts on a scan much wider than the network grid (an uncropped scan), found as
    the cardiac preset finds it: the atlas's intensity template matched over the field of view
    (:func:`mvmm.data.template_search.fov_atlas_start`), then the best of its neighbours
    ±``RegistrationSettings.atlas_search_mm`` by the log-likelihood of a fresh fit
    (:meth:`mvmm.joint.JointSolver.searched_atlas_start`), which repairs a template that matched a few
    centimetres off. The network grid is then centred with the atlas (:func:`mvmm.nets.data.prepare_case`).

    Parameters
    ----------
    subject : Subject
        The case with the model's atlas (placed for its reference).
    config : mvmm.nets.model_dir.ModelConfig
    device : torch.device

    Returns
    -------
    (RigidTransform or None, dict or None)
        The start (common space → atlas) and the search's record (``report.json``
        ``registration.fov_search``); (None, None) for a scan about the grid's size (a crop: placed
        as in training), without an atlas, or when the atlas has no template to search with.
    """
    from mvmm.nets.data import atlas_placement, content_shift, network_grid

    reference = subject.reference_image.grid
    if subject.atlas is None or not reference.much_wider_than(network_grid(reference, config.network)):
        return None, None
    if subject.atlas.template_for(subject.names, subject.reference) is None:
        return None, None  # prepare_case warns
    settings = RegistrationSettings(atlas_search_mm=CARDIAC_PRESET["atlas_search_mm"])
    placement = atlas_placement(subject)
    found, record = fov_atlas_start(subject, placement)
    if record is None:
        return None, None
    if settings.atlas_search_mm > 0:
        # the likelihood's search on the part of the scan the network will see, at registration resolution
        near = network_grid(reference, config.network, reference.center_world() + content_shift(placement, found,
                                                                                                 subject.atlas.grid))
        model = MultivariateMixture(n_subtypes=config.n_subtypes, n_classes=len(subject.class_labels),
                                    learn_proportions=config.network.proportions == "learned")
        work = replace(subject, transforms={**subject.transforms, "atlas": found})
        found = JointSolver(model, settings, device).searched_atlas_start(work, found,
                                                                          near.coarsened(settings.grid_spacing))
    record = {**record, "start_shift_mm": content_shift(placement, found, subject.atlas.grid).tolist()}
    found.requires_grad_(False)
    return found, record


def loaded_model(model, device: str, kind: Optional[str] = None):
    """``(LoadedModel on the device, torch device)`` from a model directory or a loaded model; ``kind``:
    the kind it must be."""
    from mvmm.nets.model_dir import LoadedModel, load_model

    torch_device = resolve_device(device)
    if not isinstance(model, LoadedModel):
        model = load_model(model, torch_device)
    model.net.to(torch_device)
    if kind is not None:
        model.config.require(kind, model.path)
    return model, torch_device


def fitted_posterior(mixture: MultivariateMixture, common, params, refine: int,
                     progress: bool = False) -> torch.Tensor:
    """``refine`` EM iterations from a network's θ on the case's common-grid sample, or (0) θ adopted as it
    is (scored and its posterior taken from one E-step); the posterior ``[K, *S]`` on the common grid."""
    images, coverage, prior, spacing = common.images, common.coverage, common.prior, common.grid.spacing
    if not refine:
        return mixture.adopt_predict_proba(params, images, coverage, prior, spacing)
    with warnings.catch_warnings():  # a few iterations from a good start: not converging is expected
        warnings.simplefilter("ignore", ConvergenceWarning)
        mixture.fit(images, coverage, prior, spacing, init_params=params, max_iter=refine, progress=progress)
    return mixture.predict_proba(images, coverage, prior, spacing)


def segment_with_model(images: Sequence[Image], model, refine: int = 0, mrf_beta: float = SEGMENTATION.mrf_beta,
                       learn_proportions: Optional[bool] = None, postprocess: str = SEGMENTATION.postprocess,
                       device: str = "auto", progress: bool = False,
                       registration: Optional[RegistrationSettings] = None,
                       roi_margin_mm: Optional[float] = None, samples: int = 0,
                       prior_votes: bool = SEGMENTATION.prior_votes, atlas_set: Sequence[AtlasEntry] = (),
                       fit_guided: Optional[FitGuidedSettings] = None) -> Segmentation:
    """Segment a case by a trained network (``mvmm segment --model``), optionally refined by EM.

    The network predicts the atlas's velocity field and θ in one forward pass on the case's network
    grid (:mod:`mvmm.nets`); the atlas, moved by its placement then ``exp(v)`` (a transform of the
    common space like the classical path's), gives the prior on the reference grid, and θ — turned
    back into each image's units — the posteriors there. ``refine`` > 0 runs that many EM iterations
    from θ with the warp fixed (and the MRF, if ``mrf_beta`` > 0); 0 is the network alone.

    Parameters
    ----------
    images : sequence of Image
        The case, named as the model's images (any order; matched case-insensitively).
    model : LoadedModel or path
        A model directory (:func:`mvmm.nets.model_dir.load_model`).
    refine, mrf_beta : int, float
        EM iterations after the prediction, and their Potts weight.
    learn_proportions : bool, optional
        Whether those iterations update π (False keeps the network's); default: as the model was
        trained (``BayesNetSettings.proportions``).
    postprocess : {"none", "cardiac"}
    registration : RegistrationSettings, optional
        Instead of EM with the warp fixed, the joint solver (EM ⇄ registration, :mod:`mvmm.joint`)
        from the network's warp: the velocity field is held and the levels of ``registration.atlas``
        refine the linear map after it; then EM to convergence (``refine`` is not used). θ starts
        from the warped atlas, as in ``segment``.
    roi_margin_mm : float, optional
        The region of interest (default: the model's ``roi_margin_mm``).
    samples : int
        A ``vae-seg`` model: latent samples for the uncertainty maps (:func:`mvmm.amortized.segment_with_vae`).
    prior_votes : bool
        A ``bayes`` model with ``registration``: the registered atlas votes beside the refined model, as
        in :func:`mvmm.segment.segment_subject` (the network alone and EM with the warp fixed write the
        model's posterior; a ``vae-seg`` model's decoded prior does not vote).
    atlas_set, fit_guided
        A ``bayes`` model with ``registration``: labelled images of other subjects whose label maps are
        registered to the refined fit's posterior and averaged, and the fit repeated on them, as
        :func:`mvmm.segment.segment_subject`'s (the MS-CMRSeg experiment's ``bayes-refine`` with its
        default prior). A ``vae-seg`` model: the same after its registration, or without one on its own
        answer's posterior (:func:`segment_with_vae`).

    An ``acwe`` model is run by :func:`segment_with_acwe` (its map is the answer), a ``vae-seg`` model by
    :func:`segment_with_vae` (its decoded prior replaces the atlas).
    """
    from mvmm.nets.data import prepare_case, stack_cases
    from mvmm.spatial.transforms import SequentialTransform

    start = time.perf_counter()
    model, torch_device = loaded_model(model, device)
    config, net = model.config, model.net
    if samples and config.kind != "vae-seg":
        raise InputError(f"samples: only a vae-seg model draws samples; {model.path} is a {config.kind!r} model")
    if atlas_set and (config.kind not in ("bayes", "vae-seg") or (config.kind == "bayes" and registration is None)):
        raise InputError(f"atlas_set: the atlas set follows a bayes model's refinement by registration "
                         f"(`registration`) or a vae-seg model's answer; {model.path} is a {config.kind!r} model"
                         + ("" if config.kind != "bayes" else " and no registration was asked for"))
    if prior_votes and (config.kind != "bayes" or registration is None):
        raise InputError(f"prior_votes: the atlas votes in a bayes model's refinement by registration "
                         f"(`registration`); {model.path} is a {config.kind!r} model"
                         + ("" if config.kind != "bayes" else " and no registration was asked for"))
    if config.kind == "acwe":  # the network's answer is a map, not a warp (mvmm.amortized)
        if registration is not None:
            raise InputError(f"register_atlas: the Chan–Vese model {model.path} predicts the segmentation, not an "
                             f"atlas warp to refine; use `refine` (EM with its map as the prior)")
        return segment_with_acwe(images, model, refine=refine, mrf_beta=mrf_beta, postprocess=postprocess,
                                 device=device, progress=progress)
    if config.kind == "vae-seg":  # the atlas is replaced by the decoded prior (mvmm.amortized)
        return segment_with_vae(images, model, refine=refine, samples=samples, mrf_beta=mrf_beta,
                                postprocess=postprocess, device=device, progress=progress,
                                registration=registration, roi_margin_mm=roi_margin_mm, atlas_set=atlas_set,
                                fit_guided=fit_guided)

    config.require("bayes", model.path)
    ordered = ordered_images(images, config, model.path)
    atlas = model.atlas.placed_for(ordered[0].grid)
    margin = config.network.roi_margin_mm if roi_margin_mm is None else roi_margin_mm
    subject = Subject(ordered, atlas=atlas, roi_margin_mm=margin)
    check_postprocess(postprocess, subject.class_labels)
    opened = time.perf_counter()
    atlas_start, search = network_start(subject, config, torch_device)  # (None, None) for a crop
    started = time.perf_counter()
    case = prepare_case(subject, config.network, torch_device, start=atlas_start, fov_search=search)
    loaded = time.perf_counter()
    with torch.no_grad():
        batch = {k: v.to(torch_device) for k, v in stack_cases([case]).items()}
        prediction = net(batch)
        # exp(v) was integrated on the canonical grid for the prior the θ head saw: reused, rotated
        svf = net.world_svf(prediction.velocity[0], case.grid, prediction.svf.displacement_field()[0])
        warp = SequentialTransform(svf, case.placement)
        params = _in_image_units(prediction.params, case.offsets.to(torch_device), case.scales.to(torch_device))
    if learn_proportions is None:
        learn_proportions = config.network.proportions == "learned"
    predicted = time.perf_counter()
    if registration is not None:
        result = segment_subject(subject, subtypes=config.network.subtypes,
                                 background_subtypes=config.network.background_subtypes, mrf_beta=mrf_beta,
                                 learn_proportions=learn_proportions, device=str(torch_device), progress=progress,
                                 registration=registration, postprocess=postprocess,
                                 atlas_start=(case.placement, svf), prior_votes=prior_votes,
                                 atlas_set=atlas_set, fit_guided=fit_guided)
        result.settings = {**result.settings, "model": str(model.path), "refine": "registration"}
        result.timings = {"load_s": loaded - start - (started - opened), "start_s": started - opened,
                          "network_s": predicted - loaded, **result.timings}
        # the network's start: the solver did not search (with an atlas set, the first fit's registration)
        (result.guide or result).registration.fov_search = case.fov_search
        return result
    subject = replace(subject, transforms={**subject.transforms, "atlas": warp})
    model_em = MultivariateMixture(n_subtypes=config.n_subtypes, n_classes=len(subject.class_labels),
                                   max_iter=max(refine, 1), mrf_beta=mrf_beta if refine else 0.0,
                                   learn_proportions=learn_proportions)
    with torch.no_grad():
        common = subject.sample(device=torch_device)
        sampled = time.perf_counter()
        posterior = fitted_posterior(model_em, common, params, refine, progress)
        refined = time.perf_counter()
    settings = {"model": str(model.path), "refine": int(refine), "mrf_beta": mrf_beta if refine else 0.0,
                "learn_proportions": learn_proportions,
                "postprocess": postprocess, "device": str(torch_device), "roi_margin_mm": subject.roi_margin_mm}
    timings = {"load_s": loaded - start - (started - opened), "start_s": started - opened,
               "network_s": predicted - loaded, "sample_s": sampled - predicted,
               "refine_s": refined - sampled}  # the EM iterations (or θ's score) and the posterior
    result = Segmentation(subject, model_em, subject.class_labels, common, posterior, settings, timings,
                          RegistrationResult({"atlas": warp}, fov_search=case.fov_search), postprocess)
    check_posterior_shift(result)  # as a fit's: a network that put the atlas on the wrong anatomy warns
    return result


def segment_with_acwe(images: Sequence[Image], model, refine: int = 0, mrf_beta: float = 0.0,
                      postprocess: str = "none", device: str = "auto", progress: bool = False) -> Segmentation:
    """Segment a case by a trained Chan–Vese CNN (:mod:`mvmm.nets.acwe`), optionally refined by EM.

    Parameters
    ----------
    images : sequence of Image
        The case, named as the model's images (any order).
    model : LoadedModel or path
        An ``acwe`` model directory.
    refine, mrf_beta : int, float
        EM iterations with the network's map as the prior (0: the network's map is the answer), and
        their Potts weight.
    postprocess : {"none", "cardiac"}
    """
    from mvmm.nets.acwe import region_params
    from mvmm.nets.data import prepare_case, stack_cases

    start = time.perf_counter()
    model, torch_device = loaded_model(model, device, "acwe")
    config, net = model.config, model.net
    ordered = ordered_images(images, config, model.path)
    atlas = model.atlas.placed_for(ordered[0].grid) if model.atlas is not None else None
    check_postprocess(postprocess, config.labels)
    case = prepare_case(Subject(ordered, atlas=atlas), config.network, torch_device, require_atlas=False)
    loaded = time.perf_counter()
    with torch.no_grad():
        batch = {k: v.to(torch_device) for k, v in stack_cases([case]).items()}
        posterior = net(batch).posterior[0]  # [K, *S]
        order = None
        if config.class_order == "intensity":  # unnamed phases: by the first image's mean under P
            means = region_params(batch["images"], batch["coverage"], posterior[None], batch["region"]).means
            order = torch.argsort(means[0, 0, :, 0]).tolist()
            posterior = posterior[order]
        if config.with_atlas:  # trained within the atlas's region: beyond it, the background
            background = torch.zeros_like(posterior)
            background[config.labels.background_index] = 1
            posterior = torch.where(batch["region"][0].unsqueeze(0), posterior, background)
    predicted = time.perf_counter()
    k = posterior.shape[0]
    if refine:
        posterior = (1 - REFINE_PRIOR_FLOOR) * posterior + REFINE_PRIOR_FLOOR / k
    predicted_map = Atlas(posterior.float().cpu(), case.grid, config.labels, source=f"{model.path} (Chan–Vese CNN)")
    subject = Subject(ordered, atlas=predicted_map)
    mixture = MultivariateMixture(n_subtypes=np.ones((len(ordered), k), dtype=np.int64), n_classes=k,
                                  max_iter=max(refine, 1), mrf_beta=mrf_beta if refine else 0.0,
                                  learn_proportions=False)
    with torch.no_grad():
        common = subject.sample(device=torch_device, check=False)  # a map on the network grid, not an atlas to warn of
        sampled = time.perf_counter()
        region = common.coverage.any(0)
        theta = region_params(common.images[None], common.coverage[None], common.prior[None].to(common.images.dtype),
                              region[None], variances="fitted")
        posterior = fitted_posterior(mixture, common, theta, refine, progress)
        answer = posterior if refine else common.prior  # 0: the network's map itself (θ scored for the report)
    refined = time.perf_counter()
    settings = {"model": str(model.path), "kind": "acwe", "refine": int(refine),
                "mrf_beta": mrf_beta if refine else 0.0, "postprocess": postprocess, "device": str(torch_device),
                "class_order": config.class_order, **({"intensity_order": order} if order is not None else {})}
    timings = {"load_s": loaded - start, "network_s": predicted - loaded, "sample_s": sampled - predicted,
               "refine_s": refined - sampled}
    return Segmentation(subject, mixture, config.labels, common, answer, settings, timings, None, postprocess,
                        prior_is_posterior=not refine)


def segment_with_vae(images: Sequence[Image], model, refine: int = 0, samples: int = 0, mrf_beta: float = 0.0,
                     postprocess: str = "none", device: str = "auto", progress: bool = False,
                     seed: int = 0, registration: Optional[RegistrationSettings] = None,
                     roi_margin_mm: Optional[float] = None, atlas_set: Sequence[AtlasEntry] = (),
                     fit_guided: Optional[FitGuidedSettings] = None) -> Segmentation:
    """Segment a case by a trained prior-VAE segmentation network (:mod:`mvmm.nets.vae_seg`).

    The encoder's mean code gives the prior (decoded) and θ (EM under it, in the network); the
    decoded prior becomes the case's atlas on its network grid, θ — in image units — the mixture's
    parameters, and the posteriors follow on every grid, as for the Bayesian CNN.

    Parameters
    ----------
    images, model, refine, mrf_beta, postprocess, device, progress
        As :func:`segment_with_acwe`; ``refine`` runs EM with the decoded prior as the atlas.
    samples : int
        Latent codes drawn from q(z | I) (torch's generator seeded by ``seed``, forked): the posterior
        under each (its prior decoded, θ by EM) gives, on the common grid, the per-voxel variance of
        the posterior over the samples (summed over classes) and the entropy of their mean —
        ``uncertainty_variance`` and ``uncertainty_entropy`` among the outputs. With
        ``registration``, each sample's decoded prior goes through the transform the registration
        found for the mean code's prior, and its posterior is the fitted model's (θ of the
        refinement): the maps then describe the segmentation that is written, not the unmoved prior.
    registration : RegistrationSettings, optional
        Instead of EM with the decoded prior fixed, the joint solver (EM ⇄ registration,
        :mod:`mvmm.joint`) with the decoded prior as the atlas, starting where the network decoded it:
        the levels of ``registration.atlas`` move it (the decoder has no warp: the code alone cannot
        bend it to the case), then EM to convergence, θ from the moved prior as in ``segment``
        (``refine`` is not used).
    roi_margin_mm : float, optional
        With ``registration``: the fit's region of interest (default: the model's ``roi_margin_mm``). With
        ``atlas_set`` and no registration: that of the fit on the atlas set's prior (default: none, the whole image).
    atlas_set, fit_guided
        Labelled images of other subjects — of another data set too, e.g. ACDC's label maps (their values
        named by the entries' ``label_names``), so that no label of the case's data set is used — whose label
        maps are registered to the network's posterior (without ``registration``) or to the refined fit's (with
        it; the MS-CMRSeg experiment's ``vae-seg-refine``) and averaged, and the model fitted on that prior
        as on an atlas (it votes, the proportions are learned; nothing moves), as
        :func:`mvmm.segment.segment_subject`'s. Not with ``samples`` (they describe the network's answer)
        or ``refine``.
    """
    from mvmm.mixture.functional import log_joint, log_posteriors
    from mvmm.nets.data import prepare_case, stack_cases
    from mvmm.nets.prior import sample_latent

    start = time.perf_counter()
    model, torch_device = loaded_model(model, device, "vae-seg")
    config, net = model.config, model.net
    if samples < 0:
        raise InputError(f"samples: expected a count of at least 0, got {samples}")
    if registration is not None and refine:
        raise InputError("refine: with register_atlas the decoded prior moves and EM runs to convergence; "
                         "`refine` (EM with the prior fixed where the network put it) is the other refinement; "
                         "give one")
    if atlas_set and (samples or refine):
        raise InputError("atlas_set: the atlas set follows the network's answer (or its refinement by registration) "
                         "and replaces the segmentation " + ("the samples describe; give `samples` 0" if samples else
                                                              "that `refine` refines; give `refine` 0"))
    ordered = ordered_images(images, config, model.path)
    check_postprocess(postprocess, config.labels)
    case = prepare_case(Subject(ordered), config.network, torch_device, require_atlas=False)
    loaded = time.perf_counter()
    with torch.no_grad():
        batch = {k: v.to(torch_device) for k, v in stack_cases([case]).items()}
        mean, log_var = net.encode(batch)
        prediction = net.predict(batch, mean, mean, log_var)
        prior = prediction.log_prior[0].exp()
        params = _in_image_units(prediction.params, case.offsets.to(torch_device), case.scales.to(torch_device))
        drawn = []
        if samples:
            with torch.random.fork_rng(devices=[torch_device] if torch_device.type == "cuda" else []):
                torch.manual_seed(seed)
                drawn = [net.predict(batch, sample_latent(mean, log_var)) for _ in range(samples)]
        spread = None
        if drawn and registration is None:
            spread = uncertainty_maps([log_posteriors(log_joint(batch["images"], batch["coverage"], d.params,
                                                                d.log_prior))[0].exp() for d in drawn])
    predicted = time.perf_counter()
    decoded = Atlas(prior.float().cpu(), case.grid, config.labels, source=f"{model.path} (decoded prior)")
    if registration is not None:
        margin = config.network.roi_margin_mm if roi_margin_mm is None else roi_margin_mm
        result = segment_subject(Subject(ordered, atlas=decoded, roi_margin_mm=margin),
                                 subtypes=config.network.subtypes,
                                 background_subtypes=config.network.background_subtypes, mrf_beta=mrf_beta,
                                 learn_proportions=False, device=str(torch_device), progress=progress,
                                 registration=registration, postprocess=postprocess, atlas_set=atlas_set,
                                 fit_guided=fit_guided,
                                 # the atlas set's prior is fitted as an atlas is (chosen on the development fold:
                                 # docs/mscmr.md, "The ACDC prior and ACDC's label maps")
                                 guided_fit_options={"learn_proportions": True, "prior_votes": True})
        refined = time.perf_counter()
        if drawn:
            result.extra_maps.update(registered_sample_maps(result, [d.log_prior[0].exp() for d in drawn],
                                                            case.grid))
        result.settings = {**result.settings, "model": str(model.path), "kind": "vae-seg", "refine": "registration",
                           "samples": int(samples), "guide": "registration"}
        result.timings = {"load_s": loaded - start, "network_s": predicted - loaded, **result.timings,
                          "samples_s": time.perf_counter() - refined}
        return result
    subject = Subject(ordered, atlas=decoded)
    mixture = MultivariateMixture(n_subtypes=config.n_subtypes, n_classes=len(config.labels), max_iter=max(refine, 1),
                                  mrf_beta=mrf_beta if refine else 0.0, learn_proportions=False)
    with torch.no_grad():
        common = subject.sample(device=torch_device, check=False)
        sampled = time.perf_counter()
        posterior = fitted_posterior(mixture, common, params, refine, progress)
        extra = {}
        if spread is not None:  # network grid → common grid, through the world (linear)
            from mvmm.spatial.warp import sample_image

            points = common.grid.world_points(device=torch_device)
            for name, values in spread.items():
                sampled_values, _ = sample_image(values[None].float(), case.grid, points)
                extra[name] = sampled_values[0]
    refined = time.perf_counter()
    settings = {"model": str(model.path), "kind": "vae-seg", "refine": int(refine), "samples": int(samples),
                "mrf_beta": mrf_beta if refine else 0.0, "postprocess": postprocess, "device": str(torch_device),
                "bias_correction": "none"}
    timings = {"load_s": loaded - start, "network_s": predicted - loaded, "sample_s": sampled - predicted,
               "refine_s": refined - sampled}
    result = Segmentation(subject, mixture, config.labels, common, posterior, settings, timings, None, postprocess,
                          extra_maps=extra)
    check_posterior_shift(result)
    if atlas_set:
        # the network's own posterior guides the atlas set's label maps: it keeps the RV that moving the decoded
        # prior by registration trades away, and loses the myocardium where the network's is poor (MS-CMRSeg:
        # docs/mscmr.md, "The network's answer as the label maps' guide"); the fit on their prior is over the
        # whole image unless roi_margin_mm is given (better than 5 mm on the development fold)
        guided = segment_subject(Subject(ordered, atlas=decoded, roi_margin_mm=roi_margin_mm),
                                 subtypes=config.network.subtypes,
                                 background_subtypes=config.network.background_subtypes, mrf_beta=mrf_beta,
                                 device=str(torch_device), progress=progress, registration=None,
                                 postprocess=postprocess, atlas_set=atlas_set, fit_guided=fit_guided,
                                 guided_fit_options={"learn_proportions": True, "prior_votes": True}, guide=result)
        guided.settings = {**guided.settings, "model": str(model.path), "kind": "vae-seg", "refine": 0,
                           "samples": 0, "guide": "network"}
        guided.timings = {"load_s": loaded - start, "network_s": predicted - loaded, **guided.timings}
        return guided
    return result


def uncertainty_maps(posteriors: Sequence[torch.Tensor]) -> dict:
    """What the spread of the samples' posteriors ``[K, *S]`` (one per latent sample, one grid) says.

    Returns ``uncertainty_variance``: the per-voxel variance over the samples, summed over classes, and
    ``uncertainty_entropy``: the entropy (nats) of their mean; both ``[*S]``.
    """
    stacked = torch.stack(list(posteriors))  # [samples, K, *S]
    average = stacked.mean(0)
    return {"uncertainty_variance": stacked.var(0, unbiased=False).sum(0),
            "uncertainty_entropy": -(average * average.clamp_min(1e-12).log()).sum(0)}


def averaged_posterior(results: Sequence[Segmentation]) -> torch.Tensor:
    """The mean of several fits' posteriors of one case on their common grid, ``[K, *S]``, each weighted
    by its :attr:`~mvmm.segment.Segmentation.votes` — so that every voter counts once: a fit whose atlas
    votes (``prior_votes``) brings two, the model's posterior and the prior.

    An ensemble of the network's one-pass answer and the fitted model's (the experiment's
    ``bayes-ensemble``: ``bayes`` and ``em-all``, whose atlas votes too): where they disagree, the mean
    keeps the class most voters find likely. The fits must share the common grid and the labels (one
    reference image, one atlas).
    """
    first = results[0]
    for other in results[1:]:
        if not other.common.grid.same_geometry(first.common.grid):
            raise InputError("results: the fits' common grids differ; an average needs one reference image")
        if list(other.labels.values) != list(first.labels.values):
            raise InputError(f"results: the fits' labels differ ({list(first.labels.values)} against "
                             f"{list(other.labels.values)})")
    return vote_weighted_mean(results, [r.posterior.to(first.device) for r in results])


def ensemble(results: Sequence[Segmentation]) -> Segmentation:
    """Several fits of one case as one :class:`~mvmm.segment.Segmentation` whose posterior, on the common
    grid and on every image's own grid, is the mean of theirs, weighted by their votes
    (:func:`averaged_posterior`).

    What has no mean is the first fit's: its model (``params.json``, the report's EM), transforms, region
    and clean-up — the cardiac clean-up keeps the first fit's pathological wall. The settings and
    timings are each fit's, under ``ensemble``.
    """
    first = results[0]
    average = averaged_posterior(results)
    settings = {"ensemble": [r.settings for r in results]}
    timings = {"ensemble": [r.timings for r in results]}
    return replace(first, posterior=average, settings=settings, timings=timings, members=tuple(results),
                   extra_maps={})


def segment_ensemble(images: Sequence[Image], model, registration: Optional[RegistrationSettings] = None,
                     roi_margin_mm: float = CARDIAC_PRESET["roi_margin_mm"], mrf_beta: float = SEGMENTATION.mrf_beta,
                     postprocess: str = SEGMENTATION.postprocess, bias_correction: str = SEGMENTATION.bias_correction,
                     max_iter: int = SEGMENTATION.max_iter, tol: float = SEGMENTATION.tol,
                     prior_votes: bool = SEGMENTATION.prior_votes, device: str = "auto", seed: Optional[int] = 0,
                     progress: bool = False, atlas_set: Sequence[AtlasEntry] = (),
                     fit_guided: Optional[FitGuidedSettings] = None) -> Segmentation:
    """A Bayesian CNN's one-pass answer averaged with the classical fit of its atlas (``mvmm segment
    --model M --ensemble``; the MS-CMRSeg experiment's ``bayes-ensemble``, better there than either).

    The fit is :func:`mvmm.segment.segment_subject` on the same images with the model's atlas, subtypes
    and proportions — registration and EM from the atlas's own start, not the network's — and comes
    first in the :func:`ensemble` (its model, transforms and clean-up are written).

    Parameters
    ----------
    images : sequence of Image
        The case, named as the model's images (any order; matched case-insensitively).
    model : LoadedModel or path
        A ``bayes`` model directory.
    registration : RegistrationSettings, optional
        The fit's registration (default :func:`mvmm.joint.default_registration`; ``mvmm segment``'s
        preset gives it the cardiac start search and affine weight).
    roi_margin_mm, mrf_beta, postprocess, bias_correction, max_iter, tol, prior_votes, device, seed, progress
        The fit's, as :func:`mvmm.segment.segment_subject`'s (``postprocess`` also the network's).
    atlas_set, fit_guided
        The fit's too: labelled images of other subjects whose label maps are registered to its posterior,
        and the fit repeated on their average (``mvmm segment --model M --ensemble --atlas-set DIR
        --atlas-set-guide fit``; the MS-CMRSeg experiment's ``bayes-ensemble`` with its default prior).

    Returns
    -------
    Segmentation
        ``members``: the fit, then the network's answer (:func:`segment_with_model`, no refinement).
    """
    model, _ = loaded_model(model, device, "bayes")
    network = segment_with_model(images, model, postprocess=postprocess, device=device)
    ordered = list(network.subject.images)
    config = model.config.network
    subject = Subject(ordered, atlas=model.atlas.placed_for(ordered[0].grid), roi_margin_mm=roi_margin_mm)
    fitted = segment_subject(subject, subtypes=config.subtypes, background_subtypes=config.background_subtypes,
                             mrf_beta=mrf_beta, learn_proportions=config.proportions == "learned",
                             max_iter=max_iter, tol=tol, device=device, seed=seed, progress=progress,
                             registration="default" if registration is None else registration,
                             postprocess=postprocess, bias_correction=bias_correction, prior_votes=prior_votes,
                             atlas_set=atlas_set, fit_guided=fit_guided)
    return ensemble([fitted, network])


def registered_sample_maps(result: Segmentation, priors: Sequence[torch.Tensor], grid) -> dict:
    """:func:`uncertainty_maps` of a registered fit: each sampled prior ``[K, *grid.shape]`` (decoded on
    the network ``grid``) moved by the transform the registration found for the mean code's prior,
    onto the common grid, and its posterior under the fitted model (θ, region of interest and MRF of
    ``result``) — so the samples vary the shape where the written segmentation is, not where the
    network first put it."""
    common = result.common
    posteriors = []
    with torch.no_grad():
        for prior in priors:
            sampled = Atlas(prior.float().cpu(), grid, result.labels, source="a latent sample's decoded prior")
            moved = replace(result.subject, atlas=sampled).sample_atlas(common.grid, device=result.device)
            posteriors.append(result.model.predict_proba(common.images, common.coverage, moved, common.grid.spacing))
    return uncertainty_maps(posteriors)


def _in_image_units(params, offsets: torch.Tensor, scales: torch.Tensor):
    """θ of normalised images ``(x − offset) / scale`` as θ of the images: μ = offset + scale μ', σ² = scale² σ'²."""
    shape = (1, -1, 1, 1)
    return type(params)(offsets.reshape(shape) + scales.reshape(shape) * params.means.double(),
                        scales.reshape(shape) ** 2 * params.variances.double(), params.log_weights.double(),
                        params.log_proportions.double(), params.n_subtypes)
