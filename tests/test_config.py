"""Config loading: _base_ inheritance, merge rules, overrides and error messages."""

from pathlib import Path

import pytest
import yaml

from detkit.config import dump_config, load_config, merge
from detkit.registry import ConfigError


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    write(tmp_path / "_base_/schedule.yaml", "optimizer: {type: SGD, lr: 0.01, momentum: 0.9}\n"
                                             "train: {epochs: 12, seed: 0}\n")
    write(tmp_path / "_base_/model.yaml", "_base_: schedule.yaml\n"
                                          "model:\n  type: FCOS\n  head:\n    num_classes: 80\n"
                                          "    losses:\n      bbox: {type: GIoULoss, loss_weight: 2.0, eps: 1.0e-7}\n"
                                          "      cls: {type: FocalLoss, gamma: 2.0}\n")
    write(tmp_path / "exp/child.yaml", "_base_: [../_base_/model.yaml]\n"
                                       "model:\n  head:\n    num_classes: 3\n"
                                       "    losses:\n      bbox: {type: IoULoss, mode: linear}\n"
                                       "      cls: {alpha: 0.5}\n"
                                       "train: {epochs: 2}\n")
    return tmp_path


def test_base_chain_merges_recursively_and_drops_base_key(tree):
    cfg = load_config(tree / "exp/child.yaml")
    assert "_base_" not in cfg
    assert cfg["optimizer"] == {"type": "SGD", "lr": 0.01, "momentum": 0.9}
    assert cfg["train"] == {"epochs": 2, "seed": 0}
    assert cfg["model"]["head"]["num_classes"] == 3
    # a different type replaces the spec whole: GIoU's loss_weight/eps do not leak into IoULoss
    assert cfg["model"]["head"]["losses"]["bbox"] == {"type": "IoULoss", "mode": "linear"}
    # no type given: merged key by key
    assert cfg["model"]["head"]["losses"]["cls"] == {"type": "FocalLoss", "gamma": 2.0, "alpha": 0.5}


def test_lists_replace_not_merge():
    assert merge({"a": [1, 2], "b": {"c": 1}}, {"a": [3]}) == {"a": [3], "b": {"c": 1}}


def test_overrides_parse_yaml_values_and_keep_siblings(tree):
    cfg = load_config(tree / "exp/child.yaml", [
        "model.head.losses.bbox.type=DIoULoss", "train.epochs=5", "optimizer.lr=1e-3",
        "model.head.losses.cls.new_arg=[1, 2]", "train.seed=null"])
    assert cfg["model"]["head"]["losses"]["bbox"] == {"type": "DIoULoss", "mode": "linear"}
    assert cfg["train"]["epochs"] == 5 and cfg["train"]["seed"] is None
    assert cfg["optimizer"]["lr"] == 1e-3
    assert cfg["model"]["head"]["losses"]["cls"]["new_arg"] == [1, 2]


def test_override_list_index(tmp_path):
    path = write(tmp_path / "c.yaml", "data:\n  train:\n    transforms: [{type: Flip, p: 0.5}]\n")
    cfg = load_config(path, ["data.train.transforms.0.p=1.0"])
    assert cfg["data"]["train"]["transforms"][0]["p"] == 1.0
    with pytest.raises(ConfigError, match="not an index of a list of 1"):
        load_config(path, ["data.train.transforms.3.p=1.0"])


@pytest.mark.parametrize("item, message", [
    ("modle.head.num_classes=3", "unknown key 'modle'. Did you mean 'model'"),
    ("model.haed.num_classes=3", "unknown key 'model.haed'. Did you mean 'head'"),
    ("train.epocs=3", "unknown key 'train.epocs'. Did you mean 'epochs'"),
    ("model.head.losses.bbxo.type=IoULoss", "unknown key 'model.head.losses.bbxo'. Did you mean 'bbox'"),
    ("train.epochs", "must look like key.path=VALUE"),
    ("train.epochs.x=1", "'train.epochs' is the value 2, not a section with keys"),
])
def test_bad_override_is_an_error_with_did_you_mean(tree, item, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        load_config(tree / "exp/child.yaml", [item])


def test_override_into_a_null_section_says_to_set_it_whole(tmp_path):
    path = write(tmp_path / "c.yaml", "eval:\n  tiles: null\n")
    with pytest.raises(ConfigError, match=r"^override 'eval.tiles.size=512': 'eval.tiles' is null, not a section with "
                                          r"keys; set it whole: eval.tiles=\{size: ...\}$"):
        load_config(path, ["eval.tiles.size=512"])
    assert load_config(path, ["eval.tiles={size: 512}"])["eval"]["tiles"] == {"size": 512}


def test_override_may_create_known_top_level_section(tree):
    assert load_config(tree / "exp/child.yaml", ["work_dir=/tmp/x"])["work_dir"] == "/tmp/x"


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path / "bad.yaml", "model:\n  type: FCOS\n  head: [1, 2\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value) and ":4:" in str(info.value)


def test_missing_base_names_the_file(tmp_path):
    path = write(tmp_path / "c.yaml", "_base_: nothere.yaml\nmodel: {}\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: _base_ file not found: nothere\.yaml"):
        load_config(path)


def test_missing_config_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "none.yaml")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(write(tmp_path / "l.yaml", "- 1\n- 2\n"))


def test_base_cycle_is_reported(tmp_path):
    write(tmp_path / "a.yaml", "_base_: b.yaml\n")
    write(tmp_path / "b.yaml", "_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="_base_ cycle"):
        load_config(tmp_path / "a.yaml")


def test_dump_config_round_trips(tree, tmp_path):
    cfg = load_config(tree / "exp/child.yaml", ["optimizer.lr=0.5"])
    dump_config(cfg, tmp_path / "out/config.yaml")
    assert load_config(tmp_path / "out/config.yaml") == cfg
    assert yaml.safe_load((tmp_path / "out/config.yaml").read_text()) == cfg


def test_imports_section_registers_user_components(tmp_path, monkeypatch):
    from detkit.config import import_modules
    from detkit.losses import LOSSES, build_loss

    (tmp_path / "my_losses_pkg.py").write_text(
        "from detkit.losses import WeightedLoss\nfrom detkit.registry import LOSSES\n\n"
        "@LOSSES.register()\nclass SquaredLoss(WeightedLoss):\n"
        "    def elementwise(self, pred, target):\n        return (pred - target) ** 2\n")
    monkeypatch.chdir(tmp_path)
    import_modules({"imports": ["my_losses_pkg"]})
    try:
        import torch

        loss = build_loss({"type": "SquaredLoss", "loss_weight": 2.0})
        assert loss(torch.tensor([3.0]), torch.tensor([1.0])).item() == 8.0
    finally:
        LOSSES._entries.pop("SquaredLoss", None)
    with pytest.raises(ConfigError, match="imports: cannot import 'no_such_module_xyz'"):
        import_modules({"imports": ["no_such_module_xyz"]})


def test_unknown_top_level_section_in_a_file_is_an_error(tmp_path):
    path = write(tmp_path / "c.yaml", "optimzer: {type: SGD, lr: 0.5}\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: optimzer: unknown top-level section\. Did you mean 'optimizer'"):
        load_config(path)
