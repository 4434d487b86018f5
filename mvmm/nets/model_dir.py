"""A trained model as a folder: what a user copies, shares and points ``mvmm segment --model`` at.

    MODEL_DIR/
      config.json     format, kind (bayes | regnet | acwe | prior | vae-seg), the network and data conventions (BayesNetSettings
                      or RegNetSettings, resolved), image names in input order, subtype counts and
                      labels (bayes), intensity normalisation, training settings and subjects (and
                      ``labelled``: those whose label maps trained it too, bayes and acwe),
                      versions of mvmm / torch / MONAI
      weights.pt      the network's state_dict (what inference loads)
      checkpoint.pt   weights + optimiser + RNG state + epoch (what --resume loads)
      atlas.nii.gz    bayes (and acwe with an atlas): the atlas it was trained with (+ atlas.json, + templates):
                      part of the model
      log.json        loss per epoch; loss.png its curve

Every file is written atomically (a temporary name, then a rename): an interrupted training run
leaves the previous epoch's files whole.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch

from mvmm import __version__
from mvmm.core.errors import InputError
from mvmm.core.outputs import atomic_path, write_json
from mvmm.core.settings import (AcweNetSettings, BayesNetSettings, NetworkSettings, PriorVaeSettings, RegNetSettings,
                                TrainingSettings, VaeSegSettings)
from mvmm.data.atlas import Atlas
from mvmm.data.labels import LabelSet
from mvmm.nets.bayes import BayesSegNet
from mvmm.nets.data import NORMALISATION
from mvmm.nets.regnet import RegNet

MODEL_FORMAT = "mvmm-model/1"
CONFIG, WEIGHTS, CHECKPOINT, ATLAS, LOG, CURVE = ("config.json", "weights.pt", "checkpoint.pt", "atlas.nii.gz",
                                                  "log.json", "loss.png")


KINDS = {"bayes": BayesNetSettings, "regnet": RegNetSettings, "acwe": AcweNetSettings, "prior": PriorVaeSettings,
         "vae-seg": VaeSegSettings}
SEGMENTING_KINDS = ("bayes", "acwe", "vae-seg")  # what `segment --model` runs
LABELLED_KINDS = SEGMENTING_KINDS + ("prior",)  # models with classes (labels)
CLASS_ORDERS = ("named", "intensity")  # acwe: classes named by the atlas or labels, or by intensity


@dataclass
class ModelConfig:
    """What ``config.json`` holds (see the module notes).

    ``images``: the network's inputs in order (for ``regnet``: fixed, moving sequence);
    ``n_subtypes`` ``[N, K]`` and ``labels``: the mixture a ``bayes`` model predicts (None for ``regnet``);
    an ``acwe`` model has ``labels`` (its K classes) and says whether it reads an atlas
    (``with_atlas``) and whether its classes are named by the atlas or labels or are unnamed phases
    ordered by their mean intensity in the first image (``class_order``).
    """

    kind: str
    network: NetworkSettings
    images: List[str]
    n_subtypes: Optional[np.ndarray]
    labels: Optional[LabelSet]
    training: TrainingSettings
    subjects: List[str]
    with_atlas: bool = False
    class_order: str = "named"
    label_names: Optional[dict] = None  # prior: name → the label values of the training maps it stood for
    prior: Optional[PriorVaeSettings] = None  # vae-seg: the settings of the prior it carries
    labelled: List[str] = field(default_factory=list)  # bayes, acwe: subjects whose label maps trained it too

    @property
    def atlas_role(self) -> str:
        """acwe: ``"prior"`` (atlas classes), ``"region"`` (the atlas bounds unnamed phases) or ``"none"``."""
        if not self.with_atlas:
            return "none"
        return "prior" if self.class_order == "named" else "region"

    @property
    def has_atlas(self) -> bool:
        return self.kind == "bayes" or (self.kind == "acwe" and self.with_atlas)

    def to_dict(self) -> dict:
        import monai

        d = {"format": MODEL_FORMAT, "kind": self.kind, "mvmm_version": __version__,
             "torch_version": torch.__version__, "monai_version": monai.__version__,
             "network": asdict(self.network), "images": list(self.images), "normalisation": NORMALISATION,
             "training": asdict(self.training), "subjects": list(self.subjects), "labelled": list(self.labelled)}
        if self.kind in ("bayes", "vae-seg"):
            d.update({"n_subtypes": self.n_subtypes.tolist(), "labels": self.labels.as_dict()})
        if self.kind == "bayes":
            d["atlas"] = ATLAS
        if self.kind == "prior":
            d.update({"labels": self.labels.as_dict(), "label_names": self.label_names})
        if self.kind == "vae-seg":
            d["prior"] = asdict(self.prior)
        if self.kind == "acwe":
            d.update({"labels": self.labels.as_dict(), "class_order": self.class_order,
                      "atlas": ATLAS if self.with_atlas else None})
        return d

    @classmethod
    def from_dict(cls, d: dict, path: Path, argname: str = "model") -> "ModelConfig":
        if d.get("format") != MODEL_FORMAT:
            raise InputError(f"{argname}: {path} is not an mvmm model configuration (format {d.get('format')!r}, "
                             f"expected {MODEL_FORMAT!r})")
        if d.get("kind") not in KINDS:
            raise InputError(f"{argname}: {path} is a {d.get('kind')!r} model; this version of mvmm runs "
                             f"{', '.join(KINDS)}")
        try:
            kind = d["kind"]
            return cls(kind, KINDS[kind](**d["network"]), list(d["images"]),
                       np.asarray(d["n_subtypes"], dtype=np.int64) if kind in ("bayes", "vae-seg") else None,
                       LabelSet.from_dict(d["labels"]) if kind in LABELLED_KINDS else None,
                       TrainingSettings(**d["training"]), list(d.get("subjects", [])),
                       with_atlas=kind == "bayes" or (kind == "acwe" and d.get("atlas") is not None),
                       class_order=d.get("class_order", "named"), label_names=d.get("label_names"),
                       prior=PriorVaeSettings(**d["prior"]) if kind == "vae-seg" else None,
                       labelled=list(d.get("labelled", [])))
        except (KeyError, TypeError) as err:
            raise InputError(f"{argname}: {path} lacks or garbles an entry ({err})") from None

    def require(self, kind: str, path, argname: str = "model") -> None:
        """Raise InputError (naming ``argname``) unless this is a ``kind`` model."""
        if self.kind != kind:
            raise InputError(f"{argname}: {path} is a {self.kind!r} model; this needs a {kind!r} model "
                             f"(mvmm train {kind})")


def build_network(config: ModelConfig):
    if config.kind == "regnet":
        return RegNet(config.network)
    if config.kind == "acwe":
        from mvmm.nets.acwe import AcweNet

        return AcweNet(len(config.images), len(config.labels), config.network, config.atlas_role)
    if config.kind in ("prior", "vae-seg"):
        from mvmm.nets.prior import PriorVAE

        prior = PriorVAE(len(config.labels), config.network if config.kind == "prior" else config.prior)
        if config.kind == "prior":
            return prior
        from mvmm.nets.vae_seg import VaeSegNet

        return VaeSegNet(config.n_subtypes, config.network, prior, config.labels.background_index)
    return BayesSegNet(config.n_subtypes, config.network)


def save_torch(obj, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def write_model_files(out: Path, config: ModelConfig, atlas: Optional[Atlas] = None) -> None:
    """``config.json`` and the atlas, if the model has one (once, when training starts)."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / CONFIG, config.to_dict())
    if atlas is not None:
        atlas.save(out / ATLAS)


