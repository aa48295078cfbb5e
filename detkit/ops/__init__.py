"""Tensor operations shared by the heads and assigners: boxes, point priors, NMS.

Small typed functions in the style of ``torchvision.ops`` (which they use where it has the op),
without module state, taking whole batches.
"""

from detkit.ops.boxes import (
           box_around_origin,
           box_centers,
           box_clip,
           box_distance_decode,
           box_distance_encode,
           box_iou_aligned,
)
from detkit.ops.nms import image_sizes_of, nms_padded, nms_per_image, topk_min
from detkit.ops.priors import Priors, dense_points, gather_cells, grid_steps

__all__ = ["box_around_origin", "box_centers", "box_clip", "box_distance_decode", "box_distance_encode",
           "box_iou_aligned", "gather_cells", "image_sizes_of", "nms_padded", "nms_per_image", "topk_min", "Priors",
           "dense_points", "grid_steps"]
