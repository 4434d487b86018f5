"""Figures and tables: image/label overlays, convergence curves, metric tables."""

from __future__ import annotations

from typing import Mapping, Optional, Sequence, Tuple

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.colors import ListedColormap
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

from mvmm.core.grid import Grid
from mvmm.data.anatomy import stack_axis
from mvmm.data.labels import LabelSet
from mvmm.core.outputs import atomic_path
from mvmm.metrics import agreement

# Okabe & Ito's palette: distinguishable with the common colour-vision deficiencies (no red/green pair).
COLOURS = ("#E69F00", "#0072B2", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442")


def _display_slices(label_map: np.ndarray, labels: LabelSet, axis: int, count: int = 3) -> list:
    """Up to ``count`` slices along array ``axis`` spread through the labelled structure (a quarter,
    half and three quarters of its extent), or the middle slices when nothing is labelled."""
    foreground = label_map != labels.values[labels.background_index]
    per_slice = np.moveaxis(foreground, axis, 0).reshape(foreground.shape[axis], -1).sum(1)
    occupied = np.flatnonzero(per_slice)
    first, last = (occupied[0], occupied[-1]) if occupied.size else (0, foreground.shape[axis] - 1)
    fractions = (0.5,) if count == 1 else np.linspace(0.25, 0.75, count)
    picks = [int(round(first + f * (last - first))) for f in fractions]
    return sorted(set(picks))


def _stack_view(grid: Grid):
    """``(array axis of the stack, ITK axes of the displayed plane, pick(a, k))`` of a 3D grid, where
    ``pick`` takes slice k of an array whose last three axes are the grid's; a 2D grid: ``(None, [0, 1],
    the whole array)``."""
    if grid.ndim != 3:
        return None, [0, 1], lambda a, k: a
    itk_axis = stack_axis(grid)
    axis = 2 - itk_axis

    def pick(a, k):
        return np.take(a, k, axis=a.ndim - 3 + axis)
    return axis, [a for a in range(3) if a != itk_axis], pick


def overview_figure(path, images: np.ndarray, coverage: np.ndarray, label_map: np.ndarray,
                    names: Sequence[str], labels: LabelSet, grid: Grid, entropy: Optional[np.ndarray] = None,
                    title: str = "") -> None:
    """Slices through the segmented structure: each image with the label contours, the labels filled
    over the reference image, and the posterior entropy.

    Rows are slices across the stack (up to three, through the labelled structure; one for a 2D
    image), numbered from 1 and placed in mm from the first slice along the stack axis; where an image does not cover the common grid it is
    hatched, not blank; a 20 mm scale bar is on the first panel.

    Parameters
    ----------
    images : np.ndarray, shape [N, *S]
    coverage : np.ndarray of bool, shape [N, *S]
    label_map : np.ndarray, shape [*S], label values
    grid : Grid
        The common grid (spacing for the aspect ratio and the scale bar, the stack axis for the slices).
    entropy : np.ndarray, shape [*S], optional
        Posterior entropy (nats).
    """
    axis, in_plane, pick = _stack_view(grid)
    slices = _display_slices(label_map, labels, axis) if axis is not None else [None]
    itk_axis = grid.ndim - 1 - axis if axis is not None else None
    column_mm, row_mm = grid.spacing[in_plane[0]], grid.spacing[in_plane[1]]
    columns = list(names) + ["labels"] + (["entropy"] if entropy is not None else [])
    fig, axes = _subplots(len(slices), len(columns), figsize=(3.2 * len(columns), 3.3 * len(slices) + 0.6),
                          squeeze=False)
    cmap = ListedColormap(COLOURS[: len(labels.foreground)])
    for row, k in enumerate(slices):
        where = "" if k is None else f"slice {k + 1}/{label_map.shape[axis]}, {k * grid.spacing[itk_axis]:.0f} mm"
        labelled = pick(label_map, k)
        for col, name in enumerate(columns):
            ax = axes[row, col]
            if name == "entropy":
                shown = ax.imshow(pick(entropy, k), cmap="viridis", vmin=0.0, vmax=float(np.log(len(labels))),
                                  interpolation="nearest",
                                  aspect=row_mm / column_mm)
                fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02, label="nats")
            else:
                index = 0 if name == "labels" else col
                image, cover = pick(images[index], k), pick(coverage[index], k)
                ax.imshow(np.where(cover, image, np.nan), cmap="gray", interpolation="nearest",
                          aspect=row_mm / column_mm)
                if not cover.all():  # not covered by this image: hatched, so it is not read as dark tissue
                    ax.contourf(~cover, levels=[0.5, 1.5], colors="none", hatches=["////"])
                if name == "labels":
                    classes = np.full(labelled.shape, np.nan)
                    for c, (_, value) in enumerate(labels.foreground):
                        classes[labelled == value] = c
                    ax.imshow(classes, cmap=cmap, vmin=-0.5, vmax=cmap.N - 0.5, alpha=0.45,
                              interpolation="nearest", aspect=row_mm / column_mm)
                for (_, value), colour in zip(labels.foreground, COLOURS):
                    mask = (labelled == value).astype(float)
                    if mask.any():
                        ax.contour(mask, levels=[0.5], colors=[colour], linewidths=1.0)
            ax.set_title(f"{name}\n{where}" if where and row == 0 else (where if col == 0 and where else name),
                         fontsize=8)
            ax.axis("off")
        bar = 20.0 / column_mm  # a 20 mm scale bar, in pixels along the displayed rows
        height = labelled.shape[0]
        axes[row, 0].plot([2, 2 + bar], [height - 3, height - 3], color="white", linewidth=2)
        axes[row, 0].text(2 + bar / 2, height - 5, "20 mm", color="white", ha="center", va="bottom", fontsize=7)
    handles = [Rectangle((0, 0), 1, 1, facecolor=c, alpha=0.6, edgecolor=c, label=n)
               for (n, _), c in zip(labels.foreground, COLOURS)]
    handles.append(Rectangle((0, 0), 1, 1, facecolor="white", edgecolor="black", hatch="////", label="not covered"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False)
    if title:
        fig.suptitle(title)
    # a fixed layout (tight_layout measures every text and tick of every panel: ~0.4 s per case);
    # margins in inches so that the titles, legend and suptitle fit whatever the number of rows
    width, height = fig.get_size_inches()
    right = (0.65 if entropy is not None else 0.1) / width  # room for the entropy's colour bar
    fig.subplots_adjust(left=0.1 / width, right=1 - right, bottom=0.55 / height,
                        top=1 - (0.75 if title else 0.45) / height, wspace=0.12, hspace=0.22)
    _save(fig, path, layout=False)


def comparison_figure(path, image: np.ndarray, label_maps: Mapping[str, np.ndarray], labels: LabelSet,
                      title: str = "") -> None:
    """One panel per label map (e.g. manual and each method), its contours over the same image slice.

    Parameters
    ----------
    image : np.ndarray, shape [*S]
    label_maps : mapping of name to np.ndarray of shape [*S] (label values); the first picks the slice
    """
    first = next(iter(label_maps.values()))
    z = _display_slices(first, labels, axis=0, count=1)[0] if first.ndim == 3 else None
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


def paired_figure(path, before: Mapping[str, Sequence[float]], after: Mapping[str, Sequence[float]],
                  patients: Sequence, xlabel: str, ylabel: str, title: str = "") -> None:
    """Per structure, each patient's ``after`` against ``before`` (e.g. em-all's Dice against its prior's):
    points above the diagonal gained, below it lost; the counts are in each panel's title."""
    structures = list(before)
    fig, axes = _subplots(1, len(structures), figsize=(3.4 * len(structures), 4.1), squeeze=False)
    for ax, structure, colour in zip(axes[0], structures, COLOURS):
        x, y = np.asarray(before[structure], dtype=float), np.asarray(after[structure], dtype=float)
        finite = np.isfinite(x) & np.isfinite(y)
        low = float(min(x[finite].min(), y[finite].min(), 0.5)) if finite.any() else 0.0
        ax.plot([low, 1], [low, 1], color="0.6", lw=1, zorder=0)
        ax.scatter(x, y, s=18, color=colour)
        for patient, xi, yi in zip(patients, x, y):
            if np.isfinite(xi) and np.isfinite(yi) and abs(yi - xi) > 0.03:
                ax.annotate(str(patient), (xi, yi), fontsize=7, xytext=(3, 2), textcoords="offset points")
        gained, lost = int(np.sum(y[finite] > x[finite])), int(np.sum(y[finite] < x[finite]))
        mean_gain = float(np.mean(y[finite] - x[finite])) if finite.any() else float("nan")
        ax.set_title(f"{structure}: {gained} up, {lost} down, mean {mean_gain:+.3f}", fontsize=9)
        ax.set_xlim(low, 1)
        ax.set_ylim(low, 1)
        ax.set_aspect("equal")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    _save(fig, path, rect=(0, 0, 1, 0.93 if title else 1))


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


def loss_figure(path, history: Sequence[dict], title: str = "training",
                data_label: str = "negative log-likelihood / voxel",
                second: Tuple[str, str] = ("smoothness", "mean ‖∇v‖² (velocity)")) -> None:
    """A network's training curve: mean loss per epoch, and its terms as ``mvmm.nets.train`` logs
    them: the data term (negative log-likelihood per voxel, dissimilarity or region energy) beside
    the loss, and the regulariser ``second`` (its log key and axis label) on the right."""
    fig, axes = _subplots(1, 2, figsize=(10, 3.6), squeeze=False)
    epochs = [h["epoch"] for h in history]
    axes[0, 0].plot(epochs, [h["loss"] for h in history], color=COLOURS[0], label="loss")
    axes[0, 0].plot(epochs, [h["data"] for h in history], color=COLOURS[1], linestyle="--", label=data_label)
    axes[0, 0].set_ylabel("training loss (mean over batches)")
    axes[0, 0].legend(fontsize=7, loc="best")
    axes[0, 1].plot(epochs, [h[second[0]] for h in history], color=COLOURS[2])
    axes[0, 1].set_ylabel(second[1])
    for ax in axes[0]:
        ax.set_xlabel("epoch")
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


def _save(fig, path, rect=(0, 0, 1, 1), layout: bool = True) -> None:
    """Lay out (``tight_layout`` within ``rect``, unless ``layout`` is False: the figure placed its
    axes itself) and write the PNG atomically; light compression, since zlib's default level costs
    more time than the bytes it saves are worth here."""
    if layout:
        fig.tight_layout(rect=rect)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png", pil_kwargs={"compress_level": 1})


PATHOLOGY_COLOURS = {"scar": "#D55E00", "oedema": "#F0E442"}  # vermillion, yellow (Okabe & Ito)


def pathology_figure(path, images: np.ndarray, coverage: np.ndarray, names: Sequence[str], tissue_mask: np.ndarray,
                     masks: Mapping[str, np.ndarray], grid: Grid, per_slice: Sequence[dict] = (),
                     title: str = "") -> None:
    """Slices through the myocardium: each image with the myocardium's contour and the pathology filled.

    Parameters
    ----------
    images, coverage : np.ndarray, shape [N, *S]
        The case on ``grid`` (coverage bool).
    tissue_mask : np.ndarray, bool, shape [*S]
        The myocardium of the label map.
    masks : mapping of pathology name to np.ndarray, bool, shape [*S]
    per_slice : sequence of dict
        :meth:`mvmm.pathology.PathologyMaps.per_slice` rows, for each row's caption.
    """
    axis, in_plane, pick = _stack_view(grid)
    slices = [None]
    if axis is not None:  # up to four slices spread through the myocardium
        occupied = np.flatnonzero(np.moveaxis(tissue_mask, axis, 0).reshape(tissue_mask.shape[axis], -1).any(1))
        slices = [int(k) for k in occupied[np.unique(np.linspace(0, occupied.size - 1, min(4, occupied.size))
                                                     .round().astype(int))]] if occupied.size else [0]
    aspect = grid.spacing[in_plane[1]] / grid.spacing[in_plane[0]]
    rows_by_slice = {row["slice"] - 1: row for row in per_slice}
    fig, axes = _subplots(len(slices), len(names), figsize=(3.4 * len(names), 3.4 * len(slices) + 0.6), squeeze=False)
    for r, k in enumerate(slices):
        caption = "" if k is None else f"slice {k + 1}"
        row = rows_by_slice.get(k, {})
        shares = [f"{p} {row[p + '_percent']:.0f}%" for p in masks if row.get(p + "_percent") is not None]
        caption += (": " + ", ".join(shares)) if shares else ""
        for c, name in enumerate(names):
            ax = axes[r, c]
            cover = pick(coverage[c], k)
            ax.imshow(np.where(cover, pick(images[c], k), np.nan), cmap="gray", interpolation="nearest", aspect=aspect)
            if not cover.all():
                ax.contourf(~cover, levels=[0.5, 1.5], colors="none", hatches=["////"])
            for pathology, mask in masks.items():
                shown = pick(mask, k)
                if shown.any():
                    ax.imshow(np.where(shown, 1.0, np.nan), cmap=ListedColormap([PATHOLOGY_COLOURS.get(pathology, "red")]),
                              alpha=0.55, interpolation="nearest", aspect=aspect)
            tissue = pick(tissue_mask, k).astype(float)
            if tissue.any():
                ax.contour(tissue, levels=[0.5], colors=["#56B4E9"], linewidths=0.8)
            ax.set_title(f"{name}\n{caption}" if r == 0 else caption, fontsize=8)
            ax.axis("off")
    handles = [Rectangle((0, 0), 1, 1, facecolor=PATHOLOGY_COLOURS.get(p, "red"), alpha=0.6, label=p) for p in masks]
    handles += [Line2D([], [], color="#56B4E9", label="myocardium"),
                Rectangle((0, 0), 1, 1, facecolor="white", edgecolor="black", hatch="////", label="not covered")]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False)
    if title:
        fig.suptitle(title)
    _save(fig, path, rect=(0, 0.05, 1, 0.96))


