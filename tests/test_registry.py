"""Registry: registration, building, and the error messages users see for bad specs."""

import subprocess
import sys

import pytest

from detkit.losses import LOSSES, build_loss
from detkit.registry import (
    REGISTRIES,
    ConfigError,
    Registry,
    UnknownTypeError,
    build_path,
)
from tests.cli_runner import run_main


def make_registry() -> Registry:
    reg = Registry("widgets")

    @reg.register()
    class Gear:
        """A gear."""

        def __init__(self, teeth: int, module: float = 1.0) -> None:
            self.teeth, self.module = teeth, module

    reg.register(lambda size=3: ("sprocket", size), name="Sprocket")
    return reg


def test_register_and_build_with_defaults_and_caller_defaults():
    reg = make_registry()
    gear = reg.build({"type": "Gear", "teeth": 12})
    assert (gear.teeth, gear.module) == (12, 1.0)
    assert reg.build({"type": "Gear", "teeth": 5}, module=2.0).module == 2.0
    assert reg.build({"type": "Gear", "teeth": 5, "module": 3.0}, module=2.0).module == 3.0
    assert reg.build({"type": "Sprocket"}) == ("sprocket", 3)
    assert list(reg) == ["Gear", "Sprocket"] and "Gear" in reg and len(reg) == 2


def test_duplicate_name_raises():
    reg = make_registry()
    with pytest.raises(KeyError, match="already holds 'Gear'"):
        reg.register(lambda: None, name="Gear")


def test_unknown_type_names_registry_type_close_matches_and_known_names():
    with pytest.raises(UnknownTypeError) as info:
        build_loss({"type": "GIouLoss"})
    msg = str(info.value)
    assert "unknown losses type 'GIouLoss'" in msg
    assert "Did you mean 'GIoULoss'" in msg
    for name in LOSSES:
        assert name in msg
    assert isinstance(info.value, KeyError)  # docs/architecture.md: unknown type is a KeyError


def test_unknown_argument_names_argument_type_and_accepted_parameters():
    with pytest.raises(ConfigError) as info:
        build_loss({"type": "FocalLoss", "gama": 2.0})
    msg = str(info.value)
    assert "FocalLoss got an unknown argument 'gama'" in msg
    assert "Did you mean 'gamma'" in msg
    assert "gamma=2.0, alpha=0.25, class_weight=None, reduction='mean', loss_weight=1.0" in msg


def test_missing_argument_names_it():
    reg = make_registry()
    with pytest.raises(ConfigError, match="Gear is missing the required argument 'teeth'.*accepts: teeth, module=1.0"):
        reg.build({"type": "Gear"})


def test_missing_type_and_non_mapping_spec():
    with pytest.raises(ConfigError, match="spec has no 'type' key"):
        build_loss({"gamma": 2.0})
    with pytest.raises(ConfigError, match="expected a losses spec"):
        build_loss("FocalLoss")


def test_errors_carry_the_nested_config_path():
    with build_path("model.head"):
        with pytest.raises(ConfigError, match=r"^model\.head\.losses\.bbox: GIoULoss got an unknown argument 'beta'"):
            build_loss({"type": "GIoULoss", "beta": 1.0}, key="losses.bbox")
        with pytest.raises(UnknownTypeError, match=r"^model\.head\.losses\.cls: unknown losses type"):
            build_loss({"type": "Nope"}, key="losses.cls")


def test_all_registries_exist():
    assert set(REGISTRIES) == {"losses", "backbones", "necks", "heads", "detectors", "assigners",
                               "datasets", "transforms", "samplers", "optimizers", "schedulers", "hooks", "writers",
                               "weight_schedules"}


@pytest.mark.slow
def test_list_command_shows_every_loss_with_parameters():
    out = subprocess.run([sys.executable, "-m", "detkit", "list", "losses"], capture_output=True,
                         text=True, check=True).stdout
    for name in ["FocalLoss", "CrossEntropyLoss", "SmoothL1Loss", "L1Loss", "IoULoss", "GIoULoss",
                 "DIoULoss", "CIoULoss", "GaussianFocalLoss"]:
        assert f"  {name}(" in out
    assert "IoULoss(mode='log', eps=1e-06, reduction='mean', loss_weight=1.0)" in out
    assert "Sigmoid focal loss on logits" in out


def test_list_command_rejects_unknown_registry():
    proc = run_main("list", "lossez")  # in process: the test above starts `python -m detkit` once already
    assert proc.returncode == 2 and "unknown registry 'lossez'" in proc.stderr
