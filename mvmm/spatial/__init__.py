"""Spatial transforms and warping (``torch.nn.Module`` transforms acting on world points in mm)."""

from mvmm.spatial.init import initial_linear_transform
from mvmm.spatial.nonlinear import FixedPointInverse, FreeFormDeformation, StationaryVelocityField
from mvmm.spatial.regularizers import bending_energy, jacobian_determinant, jacobian_statistics, linear_distortion
from mvmm.spatial.transforms import (AffineTransform, IdentityTransform, LinearTransform, RigidTransform,
                                     SequentialTransform, TranslationTransform, map_grid)
from mvmm.spatial.warp import sample_image

__all__ = ["IdentityTransform", "LinearTransform", "TranslationTransform", "RigidTransform", "AffineTransform",
           "SequentialTransform", "FreeFormDeformation", "FixedPointInverse", "StationaryVelocityField",
           "bending_energy", "jacobian_determinant", "jacobian_statistics", "linear_distortion", "initial_linear_transform",
           "sample_image", "map_grid"]
