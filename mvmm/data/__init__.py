"""Data layer: geometry, images, atlases, cases, file I/O and the synthetic phantom."""

from mvmm.data.atlas import Atlas
from mvmm.core.grid import Grid
from mvmm.data.image import Image
from mvmm.data.labels import CARDIAC_LABELS, LabelSet
from mvmm.data.subject import CaseSample, Subject

__all__ = ["Atlas", "Grid", "Image", "LabelSet", "CARDIAC_LABELS", "Subject", "CaseSample"]
