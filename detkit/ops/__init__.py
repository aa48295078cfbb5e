"""Tensor operations shared by the heads and assigners: boxes, point priors, NMS.

Small typed functions in the style of ``torchvision.ops`` (which they use where it has the op),
without module state, taking whole batches.
"""

from detkit.ops.boxes import (
           aligned_box_iou,
           bbox2distance,
           clip_boxes,
           distance2bbox,
           gather_cells,
           ltrb_to_boxes,
)
from detkit.ops.nms import image_sizes_of, nms_padded, nms_per_image, topk_min
from detkit.ops.priors import Priors, dense_points, grid_steps

__all__ = ["aligned_box_iou", "bbox2distance", "clip_boxes", "distance2bbox", "gather_cells", "ltrb_to_boxes",
           "image_sizes_of", "nms_padded", "nms_per_image", "topk_min", "Priors", "dense_points", "grid_steps"]
