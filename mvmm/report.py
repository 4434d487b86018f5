"""Figures and tables: image/label overlays, convergence curves, metric tables."""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

from mvmm.data.labels import LabelSet
from mvmm.core.outputs import atomic_path

# Okabe & Ito's palette: distinguishable with the common colour-vision deficiencies (no red/green pair).
COLOURS = ("#E69F00", "#0072B2", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442")


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


def convergence_figure(path, lower_bounds: Sequence[float], registration_history: Optional[Sequence[dict]] = None,
                       title: str = "convergence") -> None:
    """The whole solve: the registration (mean log-likelihood per voxel after each outer iteration's
    EM steps, on the registration grid, with its levels marked) and the final EM on the full grid.

    Parameters
    ----------
    lower_bounds : sequence of float
        The final EM's mean log-likelihood per voxel, from its initialisation (iteration 0).
    registration_history : sequence of dict, optional
        The joint solver's history (``level``, ``log_likelihood``, ``log_likelihood_after_registration``,
        ``penalty``); None or empty: the EM panel alone.
    """
    history = list(registration_history or [])
    fig, axes = _subplots(1, 2 if history else 1, figsize=(10 if history else 5, 3.6), squeeze=False)
    if history:
        ax = axes[0, 0]
        # one segment per level, not joined: the full-resolution level is scored on another grid
        levels, start = [], 0
        for i in range(1, len(history) + 1):
            if i == len(history) or history[i]["level"] != history[start]["level"]:
                levels.append((history[start]["level"], start, i))
                start = i
        for n, (name, first, last) in enumerate(levels):
            x = np.arange(first + 1, last + 1)
            ax.plot(x, [h["log_likelihood"] for h in history[first:last]], marker="o", markersize=3,
                    color=COLOURS[1], label="after EM steps" if n == 0 else None)
            if all("log_likelihood_after_registration" in h for h in history[first:last]):
                objective = [h["log_likelihood_after_registration"] - h.get("penalty", 0.0)
                             for h in history[first:last]]
                ax.plot(x, objective, marker=".", markersize=3, linestyle="--", color=COLOURS[0],
                        label="after transform steps, minus penalty" if n == 0 else None)
            if n % 2 == 0:
                ax.axvspan(first + 0.5, last + 0.5, color="0.93", zorder=0)
            ax.text((first + last + 1) / 2, 1.01 + 0.06 * (n % 2), name, transform=ax.get_xaxis_transform(),
                    ha="center", va="bottom", fontsize=7)  # staggered: short levels' names do not overlap
        ax.set_xlabel("outer iteration of the registration (shading: levels)")
        ax.set_ylabel("mean log-likelihood per voxel\n(registration grid)")
        ax.legend(fontsize=7, loc="best")
        _readable_axes(ax)
    ax = axes[0, -1]
    ax.plot(range(len(lower_bounds)), lower_bounds, marker="o", markersize=3, color=COLOURS[2])
    ax.set_xlabel("final EM iteration (0 = start)")
    ax.set_ylabel("mean log-likelihood per voxel\n(full grid)")
    _readable_axes(ax)
    fig.suptitle(title)
    _save(fig, path, rect=(0, 0, 1, 0.93))


def _readable_axes(ax) -> None:
    """Whole-number iteration ticks and plain tick labels (no offset notation), a light grid."""
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.ticklabel_format(axis="y", useOffset=False, style="plain")
    ax.grid(alpha=0.3)


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
