"""What every mvmm network that moves an image shares: a MONAI U-Net whose features give a
stationary velocity field, and the plumbing between the canonical network grid and a case's world.

A network works on the *canonical* network grid (:func:`mvmm.nets.data.canonical_grid`); its dense
velocity output (mm along that grid's axes) is sampled at the control points of mvmm's own
:class:`~mvmm.spatial.nonlinear.StationaryVelocityField` (a cubic B-spline, filled through its
parameter slot) and integrated by scaling and squaring. :meth:`VelocityNet.world_svf` carries the
same field onto a case's world (the network grid is a rigid copy of the canonical one, so the
coefficients rotate with it and ``exp`` commutes with the rigid map).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import nn

from mvmm.core.grid import Grid
from mvmm.nets.data import canonical_grid, world_velocity
from mvmm.spatial.nonlinear import StationaryVelocityField, sample_fields


class VelocityNet(nn.Module):
    """Base of the networks that predict a velocity field (see the module notes).

    Parameters
    ----------
    in_channels : int
    settings : BayesNetSettings or RegNetSettings
        Resolved: ``grid_size``, ``grid_spacing``, ``channels``, ``features``, ``control_spacing``,
        ``squarings``.

    Submodules ``backbone`` (MONAI ``UNet``) and ``velocity_head`` (a 3-voxel convolution to ndim
    channels, initialised near zero as VoxelMorph's flow layer: training starts at the identity).
    """

    def __init__(self, in_channels: int, settings):
        super().__init__()
        from monai.networks.nets import UNet  # imported when a network is built: `mvmm --help` stays fast

        self.settings = settings
        self.grid: Grid = canonical_grid(settings)
        ndim = self.grid.ndim
        self.backbone = UNet(spatial_dims=ndim, in_channels=in_channels, out_channels=settings.features,
                             channels=tuple(settings.channels), strides=(2,) * (len(settings.channels) - 1),
                             num_res_units=1)
        conv = nn.Conv3d if ndim == 3 else nn.Conv2d
        self.velocity_head = conv(settings.features, ndim, kernel_size=3, padding=1)
        nn.init.normal_(self.velocity_head.weight, std=1e-5)
        nn.init.zeros_(self.velocity_head.bias)
        # a template SVF fixes the control grid; each forward pass fills a copy's slot (kept in a
        # tuple: not a submodule, so its identity parameters are neither trained nor saved)
        control = self.grid.resampled(settings.control_spacing, pad=2)
        template = StationaryVelocityField(self.grid, params=torch.zeros((ndim,) + control.shape),
                                           control_grid=control, steps=settings.squarings)
        self._svf_template = (template,)
        self.register_buffer("_points", self.grid.world_points(dtype=torch.float32), persistent=False)
        self.register_buffer("_control_points", control.world_points(dtype=torch.float32), persistent=False)

    @property
    def control_grid(self) -> Grid:
        return self._svf_template[0].control_grid

    def svf(self, velocity: torch.Tensor) -> StationaryVelocityField:
        """``exp(v)`` on the canonical grid for coefficients ``[(B,) ndim, *control]``."""
        return self._svf_template[0].with_params(velocity)

    def features_and_velocity(self, inputs: torch.Tensor):
        """``inputs [B, C, *S]`` → features ``[B, F, *S]`` and velocity coefficients ``[B, ndim, *control]``."""
        features = self.backbone(inputs)
        dense = self.velocity_head(features)  # [B, ndim, *S], mm along the grid's axes
        control = self._control_points.expand((inputs.shape[0],) + tuple(self._control_points.shape))
        return features, sample_fields(dense, self.grid, control, "border").movedim(-1, 1).contiguous()

    def pull_back(self, fields: torch.Tensor, svf: StationaryVelocityField, padding: str = "border") -> torch.Tensor:
        """``fields [B, C, *S]`` on the canonical grid sampled at ``exp(v)(x)``: ``[B, C, *S]``."""
        points = self._points.expand((fields.shape[0],) + tuple(self._points.shape))
        moved = points + svf.displacement(points)
        return sample_fields(fields, self.grid, moved, padding).movedim(-1, 1)

    def world_svf(self, velocity: torch.Tensor, grid: Grid,
                  canonical_field: Optional[torch.Tensor] = None) -> StationaryVelocityField:
        """The SVF of coefficients ``[ndim, *control]`` (canonical axes) for a case whose network grid
        is ``grid``: the same deformation, as a transform of that case's world (fixed, no gradient).

        ``canonical_field`` ``[ndim, *field]``: ``exp(v) − id`` already integrated on the canonical
        field grid (the prediction's :meth:`svf`, this case's row); rotated into the case's axes, it is
        reused instead of integrating again (the two field grids differ by the rigid map only).
        """
        canonical = self.grid
        rotation = grid.direction_matrix @ canonical.direction_matrix.T
        matrix = np.eye(grid.ndim + 1)
        matrix[:-1, :-1] = rotation
        matrix[:-1, -1] = grid.center_world() - rotation @ canonical.center_world()
        svf = StationaryVelocityField(grid, params=world_velocity(velocity.detach(), grid),
                                      control_grid=self.control_grid.moved(matrix), steps=self.settings.squarings)
        if canonical_field is not None:
            svf.reuse_displacement_field(world_velocity(canonical_field.detach(), grid))
        return svf
