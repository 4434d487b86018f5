"""Transforms as ``torch.nn.Module``: ``forward(points) -> points`` on world coordinates (mm).

A transform maps a point x of the common space Ω into the world space of one image or of the
atlas (DESIGN.md, "Geometry"): samples are pulled back, ``I_i(T_i(x))``. Registration transforms
(rigid, affine, FFD, SVF) share this interface; here only the identity is needed, which places
the images in a common space by their headers alone.
"""

from __future__ import annotations

import torch
from torch import nn


class IdentityTransform(nn.Module):
    """The identity map ``T(x) = x``: images are related by their headers only."""

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        """Parameters: points ``[..., ndim]`` world mm. Returns the same tensor."""
        return points

    def inverse(self) -> "IdentityTransform":
        return self
