"""Figures and tables: image/label overlays, convergence curves, metric tables."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle

from mvmm.data.labels import LabelSet
from mvmm.core.outputs import atomic_path

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
    fig, axes = _subplots(1, len(names), figsize=(4 * len(names), 4.4), squeeze=False)
    for ax, image, cover, name in zip(axes[0], images, coverage, names):
        shown = np.where(pick(cover), pick(image), np.nan)
        ax.imshow(shown, cmap="gray", interpolation="nearest")
        for (_, value), colour in zip(labels.foreground, COLOURS):
            mask = (pick(label_map) == value).astype(float)
            if mask.any():
                ax.contour(mask, levels=[0.5], colors=[colour], linewidths=1.2)
        ax.set_title(name + (f" (slice {z})" if z is not None else ""))
        ax.axis("off")
    handles = [Line2D([], [], color=c, label=n) for (n, _), c in zip(labels.foreground, COLOURS)]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False)
    if title:
        fig.suptitle(title)
    _save(fig, path, rect=(0, 0.06, 1, 0.97))


def comparison_figure(path, image: np.ndarray, label_maps: Mapping[str, np.ndarray], labels: LabelSet,
                      title: str = "") -> None:
    """One panel per label map (e.g. manual and each method), its contours over the same image slice.

    Parameters
    ----------
    image : np.ndarray, shape [*S]
    label_maps : mapping of name to np.ndarray of shape [*S] (label values); the first picks the slice
    """
    first = next(iter(label_maps.values()))
    z = _display_slice(first, labels) if first.ndim == 3 else None
    pick = (lambda a: a[z]) if z is not None else (lambda a: a)
    fig, axes = _subplots(1, len(label_maps), figsize=(3.2 * len(label_maps), 3.6), squeeze=False)
    for ax, (name, label_map) in zip(axes[0], label_maps.items()):
        ax.imshow(pick(image), cmap="gray", interpolation="nearest")
        for (_, value), colour in zip(labels.foreground, COLOURS):
            mask = (pick(label_map) == value).astype(float)
            if mask.any():
                ax.contour(mask, levels=[0.5], colors=[colour], linewidths=1.0)
        ax.set_title(name)
        ax.axis("off")
    handles = [Line2D([], [], color=c, label=n) for (n, _), c in zip(labels.foreground, COLOURS)]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False)
    if title:
        fig.suptitle(title + (f" (slice {z})" if z is not None else ""))
    _save(fig, path, rect=(0, 0.07, 1, 0.95))


def box_plot(path, values: Mapping[str, Mapping[str, Sequence[float]]], title: str = "",
             ylabel: str = "Dice") -> None:
    """Box plots of ``values[group][structure]``, groups side by side within each structure."""
    groups = list(values)
    structures = list(next(iter(values.values())))
    fig, ax = _subplots(figsize=(1.2 + 0.5 * len(groups) * len(structures), 3.8))
    width = 0.8 / len(groups)
    for g, (group, colour) in enumerate(zip(groups, COLOURS)):
        data = [[v for v in values[group][s] if np.isfinite(v)] for s in structures]
        positions = [i + (g - (len(groups) - 1) / 2) * width for i in range(len(structures))]
        parts = ax.boxplot(data, positions=positions, widths=width * 0.9, patch_artist=True, showfliers=True)
        for box in parts["boxes"]:
            box.set_facecolor(colour)
            box.set_alpha(0.6)
    ax.set_xticks(range(len(structures)))
    ax.set_xticklabels(structures)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    ax.legend([Rectangle((0, 0), 1, 1, color=c, alpha=0.6) for c in COLOURS[: len(groups)]], groups,
              loc="lower left", fontsize=8)
    if title:
        ax.set_title(title)
    _save(fig, path)


def convergence_figure(path, lower_bounds: Sequence[float], title: str = "EM convergence") -> None:
    """Mean log-likelihood per voxel against EM iteration."""
    fig, ax = _subplots(figsize=(5, 3.5))
    ax.plot(range(len(lower_bounds)), lower_bounds, marker="o", markersize=3)
    ax.set_xlabel("iteration (0 = initialisation)")
    ax.set_ylabel("mean log-likelihood per voxel")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    _save(fig, path)


def _subplots(*args, **kwargs):
    """``pyplot.subplots`` without pyplot: a figure of its own (drawn by Agg when saved as PNG), so
    that importing or calling mvmm never switches the caller's backend or touches pyplot's state."""
    figsize = kwargs.pop("figsize", None)
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*args, **kwargs)


def _save(fig, path, rect=(0, 0, 1, 1)) -> None:
    fig.tight_layout(rect=rect)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
