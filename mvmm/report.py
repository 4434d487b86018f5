"""Figures and tables: image/label overlays, convergence curves, metric tables."""

from __future__ import annotations

from typing import Dict, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from mvmm.data.labels import LabelSet  # noqa: E402
from mvmm.outputs import atomic_path  # noqa: E402

COLOURS = ("tab:red", "tab:green", "tab:blue", "tab:orange", "tab:purple", "tab:cyan", "tab:olive")


def _display_slice(label_map: np.ndarray, labels: LabelSet) -> int:
    """The slice (first tensor axis of a 3D map) with the most foreground."""
    foreground = label_map != labels.values[labels.background_index]
    return int(np.argmax(foreground.reshape(foreground.shape[0], -1).sum(1)))


def overview_figure(path, images: np.ndarray, coverage: np.ndarray, label_map: np.ndarray,
                    names: Sequence[str], labels: LabelSet, title: str = "") -> None:
    """One panel per image on the common grid, with the label contours drawn over it.

    Parameters
    ----------
    images : np.ndarray, shape [N, *S]
    coverage : np.ndarray of bool, shape [N, *S]
    label_map : np.ndarray, shape [*S], label values
    """
    z = _display_slice(label_map, labels) if label_map.ndim == 3 else None
    pick = (lambda a: a[z]) if z is not None else (lambda a: a)
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 4.4), squeeze=False)
    for ax, image, cover, name in zip(axes[0], images, coverage, names):
        shown = np.where(pick(cover), pick(image), np.nan)
        ax.imshow(shown, cmap="gray", interpolation="nearest")
        for (_, value), colour in zip(labels.foreground, COLOURS):
            mask = (pick(label_map) == value).astype(float)
            if mask.any():
                ax.contour(mask, levels=[0.5], colors=[colour], linewidths=1.2)
        ax.set_title(name + (f" (slice {z})" if z is not None else ""))
        ax.axis("off")
    handles = [plt.Line2D([], [], color=c, label=n) for (n, _), c in zip(labels.foreground, COLOURS)]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False)
    if title:
        fig.suptitle(title)
    _save(fig, path, rect=(0, 0.06, 1, 0.97))


def convergence_figure(path, lower_bounds: Sequence[float], title: str = "EM convergence") -> None:
    """Mean log-likelihood per voxel against EM iteration."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(range(len(lower_bounds)), lower_bounds, marker="o", markersize=3)
    ax.set_xlabel("iteration (0 = initialisation)")
    ax.set_ylabel("mean log-likelihood per voxel")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    _save(fig, path)


def _save(fig, path, rect=(0, 0, 1, 1)) -> None:
    fig.tight_layout(rect=rect)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def metrics_table(results: Mapping[str, Dict[str, float]], columns=("dice", "hd95", "msd", "hd")) -> str:
    """A plain-text table: one row per structure, metrics as columns (distances in mm)."""
    header = f"{'structure':<10}" + "".join(f"{c + (' mm' if c != 'dice' else ''):>11}" for c in columns)
    rows = [header, "-" * len(header)]
    for name, m in results.items():
        rows.append(f"{name:<10}" + "".join(f"{m[c]:>11.3f}" for c in columns))
    return "\n".join(rows)
