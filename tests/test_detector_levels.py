"""detkit.models.detector.check_head_levels: a dense head's strides against the FPN's levels, checked when the
detector is built (exit 2, one message naming both keys, nothing written) instead of a shape error at the first
step or, with as many strides as levels but the wrong ones, a run that trains on misplaced points."""

from __future__ import annotations

import pytest

from tests.cli_runner import tiny_shapes
from tests.test_safety_config import FCOS_CFG, fails

CASES = [
    (["model.neck.extra_levels=0"], "model.head.strides has 5 strides [8, 16, 32, 64, 128] for model.neck's 3 "
     "levels (3 backbone maps, model.backbone.out_indices, + 0 extra, model.neck.extra_levels); set "
     "model.head.strides: [8, 16, 32]"),
    (["model.backbone.out_indices=[0,1,2,3]"], "model.head.strides has 5 strides [8, 16, 32, 64, 128] for "
     "model.neck's 6 levels (4 backbone maps, model.backbone.out_indices, + 2 extra, model.neck.extra_levels); "
     "set model.head.strides: [4, 8, 16, 32, 64, 128]"),
    (["model.backbone.out_indices=[0,1,2]"], "model.head.strides [8, 16, 32, 64, 128] are not the strides of "
     "model.neck's 5 levels"),
    (["model.type=GFL", "model.head={type: GFLHead, num_classes: 4, strides: [8, 16, 32, 64]}"],
     "model.head.strides has 4 strides [8, 16, 32, 64] for model.neck's 5 levels"),
]


@pytest.mark.parametrize("overrides, message", CASES, ids=["no_extra", "p2_5_strides", "p2_shifted", "gfl"])
def test_head_strides_must_match_the_neck_levels(tmp_path, capsys, overrides, message):
    fails(tmp_path, capsys, ["train", "--config", str(FCOS_CFG), "--work-dir", str(tmp_path / "work"), "--device",
                             "cpu", "--set", *tiny_shapes(tmp_path / "data"), *overrides], message)
