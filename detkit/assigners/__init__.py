"""Target assigners: GT boxes + head geometry -> dense targets, whole batch at once, on device."""

from detkit.assigners.atss import ATSSAssigner
from detkit.assigners.base import AssignResult, DenseAssigner
from detkit.assigners.centernet import CenterNetAssigner, gaussian_radius
from detkit.assigners.fcos import FCOSAssigner, fcos_targets
from detkit.assigners.simota import SimOTAAssigner
from detkit.assigners.task_aligned import TaskAlignedAssigner

__all__ = ["AssignResult", "DenseAssigner", "ATSSAssigner", "FCOSAssigner", "CenterNetAssigner", "SimOTAAssigner",
           "TaskAlignedAssigner", "fcos_targets", "gaussian_radius"]
