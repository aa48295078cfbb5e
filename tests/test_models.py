"""Detectors: building from YAML, loss terms, empty GT, loss swaps, over-fitting, predict decoding."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from detkit.config import load_config
from detkit.models import CenterNetOutputs, FCOSOutputs, build_detector
from detkit.models.detector import pad_targets
from detkit.models.fcos import default_ranges
from detkit.models.weights import weights_enum
from detkit.registry import ConfigError

ROOT = Path(__file__).resolve().parents[1]
IOU_LOSSES = ["IoULoss", "GIoULoss", "DIoULoss", "CIoULoss"]


def tiny_fcos(**head) -> dict:
    return {"type": "FCOS", "backbone": {"type": "ResNet", "depth": 18, "out_indices": [1, 2, 3]},
            "neck": {"type": "FPN", "out_channels": 32, "extra_levels": 2},
            "head": {"type": "FCOSHead", "num_classes": 3, "feat_channels": 32, "num_convs": 1,
                     "assigner": {"type": "FCOSAssigner",
                                  "regress_ranges": [[-1, 16], [16, 32], [32, 64], [64, 128], [128, 1e8]]},
                     **head}}


def tiny_centernet(**head) -> dict:
    return {"type": "CenterNet", "backbone": {"type": "ResNet", "depth": 18, "out_indices": [0, 1, 2, 3]},
            "neck": {"type": "CenterNetNeck", "channels": [64, 32, 32], "use_deconv": False, "skip": True},
            "head": {"type": "CenterNetHead", "num_classes": 3, "feat_channels": 32, **head}}


def batch(size: int = 64, n: int = 2):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0], [20.0, 10.0, 60.0, 60.0]]),
                "labels": torch.tensor([0, 2])},
               {"boxes": torch.tensor([[10.0, 10.0, 20.0, 24.0]]), "labels": torch.tensor([1])}][:n]
    return images, targets


@pytest.mark.parametrize("spec, terms", [(tiny_fcos(), {"cls", "bbox", "centerness"}),
                                         (tiny_centernet(), {"heatmap", "wh", "offset"})])
def test_build_train_step_and_predict(spec, terms):
    torch.manual_seed(0)
    model = build_detector(spec)
    images, targets = batch()
    losses = model.loss(images, targets)
    assert set(losses) == terms and all(torch.isfinite(v) and v > 0 for v in losses.values())
    sum(losses.values()).backward()
    model.eval()
    out = model.predict(images, torch.tensor([[64, 64], [50, 40]]))
    assert len(out) == 2
    for det, (h, w) in zip(out, [(64, 64), (50, 40)]):
        assert det["boxes"].shape[1:] == (4,) and det["scores"].shape == det["labels"].shape
        assert (det["scores"][:-1] >= det["scores"][1:]).all()  # sorted by score
        assert (det["boxes"][:, 0::2] <= w).all() and (det["boxes"][:, 1::2] <= h).all()
        assert (det["boxes"] >= 0).all() and (det["labels"] < 3).all()


@pytest.mark.parametrize("spec, zero_terms", [(tiny_fcos(), ["bbox", "centerness"]),
                                              (tiny_centernet(), ["wh", "offset"])])
def test_empty_gt_gives_finite_cls_and_exact_zero_box_terms(spec, zero_terms):
    model = build_detector(spec)
    images, _ = batch()
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}] * 2
    losses = model.loss(images, empty)
    cls = losses["cls"] if "cls" in losses else losses["heatmap"]
    assert torch.isfinite(cls) and cls > 0
    for term in zero_terms:
        assert losses[term].item() == 0.0
    sum(losses.values()).backward()  # the zeros keep the graph


@pytest.mark.parametrize("loss_type", IOU_LOSSES)
def test_bbox_loss_swaps_through_an_override(loss_type):
    cfg = load_config(ROOT / "configs/fcos/fcos_r18_fpn_shapes.yaml", [f"model.head.losses.bbox.type={loss_type}"])
    model = build_detector(cfg["model"])
    assert type(model.head.losses.terms["bbox"][0]).__name__ == loss_type
    images, targets = batch()
    assert torch.isfinite(model.loss(images, targets)["bbox"])


def test_a_term_may_list_several_losses():
    model = build_detector(tiny_fcos(losses={
        "cls": {"type": "FocalLoss"}, "centerness": {"type": "CrossEntropyLoss", "use_sigmoid": True},
        "bbox": [{"type": "GIoULoss", "loss_weight": 2.0}, {"type": "L1Loss", "loss_weight": 0.5}]}))
    images, targets = batch()
    losses = model.loss(images, targets)
    assert set(losses) == {"cls", "centerness", "bbox.GIoULoss", "bbox.L1Loss"}


def test_unknown_loss_term_and_bad_loss_spec_name_the_path():
    with pytest.raises(ConfigError, match=r"losses\.bbx: unknown loss term\. Did you mean 'bbox'"):
        build_detector(tiny_fcos(losses={"cls": {"type": "FocalLoss"}, "bbx": {"type": "GIoULoss"},
                                         "centerness": {"type": "CrossEntropyLoss"}}))
    with pytest.raises(ConfigError, match=r"^model\.head\.losses\.bbox: GIoULoss got an unknown argument 'gamma'"):
        build_detector(tiny_fcos(losses={"cls": {"type": "FocalLoss"}, "bbox": {"type": "GIoULoss", "gamma": 2},
                                         "centerness": {"type": "CrossEntropyLoss"}}))


@pytest.mark.slow
@pytest.mark.parametrize("spec", [tiny_fcos(), tiny_centernet()])
def test_overfits_a_fixed_batch(spec):
    torch.manual_seed(0)
    model = build_detector(spec)
    images, targets = batch()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    first = None
    for _ in range(40):
        total = sum(model.loss(images, targets).values())
        first = first if first is not None else total.item()
        opt.zero_grad()
        total.backward()
        opt.step()
    assert total.item() < 0.5 * first


def test_fcos_predict_decodes_a_known_point():
    model = build_detector(tiny_fcos(score_thr=0.5))
    sizes = [(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)]
    cls = [torch.full((1, 3, h, w), -20.0) for h, w in sizes]
    reg = [torch.zeros(1, 4, h, w) for h, w in sizes]
    ctr = [torch.full((1, 1, h, w), 20.0) for h, w in sizes]
    cls[1][0, 2, 1, 3] = 20.0  # level stride 16, row 1, col 3 -> point (56, 24)
    reg[1][0, :, 1, 3] = torch.tensor([1.0, 0.5, 0.25, 1.0])  # ltrb in stride units
    outputs = FCOSOutputs(cls=cls, ltrb=reg, centerness=ctr)
    det = model.head.predict(outputs, torch.tensor([[64, 64]]))[0]
    assert det["labels"].tolist() == [2] and det["scores"].item() == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(det["boxes"], torch.tensor([[40.0, 16.0, 60.0, 40.0]]))
    det = model.head.predict(outputs, torch.tensor([[30, 58]]))[0]  # clipped to (h=30, w=58)
    torch.testing.assert_close(det["boxes"], torch.tensor([[40.0, 16.0, 58.0, 30.0]]))


def test_fcos_nms_removes_duplicates_per_class_only():
    model = build_detector(tiny_fcos(score_thr=0.1))
    sizes = [(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)]
    cls = [torch.full((1, 3, h, w), -20.0) for h, w in sizes]
    reg = [torch.full((1, 4, h, w), 4.0) for h, w in sizes]  # 64x64 boxes around each point
    ctr = [torch.full((1, 1, h, w), 20.0) for h, w in sizes]
    cls[0][0, 0, 2, 2], cls[0][0, 0, 2, 3] = 3.0, 2.0  # two boxes 8 px apart (IoU 0.78), class 0
    cls[0][0, 1, 2, 2] = 1.0  # the same box as class 1 survives
    det = model.head.predict(FCOSOutputs(cls=cls, ltrb=reg, centerness=ctr), torch.tensor([[64, 64]]))[0]
    assert sorted(det["labels"].tolist()) == [0, 1]


def test_centernet_predict_decodes_a_known_peak():
    model = build_detector(tiny_centernet(score_thr=0.5))
    heat = torch.full((1, 3, 16, 16), -10.0)
    heat[0, 1, 5, 7] = 5.0
    wh = torch.zeros(1, 2, 16, 16)
    wh[0, :, 5, 7] = torch.tensor([4.0, 2.0])
    offset = torch.zeros(1, 2, 16, 16)
    offset[0, :, 5, 7] = torch.tensor([0.5, 0.25])
    det = model.head.predict(CenterNetOutputs(heatmap=heat, wh=wh, offset=offset), torch.tensor([[64, 64]]))[0]
    assert det["labels"].tolist() == [1] and det["scores"].item() == pytest.approx(1 / (1 + math.exp(-5)))
    # centre ((7 + 0.5) * 4, (5 + 0.25) * 4) = (30, 21); size (16, 8)
    torch.testing.assert_close(det["boxes"], torch.tensor([[22.0, 17.0, 38.0, 25.0]]))


def test_centernet_losses_match_the_seed_normalisation():
    model = build_detector(tiny_centernet())
    images, targets = batch()
    outputs = model(images)
    heat, wh = outputs.heatmap, outputs.wh
    boxes, labels, mask = pad_targets(targets, torch.device("cpu"))
    t = model.head.assigner(boxes, labels, mask, 3, tuple(heat.shape[-2:]))
    num = mask.sum()
    feat = wh.permute(0, 2, 3, 1).reshape(2, -1, 2)
    gathered = feat.gather(1, t["index"].unsqueeze(-1).expand(-1, -1, 2))
    m = mask.unsqueeze(-1).expand_as(gathered).float()
    seed_wh = torch.nn.functional.l1_loss(gathered * m, t["wh"] * m, reduction="sum") / (m.sum() + 1e-4)
    losses = model.head.loss(outputs, boxes, labels, mask)
    assert losses["wh"].item() == pytest.approx(0.1 * seed_wh.item(), rel=1e-4)
    assert num == 3


@pytest.mark.slow
def test_default_configs_build():
    for path in sorted((ROOT / "configs").glob("*/*.yaml")):
        if path.parent.name == "_base_":
            continue
        cfg = load_config(path)
        backbone = cfg["model"].get("backbone", {})
        if str(backbone.get("init_weights")).startswith("torchvision:"):  # named weights resolve; no download here
            weights_enum(backbone["init_weights"][len("torchvision:"):], "init_weights")
            backbone["init_weights"] = None
        model = build_detector(copy.deepcopy(cfg["model"]))
        assert sum(p.numel() for p in model.parameters()) > 0, path


def test_labels_beyond_num_classes_are_a_clear_error():
    model = build_detector(tiny_fcos())
    images, _ = batch()
    bad = [{"boxes": torch.tensor([[1.0, 1.0, 9.0, 9.0]]), "labels": torch.tensor([3])}] * 2
    with pytest.raises(ValueError, match=r"labels must lie in 0\.\.2 .*num_classes is 3.*got labels \[3\]"):
        model.loss(images, bad)


def test_fcos_default_ranges_are_open_ended_for_fewer_levels():
    model = build_detector({**tiny_fcos(), "neck": {"type": "FPN", "out_channels": 32, "extra_levels": 0},
                            "head": {"type": "FCOSHead", "num_classes": 3, "feat_channels": 32, "num_convs": 1,
                                     "strides": [8, 16, 32], "assigner": {"type": "FCOSAssigner"}}})
    assert model.head.assigner.regress_ranges[-1].tolist() == [128.0, 1e8]
    assert default_ranges([4, 8, 16]) == [(-1.0, 32.0), (32.0, 64.0), (64.0, 1e8)]  # they follow a P2 level


#: docs/architecture.md's P2 level on the shapes default: C2 from the backbone, six strides and ranges
P2 = ["model.backbone.out_indices=[0,1,2,3]", "model.head.strides=[4,8,16,32,64,128]",
      "model.head.assigner.regress_ranges=[[-1,8],[8,16],[16,32],[32,64],[64,128],[128,1.0e8]]"]


def test_a_p2_level_builds_assigns_positives_on_it_and_trains():
    torch.manual_seed(0)
    small = ["model.neck.out_channels=32", "model.head.feat_channels=32", "model.head.num_convs=1"]
    model = build_detector(load_config(ROOT / "configs/fcos/fcos_r18_fpn_shapes.yaml", P2 + small)["model"])
    images, targets = batch()  # 64 px: P2 is 16 x 16
    outputs = model(images)
    assert [m.shape[-1] for m in outputs.cls] == [16, 8, 4, 2, 1, 1]
    boxes, labels, mask = pad_targets(targets, torch.device("cpu"))
    priors = model.head.priors(outputs.cls)
    assigned = model.head.assigner(priors, boxes, labels, mask, model.num_classes)
    assert assigned.positive[:, priors.levels == 0].any()  # the 10 x 14 box is P2's
    losses = model.head.loss(outputs, boxes, labels, mask)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert len(model.eval().predict(images)) == 2  # decoding over the six levels
