"""Datasets (COCO json, Pascal VOC xml, YOLO txt, synthetic shapes), transforms, collate and loaders."""

from detkit.data.coco import CocoDataset, DatasetError
from detkit.data.collate import collate_detection
from detkit.data.loader import build_dataloader, build_dataset
from detkit.data.shapes import ShapesDataset
from detkit.data.tiled import TiledDataset
from detkit.data.transforms import build_transforms
from detkit.data.voc import VOCDataset
from detkit.data.yolo import YOLODataset

__all__ = ["CocoDataset", "VOCDataset", "YOLODataset", "ShapesDataset", "TiledDataset", "DatasetError", "build_dataset",
           "build_dataloader", "build_transforms", "collate_detection"]
