"""The base dataset configs (configs/_base_/datasets/) list ``eval.tiles: null``: every config loads and validates
with it, and ``--set eval.tiles=...`` turns sliced evaluation on for any config built on them."""

from __future__ import annotations

from pathlib import Path

import pytest

from detkit.config import load_config
from detkit.engine.evaluator import EvalSettings
from detkit.ops.tiles import TileSettings

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(ROOT.glob("configs/*/*.yaml"))


def test_base_dataset_configs_list_eval_tiles_null():
    for base in sorted(ROOT.glob("configs/_base_/datasets/*.yaml")):
        assert load_config(base)["eval"]["tiles"] is None, base


@pytest.mark.parametrize("config", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_config_validates_its_eval_section(config):
    tiles = EvalSettings.from_config(load_config(config)).tiles
    assert tiles is None or isinstance(tiles, TileSettings)


def test_set_eval_tiles_on_a_config_built_on_a_base():
    cfg = load_config(ROOT / "configs/gfl/gfl_r18_fpn_bccd.yaml", ["eval.tiles={size: 512, overlap: 0.2}"])
    assert EvalSettings.from_config(cfg).tiles == TileSettings(size=512, overlap=0.2)
