"""mvmm: multivariate mixture models for joint segmentation of multi-sequence images."""

__version__ = "0.28.0"
