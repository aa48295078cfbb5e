"""detkit.models.detector.check_head_levels: a head's strides (a dense head's ``strides``, CenterNet's ``stride``)
against the strides the neck reports for its outputs (``neck.strides``), checked when the detector is built (exit 2,
one message naming the key and what to set, nothing written) instead of a shape error at the first step or, with as
many strides as levels but the wrong ones, a run that trains on misplaced points."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from detkit.models import build_detector
from detkit.registry import NECKS, ConfigError
from tests.cli_runner import tiny_shapes
from tests.test_safety_config import FCOS_CFG, fails

CENTERNET_CFG = Path(__file__).resolve().parents[1] / "configs/centernet/centernet_r18_shapes.yaml"
FPN_ON_C3_C5 = "(FPN on model.backbone's maps of strides [8, 16, 32])"

CASES = [
    (FCOS_CFG, ["model.neck.extra_levels=0"], "model.head.strides has 5 strides [8, 16, 32, 64, 128] for model.neck's "
     f"3 levels, strides [8, 16, 32] {FPN_ON_C3_C5}; set model.head.strides: [8, 16, 32]"),
    (FCOS_CFG, ["model.backbone.out_indices=[0,1,2,3]"], "model.head.strides has 5 strides [8, 16, 32, 64, 128] for "
     "model.neck's 6 levels, strides [4, 8, 16, 32, 64, 128] (FPN on model.backbone's maps of strides "
     "[4, 8, 16, 32]); set model.head.strides: [4, 8, 16, 32, 64, 128]"),
    (FCOS_CFG, ["model.backbone.out_indices=[0,1,2]"], "model.head.strides [8, 16, 32, 64, 128] are not the strides "
     "of model.neck's 5 levels, strides [4, 8, 16, 32, 64] (FPN on model.backbone's maps of strides [4, 8, 16]); "
     "set model.head.strides: [4, 8, 16, 32, 64]"),
    (FCOS_CFG, ["model.type=GFL", "model.head={type: GFLHead, num_classes: 4, strides: [8, 16, 32, 64]}"],
     "model.head.strides has 4 strides [8, 16, 32, 64] for model.neck's 5 levels, strides [8, 16, 32, 64, 128] "
     f"{FPN_ON_C3_C5}; set model.head.strides: [8, 16, 32, 64, 128]"),
    # a neck other than the FPN: its one stride-4 map under FCOS's five-level head (was a ValueError at the 1st step)
    (FCOS_CFG, ["model.neck={type: CenterNetNeck, channels: [16, 16, 16], use_deconv: false}"],
     "model.head.strides has 5 strides [8, 16, 32, 64, 128] for model.neck's 1 level, strides [4] (CenterNetNeck on "
     "model.backbone's maps of strides [8, 16, 32]); set model.head.strides: [4]"),
    # CenterNet's one stride: two up-sampling stages end at stride 8, the head still decodes at 4
    (CENTERNET_CFG, ["model.neck.channels=[32,16]"], "model.head.stride 4 is not the stride of the map the head "
     "reads, the last of model.neck's 1 level, strides [8] (CenterNetNeck on model.backbone's maps of strides "
     "[4, 8, 16, 32]); set model.head.stride: 8"),
]


@pytest.mark.parametrize("config, overrides, message", CASES,
                         ids=["no_extra", "p2_5_strides", "p2_shifted", "gfl", "fcos_on_centernet_neck",
                              "centernet_stride"])
def test_head_strides_must_match_the_neck_levels(tmp_path, capsys, config, overrides, message):
    data = [o for o in tiny_shapes(tmp_path / "data") if config == FCOS_CFG or not o.startswith("model.")]
    fails(tmp_path, capsys, ["train", "--config", str(config), "--work-dir", str(tmp_path / "work"), "--device", "cpu",
                             "--set", *data, *overrides], message)


def centernet(neck: dict, out_indices: list[int], stride: int) -> dict:
    return {"type": "CenterNet", "backbone": {"type": "ResNet", "depth": 18, "out_indices": out_indices},
            "neck": neck, "head": {"type": "CenterNetHead", "num_classes": 3, "feat_channels": 8, "stride": stride}}


def test_necks_report_the_strides_of_their_outputs():
    fpn = build_detector(centernet({"type": "FPN", "out_channels": 8, "extra_levels": 2}, [0, 1], stride=32))
    assert fpn.neck.strides == (4, 8, 16, 32)  # the backbone's, then x2 per extra level; the head reads the last
    neck = {"type": "CenterNetNeck", "channels": [8, 8], "use_deconv": False}
    assert build_detector(centernet(neck, [1, 2], stride=4)).neck.strides == (4,)  # 16 halved twice
    with pytest.raises(ConfigError, match=r"^model.neck.channels has 3 up-sampling stages: the coarsest backbone map "
                                          r"\(stride 4\) would end at stride 0.5, not a whole pixel; give fewer"):
        build_detector(centernet({**neck, "channels": [8, 8, 8]}, [0], stride=4))


def test_a_neck_that_reports_no_strides_is_named(monkeypatch):
    class NoStridesNeck(torch.nn.Module):  # a user's neck that ignores the contract
        def __init__(self, in_channels, in_strides):
            super().__init__()
            self.out_channels = in_channels[-1]

    monkeypatch.setitem(NECKS._entries, "NoStridesNeck", NoStridesNeck)  # registered for this test only
    with pytest.raises(ConfigError, match=r"^model.neck \(NoStridesNeck\) does not report the strides of its "
                                          r"outputs: a neck sets self.strides"):
        build_detector(centernet({"type": "NoStridesNeck"}, [3], stride=32))