@dataclass
class LoadedModel:
    """A model directory read back: its configuration, network (eval mode, on ``device``) and atlas
    (None for a model without one)."""

    path: Path
    config: ModelConfig
    net: torch.nn.Module
    atlas: Optional[Atlas]


def read_config(model_dir, argname: str = "model") -> ModelConfig:
    path = Path(model_dir) / CONFIG
    if not Path(model_dir).is_dir():
        raise InputError(f"{argname}: {model_dir} is not a folder (a model directory written by `mvmm train`)")
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"{argname}: cannot read {path} ({err})") from None
    return ModelConfig.from_dict(d, path, argname)


def load_model(model_dir, device=None, weights: Optional[str] = None, argname: str = "model") -> LoadedModel:
    """Read ``model_dir`` (see the module notes); ``weights``: another file of it (e.g. the checkpoint)."""
    model_dir = Path(model_dir)
    config = read_config(model_dir, argname)
    net = build_network(config)
    path = model_dir / (weights or WEIGHTS)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as err:
        raise InputError(f"{argname}: cannot read the weights {path} ({err})") from None
    if "model" in state and isinstance(state["model"], dict):  # a checkpoint
        state = state["model"]
    try:
        net.load_state_dict(state)
    except RuntimeError as err:
        raise InputError(f"{argname}: {path} does not fit the network its config.json describes "
                         f"({str(err).splitlines()[0]})") from None
    atlas = None
    if config.has_atlas:
        # an acwe model whose atlas only bounds the region has classes of its own, not the atlas's
        named = config.labels if config.kind == "bayes" or config.atlas_role == "prior" else None
        atlas = Atlas.read([model_dir / ATLAS], len(config.network.grid_size), named, argname=argname)
    return LoadedModel(model_dir, config, net.to(device).eval(), atlas)
