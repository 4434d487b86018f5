"""Synthetic multi-sequence cardiac short-axis cases with ground truth.

One analytic heart in world space (LV pool, myocardial ring, RV crescent, a transmural scar and a
surrounding oedema; body, lungs and air around it) is imaged by three sequences, each on its own
grid: LGE (scar bright), C0/bSSFP (blood bright) and T2 (oedema bright, only mid-ventricular slices).
Each image gets its own contrast, partial-volume averaging across its slice thickness, a smooth
multiplicative bias field and Gaussian noise. Everything depends on the seed alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict

import numpy as np
import torch

from mvmm.data import io
from mvmm.data.anatomy import rv_direction
from mvmm.core.grid import Grid
from mvmm.data.image import Image
from mvmm.data.labels import CARDIAC_LABELS
from mvmm.core.outputs import staged_output_dir, write_json

SEQUENCES = ("LGE", "C0", "T2")
# Mean intensity of each tissue per sequence (scar/oedema replace myocardium where present).
CONTRAST = {
    "LGE": {"air": 0.02, "lung": 0.08, "body": 0.35, "myo": 0.12, "blood": 0.60, "scar": 0.85, "oedema": 0.12},
    "C0": {"air": 0.02, "lung": 0.10, "body": 0.45, "myo": 0.25, "blood": 0.95, "scar": 0.25, "oedema": 0.27},
    "T2": {"air": 0.02, "lung": 0.10, "body": 0.40, "myo": 0.33, "blood": 0.15, "scar": 0.45, "oedema": 0.60},
}
# (spacing x, y, slice) in mm, (size x, y, slices): each sequence on its own grid.
GRIDS = {"LGE": ((1.4, 1.4, 5.0), (112, 112, 16)),
         "C0": ((1.6, 1.6, 8.0), (96, 96, 11)),
         "T2": ((1.5, 1.5, 10.0), (100, 100, 4))}
NOISE_SD = 0.04
BIAS_AMPLITUDE = 0.15


@dataclass
class Phantom:
    """One synthetic case: images and ground truth, each on the grid of its sequence."""

    images: Dict[str, Image]
    truth: Dict[str, Image]  # labels 0/200/500/600
    scar: Image  # on the LGE grid
    oedema: Image  # on the T2 grid
    parameters: dict


def _rotation(rng: np.random.Generator, ndim: int) -> np.ndarray:
    """The heart's orientation (columns: the heart's axes in LPS world; the RV lies along −axis 0):
    mildly oblique at random, so that the short-axis stack is never aligned with the scanner's axes,
    with the RV on the patient's right (−x, the side :func:`mvmm.data.anatomy.short_axis_frame` expects)."""
    if ndim == 2:
        a = rng.uniform(-0.3, 0.3)
        return np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    away = -rv_direction(ndim)
    q = rng.normal(size=4) * np.array([1.0, 0.25, 0.25, 0.25])
    q /= np.linalg.norm(q)
    w, x, y, z = q
    rotation = np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                         [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                         [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])
    # a random tilt may also twist the heart about its long axis; undo whole quarter turns of that
    # twist, so that the RV stays on the anatomical side (the heart's axis 0 closest to `away`)
    quarter = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    turns = [rotation @ np.linalg.matrix_power(quarter, k) for k in range(4)]
    return max(turns, key=lambda r: float(r[:, 0] @ away))