def agreement_figure(path, pairs: Mapping[str, tuple], unit: str = "ml", title: str = "") -> None:
    """Per quantity, measured against reference: a scatter with the identity line (and Pearson's r), and
    the Bland–Altman plot (difference against mean, with the mean difference and ±1.96 sd).

    Parameters
    ----------
    pairs : mapping of name to (measured, reference), each a sequence of float
    """
    fig, axes = _subplots(len(pairs), 2, figsize=(9.0, 3.8 * len(pairs) + 0.4), squeeze=False)
    for row, (name, (measured, reference)) in enumerate(pairs.items()):
        m, r = np.asarray(measured, dtype=float), np.asarray(reference, dtype=float)
        stats = agreement(m, r)
        ax = axes[row, 0]
        ax.scatter(r, m, s=14, color=COLOURS[1])
        top = float(max(m.max(initial=0.0), r.max(initial=0.0))) * 1.05 or 1.0
        ax.plot([0, top], [0, top], color="grey", linewidth=0.8)
        ax.set_xlabel(f"manual {name} ({unit})")
        ax.set_ylabel(f"mvmm {name} ({unit})")
        ax.set_title(f"{name}: r = {stats['r']:.2f}, n = {len(m)}", fontsize=9)
        ax.grid(alpha=0.3)
        ax = axes[row, 1]
        ax.scatter((m + r) / 2.0, m - r, s=14, color=COLOURS[1])
        for key, style in (("bias", "-"), ("low", "--"), ("high", "--")):
            if np.isfinite(stats[key]):
                ax.axhline(stats[key], color="grey", linestyle=style, linewidth=0.8)
        ax.set_xlabel(f"mean of mvmm and manual ({unit})")
        ax.set_ylabel(f"mvmm − manual ({unit})")
        ax.set_title(f"{name}: bias {stats['bias']:+.2f}, limits {stats['low']:+.2f} / {stats['high']:+.2f}", fontsize=9)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    _save(fig, path, rect=(0, 0, 1, 0.96))
