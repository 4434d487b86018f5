"""Spatial transforms and warping (``torch.nn.Module`` transforms acting on world points in mm)."""

from mvmm.spatial.transforms import IdentityTransform
from mvmm.spatial.warp import sample_image

__all__ = ["IdentityTransform", "sample_image"]
