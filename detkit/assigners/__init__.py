"""Target assigners: GT boxes + head geometry -> dense targets, whole batch at once, on device."""

from detkit.assigners.centernet import CenterNetAssigner, gaussian_radius
from detkit.assigners.fcos import FCOSAssigner, fcos_points

__all__ = ["FCOSAssigner", "CenterNetAssigner", "fcos_points", "gaussian_radius"]