def _anatomy(local: torch.Tensor, p: dict) -> Dict[str, torch.Tensor]:
    """Tissue masks at heart-local points ``[..., ndim]`` (mm; third axis along the long axis)."""
    u, v = local[..., 0], local[..., 1]
    if local.shape[-1] == 3:
        w = local[..., 2]
        t = (w - p["base_mm"]) / (p["apex_mm"] - p["base_mm"])  # 0 at base, 1 at apex
        in_heart = (t >= 0) & (t <= 1)
        taper = torch.sqrt(torch.clamp(1 - t ** 2, min=0.0)).clamp(min=0.25)
    else:
        w, t = torch.zeros_like(u), torch.zeros_like(u)
        in_heart, taper = torch.ones_like(u, dtype=torch.bool), torch.ones_like(u)
    r = torch.hypot(u, v)
    r_lv, wall = p["r_lv"] * taper, p["wall"] * (0.8 + 0.2 * taper)
    lv = in_heart & (r <= r_lv)
    myo = in_heart & (r > r_lv) & (r <= r_lv + wall)
    rv_shape = ((u + p["rv_offset"] * taper) / (p["rv_a"] * taper)) ** 2 + (v / (p["rv_b"] * taper)) ** 2 < 1
    rv = in_heart & (t < 0.8) & rv_shape & (r > r_lv + wall + 1.5) & (u < 0)
    angle = torch.remainder(torch.atan2(v, u) - p["scar_angle"], 2 * math.pi)
    along = (t > p["scar_t"][0]) & (t < p["scar_t"][1]) if local.shape[-1] == 3 else in_heart
    scar = myo & (angle < p["scar_width"]) & along
    oedema = myo & (torch.remainder(angle + 0.25, 2 * math.pi) < p["scar_width"] + 0.5) & along & ~scar
    body = (u / p["body_a"]) ** 2 + ((v + 20.0) / p["body_b"]) ** 2 < 1
    lungs = body & (((u - 60.0) / 45.0) ** 2 + (v / 70.0) ** 2 < 1) & ~(lv | myo | rv)
    return {"lv": lv, "myo": myo, "rv": rv, "scar": scar, "oedema": oedema, "body": body, "lung": lungs}


def _labels(tissue: Dict[str, torch.Tensor]) -> torch.Tensor:
    bg, myo, lv, rv = CARDIAC_LABELS.values
    out = torch.full(tissue["lv"].shape, bg, dtype=torch.int16)
    out[tissue["rv"]], out[tissue["myo"]], out[tissue["lv"]] = rv, myo, lv
    return out


def _intensity(tissue: Dict[str, torch.Tensor], contrast: dict) -> torch.Tensor:
    out = torch.full(tissue["lv"].shape, contrast["air"], dtype=torch.float64)
    for name, key in (("body", "body"), ("lung", "lung"), ("myo", "myo"), ("lv", "blood"), ("rv", "blood"),
                      ("oedema", "oedema"), ("scar", "scar")):
        out[tissue[name]] = contrast[key]
    return out


def _bias_field(local: torch.Tensor, rng: np.random.Generator, amplitude: float) -> torch.Tensor:
    """exp of a random linear + quadratic polynomial of heart-local position (smooth, ±``amplitude``)."""
    coeffs = rng.normal(size=(2, local.shape[-1]))
    scaled = local / 100.0
    poly = (scaled * torch.as_tensor(coeffs[0])).sum(-1) + 0.5 * ((scaled ** 2) * torch.as_tensor(coeffs[1])).sum(-1)
    poly = poly - poly.mean()
    return torch.exp(amplitude * poly / poly.abs().max().clamp_min(1e-12))


