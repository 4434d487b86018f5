"""Spatial transforms and warping (``torch.nn.Module`` transforms acting on world points in mm)."""

from mvmm.spatial.transforms import (AffineTransform, IdentityTransform, LinearTransform, RigidTransform,
                                     TranslationTransform)
from mvmm.spatial.warp import sample_image

__all__ = ["IdentityTransform", "LinearTransform", "TranslationTransform", "RigidTransform", "AffineTransform",
           "sample_image"]
