"""Target assigners: GT boxes + head geometry -> dense targets, whole batch at once, on device."""

from detkit.assigners.atss import ATSSAssigner
from detkit.assigners.base import AssignResult, DenseAssigner
from detkit.assigners.centernet import CenterNetAssigner, gaussian_radius
from detkit.assigners.fcos import FCOSAssigner, fcos_targets

__all__ = ["AssignResult", "DenseAssigner", "ATSSAssigner", "FCOSAssigner", "CenterNetAssigner", "fcos_targets",
           "gaussian_radius"]

# TEMPORARY (lead, integration): detkit/bench still imports the old name; removed once it uses detkit.ops.dense_points
from detkit.ops.priors import dense_points as fcos_points  # noqa: E402,F401