def make_phantom(seed: int = 0, ndim: int = 3, noise_sd: float = NOISE_SD,
                 bias_amplitude: float = BIAS_AMPLITUDE) -> Phantom:
    """Generate one synthetic case.

    Parameters
    ----------
    seed : int
        Everything (anatomy, orientation, grid placement, bias, noise) follows from it.
    ndim : {3, 2}
        3: short-axis stacks; 2: one mid-ventricular slice per sequence.
    noise_sd, bias_amplitude : float
        Gaussian noise and multiplicative bias field (0 for none); the random draws do not depend
        on them, so a clean case has the same anatomy and grids as its noisy twin.
    """
    if ndim not in (2, 3):
        raise ValueError(f"ndim: expected 2 or 3, got {ndim}")
    if not (noise_sd >= 0 and bias_amplitude >= 0):
        raise ValueError(f"noise_sd, bias_amplitude: expected >= 0, got {noise_sd}, {bias_amplitude}")
    rng = np.random.default_rng(seed)
    p = {
        "r_lv": rng.uniform(21.0, 26.0), "wall": rng.uniform(7.5, 10.0),
        "rv_offset": rng.uniform(28.0, 34.0), "rv_a": rng.uniform(22.0, 28.0), "rv_b": rng.uniform(36.0, 44.0),
        "base_mm": rng.uniform(-45.0, -38.0), "apex_mm": rng.uniform(35.0, 45.0),
        "scar_angle": rng.uniform(0, 2 * math.pi), "scar_width": rng.uniform(0.6, 1.0),
        "scar_t": sorted(rng.uniform(0.15, 0.75, size=2).tolist()),
        "body_a": rng.uniform(130.0, 150.0), "body_b": rng.uniform(95.0, 115.0),
    }
    if p["scar_t"][1] - p["scar_t"][0] < 0.2:
        p["scar_t"][1] = p["scar_t"][0] + 0.2
    rotation = _rotation(rng, ndim)
    heart_centre = rng.uniform(-20, 20, size=ndim)

    def to_local(points: torch.Tensor) -> torch.Tensor:
        return (points - torch.as_tensor(heart_centre)) @ torch.as_tensor(rotation)

    images, truth, masks = {}, {}, {}
    for name in SEQUENCES:
        spacing, size = GRIDS[name]
        spacing, size = spacing[:ndim], size[:ndim]
        centre = heart_centre + rotation @ np.append(rng.uniform(-5.0, 5.0, size=2), [0.0] * (ndim - 2))
        if name == "T2" and ndim == 3:  # mid-ventricular slices only
            centre = centre + rotation @ np.array([0.0, 0.0, 0.5 * (p["base_mm"] + p["apex_mm"])])
        grid = Grid(size, spacing, (0.0,) * ndim, tuple(rotation.ravel())).with_size(size, spacing, centre)
        points = grid.world_points(dtype=torch.float64)
        tissue = _anatomy(to_local(points), p)
        # partial volume: average the contrast over three positions across the slice thickness
        offsets = (-1 / 3, 0.0, 1 / 3) if ndim == 3 else (0.0,)
        slice_axis = torch.as_tensor(rotation[:, -1] * spacing[-1]) if ndim == 3 else 0.0
        clean = sum(_intensity(_anatomy(to_local(points + o * slice_axis), p), CONTRAST[name]) for o in offsets) / len(offsets)
        noisy = (clean * _bias_field(to_local(points), rng, bias_amplitude)
                 + torch.as_tensor(rng.normal(0, noise_sd, size=clean.shape)))
        images[name] = Image.from_array(noisy.numpy(), grid, name, f"phantom seed {seed}")
        truth[name] = Image.from_array(_labels(tissue).numpy(), grid, f"{name}_truth")
        masks[name] = tissue
    return Phantom(images, truth,
                   Image.from_array(masks["LGE"]["scar"].numpy(), images["LGE"].grid, "LGE_scar"),
                   Image.from_array(masks["T2"]["oedema"].numpy(), images["T2"].grid, "T2_oedema"),
                   {"seed": seed, "ndim": ndim, "anatomy": p, "contrast": CONTRAST, "noise_sd": noise_sd,
                    "bias_amplitude": bias_amplitude, "labels": CARDIAC_LABELS.as_dict()})


def write_phantom(out_dir, seed: int = 0, ndim: int = 3, force: bool = False) -> Dict[str, Path]:
    """Write a phantom case to ``out_dir``: ``<SEQ>.nii.gz``, ``<SEQ>_truth.nii.gz``, scar, oedema, JSON.

    Returns the written files by role (``"LGE"``, ``"LGE_truth"``, …, ``"description"``).
    """
    phantom = make_phantom(seed, ndim)
    names = {}
    with staged_output_dir(out_dir, force, verify=io.verify_written) as out:
        for name in SEQUENCES:
            names[name] = f"{name}.nii.gz"
            phantom.images[name].write(out / names[name])
            names[f"{name}_truth"] = f"{name}_truth.nii.gz"
            _write_labels(phantom.truth[name], out / names[f"{name}_truth"])
        for mask in (phantom.scar, phantom.oedema):
            names[mask.name] = f"{mask.name}.nii.gz"
            _write_labels(mask, out / names[mask.name])
        names["description"] = "phantom.json"
        write_json(out / names["description"], {**phantom.parameters, "files": dict(names)})
    return {role: Path(out_dir) / name for role, name in names.items()}


def _write_labels(image: Image, path: Path) -> None:
    io.write_array(path, image.data[0].numpy().astype(np.int16), image.grid)
