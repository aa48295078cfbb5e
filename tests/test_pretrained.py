"""Pretrained weights by name, ``load_from`` and the exact torchvision FCOS conversion (no network:
the torch.hub cache is pre-seeded in a temporary ``TORCH_HOME``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision.models import ResNet18_Weights, resnet18
from torchvision.models.detection import FCOS_ResNet50_FPN_Weights, fcos_resnet50_fpn

from detkit.config import load_config
from detkit.engine.load_from import load_pretrained
from detkit.models import build_detector
from detkit.models.backbones import ResNet
from detkit.models.convert import coco80_rows, convert_torchvision_fcos
from detkit.models.weights import cached_file
from detkit.registry import ConfigError
from tests.detections import paired_max_diff

ROOT = Path(__file__).resolve().parents[1]
FINETUNE_CFG = ROOT / "configs/fcos/fcos_r50_fpn_finetune_bccd.yaml"


@pytest.fixture
def torch_home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    (tmp_path / "torch_home/hub/checkpoints").mkdir(parents=True)
    return tmp_path / "torch_home"


def no_network(monkeypatch) -> None:
    def refuse(url, dst, *a, **k):
        raise OSError(f"<urlopen error [Errno -3] no network in tests: {url}>")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


def test_backbone_weights_by_torchvision_name_come_from_the_hub_cache(torch_home, monkeypatch):
    no_network(monkeypatch)
    torch.manual_seed(0)
    reference = resnet18()
    file = cached_file(ResNet18_Weights.IMAGENET1K_V1.url)
    assert file == torch_home / "hub/checkpoints/resnet18-f37072fd.pth"
    torch.save(reference.state_dict(), file)
    for name in ("torchvision:ResNet18_Weights.IMAGENET1K_V1", "torchvision:DEFAULT"):
        backbone = ResNet(depth=18, init_weights=name)
        assert torch.equal(backbone.stem[0].weight, reference.conv1.weight)
        assert torch.equal(backbone.stages[3][1].bn2.running_var, reference.layer4[1].bn2.running_var)


def test_backbone_weight_errors_name_the_key_url_and_path(torch_home, monkeypatch):
    no_network(monkeypatch)
    with pytest.raises(ConfigError, match=r"model\.backbone\.init_weights: torchvision:ResNet18_Weights\.IMAGENET1K_V1 "
                                          r"are weights for another network than this ResNet-50"):
        ResNet(depth=50, init_weights="torchvision:ResNet18_Weights.IMAGENET1K_V1")
    with pytest.raises(ConfigError) as err:
        ResNet(depth=50, init_weights="torchvision:ResNet50_Weights.IMAGENET1K_V2")
    message = str(err.value)
    assert message.startswith("model.backbone.init_weights: cannot download https://download.pytorch.org/models/")
    assert str(torch_home / "hub/checkpoints/resnet50-11ad3fa6.pth") in message
    with pytest.raises(ConfigError, match="ResNet50_Weights has no 'IMAGENET9K'"):
        ResNet(depth=50, init_weights="torchvision:ResNet50_Weights.IMAGENET9K")
    with pytest.raises(ConfigError, match="file not found"):
        ResNet(depth=18, init_weights=str(torch_home / "nope.pth"))


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter and BN statistic random (nothing trivially 0 or 1); classifier bias near -3 so that
    torchvision's 0.2 score threshold keeps some but not all points."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("cls_logits.bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 - 3.0)
            elif p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * (2.0 / p[0].numel()) ** 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if name.endswith("weight") else 0.0))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)


@pytest.mark.slow
def test_torchvision_fcos_converts_exactly():
    torch.manual_seed(0)
    tv = fcos_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91).eval()
    randomize(tv)
    cfg = load_config(FINETUNE_CFG, ["model.head.num_classes=91", "model.backbone.norm=BN", "model.head.score_thr=0.2",
                                     "model.head.max_per_img=100000"])  # weights=None: BatchNorm2d in torchvision
    detkit_fcos = build_detector(cfg["model"]).eval()
    missing, unexpected = detkit_fcos.load_state_dict(convert_torchvision_fcos(tv.state_dict()), strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing)
    tv.detections_per_img = 100000  # compare every NMS survivor, P6/P7 ones included
    g = torch.Generator().manual_seed(1)
    for h, w in [(96, 160), (128, 128)]:  # multiples of 32 (no padding); 96x160 has a 1x2 P7
        image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
        tv.transform.min_size, tv.transform.max_size = (min(h, w),), max(h, w)  # torchvision's resize: factor 1
        with torch.no_grad():
            ref = tv([image.float() / 255])[0]
            out = detkit_fcos.predict(image[None])[0]
        db, ds = paired_max_diff(ref, out)
        assert db < 1e-3 and ds < 1e-5, (h, w, db, ds)


def test_coco80_keeps_the_real_classes_in_sorted_id_order():
    rows = coco80_rows()
    assert len(rows) == 80 and rows[0] == 1 and rows[-1] == 90 and 12 not in rows  # 12 is 'N/A'
    state = {"head.classification_head.cls_logits.weight": torch.arange(91.0).view(91, 1, 1, 1),
             "head.classification_head.cls_logits.bias": torch.arange(91.0)}
    out = convert_torchvision_fcos(state, num_classes=80)
    assert out["head.cls_out.bias"].tolist() == [float(r) for r in rows]


def test_load_from_torchvision_coco_fcos_skips_only_the_classifier(torch_home, monkeypatch):
    no_network(monkeypatch)
    torch.manual_seed(0)
    tv = fcos_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    torch.save(tv.state_dict(), cached_file(FCOS_ResNet50_FPN_Weights.COCO_V1.url))
    model = build_detector(load_config(FINETUNE_CFG)["model"])
    report = load_pretrained(model, "torchvision:FCOS_ResNet50_FPN_Weights.COCO_V1")
    own = model.state_dict()
    assert report.splitlines()[0].startswith(f"load_from torchvision:FCOS_ResNet50_FPN_Weights.COCO_V1: "
                                             f"{len(own) - 2} of the model's {len(own)} tensors loaded")
    assert "head.cls_out.weight (91, 256, 3, 3) -> (3, 256, 3, 3)" in report
    assert torch.equal(own["backbone.stages.2.0.conv1.weight"], tv.state_dict()["backbone.body.layer3.0.conv1.weight"])


def test_load_from_weights_of_another_architecture_is_an_error(tmp_path):
    from detkit.engine.checkpoint import save_checkpoint

    other = build_detector({"type": "TorchvisionFCOS", "num_classes": 4, "depth": 18, "fpn_channels": 64})
    save_checkpoint({"model": other.state_dict()}, tmp_path / "tv_fcos.pth")
    fcos = build_detector(load_config(ROOT / "configs/fcos/fcos_r18_fpn_shapes.yaml")["model"])
    with pytest.raises(ConfigError, match=r"load_from .*tv_fcos\.pth: only 0 of the model's \d+ tensors fit"):
        load_pretrained(fcos, str(tmp_path / "tv_fcos.pth"))
