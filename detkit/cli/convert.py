"""``convert``: a Pascal VOC or YOLO split written as a COCO json (the conversion VOCDataset / YOLODataset use in
memory). The json's ``file_name`` entries are relative to the image folder: read it back with
``{type: CocoDataset, ann_file: val.json, img_dir: <data-root>/<img-dir>}``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from detkit.files import is_inside, replaced_on_success
from detkit.registry import ConfigError

DESCRIPTION = ("Write a Pascal VOC or YOLO split as a COCO json. Its file_name entries are relative to the image "
               "folder: read it back with {type: CocoDataset, ann_file: val.json, img_dir: <data-root>/<img-dir>}.")
EXAMPLES = """examples:
  python tools/convert.py voc --data-root VOC2007 --split-file ImageSets/Main/val.txt --out val.json
  python tools/convert.py yolo --data-root my_data --img-dir images/val --label-dir labels/val \\
      --names data.yaml --out val.json"""


def yolo_names_arg(args: argparse.Namespace) -> str | list[str]:
    """``--names``: one data.yaml path, or the class names."""
    one = len(args.names) == 1 and args.names[0].endswith((".yaml", ".yml"))
    return args.names[0] if one else args.names


def checked_out(args: argparse.Namespace) -> Path:
    """``--out``, refused when writing it would replace an input or add a file to the label folder."""
    out, root = Path(args.out), Path(args.data_root)
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give a file path such as {out / 'annotations.json'}")
    voc = args.format == "voc"
    labels, flag = (root / args.ann_dir, "--ann-dir") if voc else (root / args.label_dir, "--label-dir")
    if is_inside(out, labels):
        raise ConfigError(f"--out {out} is inside the {'VOC annotation' if voc else 'YOLO label'} folder {labels} "
                          f"({flag}), where it would replace or sit among the files detkit reads; write the json "
                          f"outside that folder")
    inputs = [root / args.split_file] if voc and args.split_file else []
    names = None if voc else yolo_names_arg(args)
    if isinstance(names, str):
        inputs.append(root / names)
    for given in inputs:
        if out.resolve() == given.resolve():
            raise ConfigError(f"--out {out} is the input file {given}; give another file name")
    return out


def cmd_convert(args: argparse.Namespace) -> int:
    from detkit.data.voc import voc_to_coco  # lazy (and below): pycocotools, torch, kept out of --help
    from detkit.data.yolo import yolo_to_coco

    out = checked_out(args)
    if args.format == "voc":
        dataset, _ = voc_to_coco(args.data_root, args.split_file, args.ann_dir, args.classes)
    else:
        dataset = yolo_to_coco(args.data_root, args.img_dir, args.label_dir, yolo_names_arg(args), args.classes)
    image_dir = Path(args.data_root, args.img_dir)
    if any(out.resolve() == (image_dir / image["file_name"]).resolve() for image in dataset["images"]):
        raise ConfigError(f"--out {out} is one of the input images; give another file name")
    out.parent.mkdir(parents=True, exist_ok=True)
    with replaced_on_success(out) as tmp:  # a failed write leaves an existing --out as it was
        tmp.write_text(json.dumps(dataset))
    ignored = sum(a["iscrowd"] for a in dataset["annotations"])
    print(f"wrote {out}: {len(dataset['images'])} images, {len(dataset['annotations'])} boxes ({ignored} ignored), "
          f"classes {[c['name'] for c in dataset['categories']]}; image folder {image_dir}")
    return 0


def add_convert_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="VOC xml / YOLO txt -> COCO json (also: tools/convert.py)",
                       description=DESCRIPTION, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    formats = p.add_subparsers(dest="format", required=True)
    voc = formats.add_parser("voc", help="Pascal VOC xml")
    voc.add_argument("--split-file", help="image id list relative to --data-root (default: every xml of --ann-dir)")
    voc.add_argument("--ann-dir", default="Annotations")
    voc.add_argument("--img-dir", default="JPEGImages")
    yolo = formats.add_parser("yolo", help="YOLO txt (Ultralytics layout)")
    yolo.add_argument("--img-dir", default="images/train")
    yolo.add_argument("--label-dir", default="labels/train")
    yolo.add_argument("--names", nargs="+", default=["data.yaml"],
                      help="class names by YOLO id, or one data.yaml path relative to --data-root")
    for parser in (voc, yolo):
        parser.add_argument("--data-root", required=True)
        parser.add_argument("--classes", nargs="+", help="keep only these classes, labelled in this order")
        parser.add_argument("--out", required=True, help="the COCO json to write")
        parser.set_defaults(func=cmd_convert)
