"""Mosaic / MixUp (boxes stay on their objects, seeded like every sample), close_mosaic across a resume,
and RepeatFactorSampler (LVIS repeat factors, resume offsets, DDP shards)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset
from torchvision import tv_tensors

from detkit.config import load_config
from detkit.data import CocoDataset, build_dataloader, build_transforms
from detkit.data.mix import MixUp, Mosaic
from detkit.data.repeat_factor import (
    RepeatFactorSampler,
    image_categories,
    repeat_factors,
)
from detkit.engine import Trainer, load_checkpoint
from detkit.engine.hooks import HOOKS, CheckpointHook
from detkit.engine.hooks.close_mosaic import CloseMosaic
from detkit.registry import ConfigError, UnknownTypeError

#: object ``k`` of the rectangles data set is a solid rectangle of colour ``COLOURS[k]`` and label ``k``
COLOURS = torch.tensor([[200, 60, 60], [60, 200, 60], [60, 60, 200], [200, 200, 60],
                        [200, 60, 200], [60, 200, 200], [250, 130, 60], [130, 60, 250]], dtype=torch.uint8)


class Rectangles(Dataset):
    """4 black images of ``side`` px; image ``i`` holds objects ``2i`` and ``2i + 1`` in its own row band, so
    the objects of different images never overlap (a MixUp pair shows each object on black)."""

    def __init__(self, transforms: list[dict], side: int = 64) -> None:
        self.side, self.loaded = side, []
        self.transforms = build_transforms(transforms)
        self.transforms.bind(self)

    def __len__(self) -> int:
        return 4

    def load(self, i: int):
        self.loaded.append(i)
        image = torch.zeros(3, self.side, self.side, dtype=torch.uint8)
        u = self.side // 16
        boxes = torch.tensor([[u, (4 * i + 1) * u, 6 * u, (4 * i + 3) * u],
                              [8 * u, 4 * i * u, 15 * u, (4 * i + 4) * u]], dtype=torch.float32)
        for k, (x1, y1, x2, y2) in zip((2 * i, 2 * i + 1), boxes.int().tolist()):
            image[:, y1:y2, x1:x2] = COLOURS[k, :, None, None]
        target = {"boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(self.side, self.side)),
                  "labels": torch.tensor([2 * i, 2 * i + 1]), "image_id": i, "orig_size": (self.side, self.side)}
        return tv_tensors.Image(image), target

    def __getitem__(self, i: int):
        return self.transforms(*self.load(i))


def test_mosaic_boxes_are_exactly_the_visible_pixels_of_their_objects():
    data = Rectangles([{"type": "Mosaic", "size": 64}])
    exact = 0
    for seed in range(16):
        torch.manual_seed(seed)
        data.loaded = []
        image, target = data[seed % 4]
        assert image.shape == (3, 64, 64) and target["boxes"].canvas_size == (64, 64)
        for box, k in zip(target["boxes"].int().tolist(), target["labels"]):  # boxes hold their object's colour
            assert (image[:, box[1]:box[3], box[0]:box[2]] == COLOURS[k, :, None, None]).all()
        if len(set(data.loaded)) < 4:  # an image drawn twice: its objects may show twice
            continue
        exact += 1
        boxes = dict(zip(target["labels"].tolist(), target["boxes"].tolist()))
        for k, colour in enumerate(COLOURS):
            ys, xs = torch.nonzero((image == colour[:, None, None]).all(0), as_tuple=True)
            full = 5 * 2 * 4 * 4 if k % 2 == 0 else 7 * 4 * 4 * 4
            if k in boxes:  # the box is the bounding box of the object's visible pixels
                assert boxes[k] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
                assert len(xs) >= 0.1 * full
            else:  # dropped: under min_visible (10%) of the object is left in the output
                assert len(xs) < 0.1 * full
    assert exact >= 3


def test_mosaic_rescales_to_fit_and_keeps_boxes_on_objects():
    data = Rectangles([{"type": "Mosaic", "size": [40, 56], "center_range": [0.8, 1.2]}])
    checked = 0
    for seed in range(6):
        torch.manual_seed(seed)
        image, target = data[1]
        assert image.shape == (3, 40, 56) and target["boxes"].canvas_size == (40, 56)
        for box, label in zip(target["boxes"].round().int().tolist(), target["labels"]):
            x1, y1, x2, y2 = box
            if x2 - x1 >= 3 and y2 - y1 >= 3:  # the inside (resampled edges left out) has the object's colour
                inside = image[:, y1 + 1:y2 - 1, x1 + 1:x2 - 1].flatten(1).float()
                assert (inside - COLOURS[label, :, None].float()).abs().max() <= 2
                checked += 1
    assert checked >= 6


def test_mixup_blends_two_images_and_keeps_both_sets_of_boxes():
    data = Rectangles([{"type": "MixUp", "alpha": 2.0}])
    for seed in range(6):
        torch.manual_seed(seed)
        image, target = data[0]
        labels = target["labels"].tolist()
        assert image.shape == (3, 64, 64) and labels[:2] == [0, 1] and len(labels) == 4
        assert labels[2] % 2 == 0 and labels[3] == labels[2] + 1  # the two objects of one other image
        for box, k in zip(target["boxes"].int().tolist(), labels):
            pixels = image[:, box[1]:box[3], box[0]:box[2]].flatten(1).float()
            assert (pixels == pixels[:, :1]).all()  # one blended colour: r * colour (+ black of the other image)
            ratio = pixels[:, 0] / COLOURS[k].float()
            assert (ratio - ratio.mean()).abs().max() < 0.02


def test_p_zero_is_identity_and_bad_parameters_are_named():
    image, target = Rectangles([]).load(2)
    for transform in (Mosaic(32, p=0.0), MixUp(p=0.0)):
        out_image, out_target = transform(image, target)
        assert out_image is image and out_target is target
    with pytest.raises(ConfigError, match=r"transforms\.1\.p must be a number in \[0, 1\], got 1.5"):
        build_transforms([{"type": "RandomHorizontalFlip"}, {"type": "Mosaic", "size": 64, "p": 1.5}])
    with pytest.raises(ConfigError, match=r"transforms\.0\.p .* got -0.1"):
        build_transforms([{"type": "MixUp", "p": -0.1}])
    with pytest.raises(ConfigError, match=r"transforms\.0\.size"):
        build_transforms([{"type": "Mosaic", "size": [64]}])
    with pytest.raises(RuntimeError, match="build_dataset"):  # never bound to a dataset
        build_transforms([{"type": "Mosaic", "size": 64}])(image, target)


def test_yaml_pipeline_and_sampler_give_the_same_samples_with_0_and_2_workers(tmp_path):
    (tmp_path / "cfg.yaml").write_text(
        "model: {type: FCOS}\n"
        "data:\n  batch_size: 2\n  size_divisor: 16\n  sampler: {type: RepeatFactorSampler, repeat_thr: 0.3}\n"
        f"  train: {{type: ShapesDataset, num_images: 6, image_size: 48, root: {tmp_path}, workers: 1,\n"
        "          transforms: [{type: RandomHorizontalFlip}, {type: Mosaic, size: 64, p: 0.8},\n"
        "                       {type: MixUp, p: 0.5}]}\n")
    data = load_config(tmp_path / "cfg.yaml")["data"]
    runs = []
    for workers in (0, 2):
        loader = build_dataloader({**data, "num_workers": workers}, "train", seed=5)
        assert isinstance(loader.sampler, RepeatFactorSampler)
        loader.sampler.set_epoch(1)
        runs.append(list(loader))
    assert {tuple(b["images"].shape[-2:]) for b in runs[0]} >= {(64, 64)}
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a["images"], b["images"]) and a["image_ids"] == b["image_ids"]
        for ta, tb in zip(a["targets"], b["targets"]):
            assert torch.equal(ta["boxes"], tb["boxes"]) and torch.equal(ta["labels"], tb["labels"])


class Probe(nn.Module):
    """Records the size and a checksum of every training batch."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.seen: list[tuple[int, int, int]] = []

    def forward(self, images, targets):
        self.seen.append((*images.shape[-2:], int(images.long().sum())))
        return {"loss": self.w * images.float().mean()}


def probe_run(work, epochs: int = 4, state=None) -> Probe:
    model = Probe()
    loader = build_dataloader({"train": {}, "batch_size": 2, "num_workers": 0, "size_divisor": 16}, "train",
                              dataset=Rectangles([{"type": "Mosaic", "size": 64}], side=48))
    Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), loader, [CloseMosaic(2), CheckpointHook(keep=0)],
            work_dir=work, device=torch.device("cpu"), epochs=epochs, state=state).train()
    return model


def test_close_mosaic_turns_mixing_off_for_the_last_epochs_also_after_a_resume(tmp_path):
    straight = probe_run(tmp_path / "a").seen  # 4 epochs of 2 steps; mosaics are 64 px, plain images 48
    assert [h for h, _, _ in straight] == [64, 64, 64, 64, 48, 48, 48, 48]
    for finished in (1, 2, 3):  # resume before, at and inside the closed epochs: the same batches
        resumed = probe_run(tmp_path / "a", state=load_checkpoint(tmp_path / f"a/epoch_{finished}.pth")).seen
        assert resumed == straight[2 * finished:]


def test_close_mosaic_restarts_persistent_workers_and_needs_a_mixing_transform():
    data = {"train": {}, "batch_size": 4, "num_workers": 1, "persistent_workers": True, "size_divisor": 16}
    loader = build_dataloader(data, "train", dataset=Rectangles([{"type": "Mosaic", "size": 64}], side=48))
    hook = HOOKS.build({"type": "CloseMosaic", "epochs": 1})
    trainer = SimpleNamespace(loader=loader, epoch=0, max_epochs=2)
    hook.before_train(trainer)
    sizes = []
    for trainer.epoch in (0, 1):
        hook.before_epoch(trainer)
        sizes += [tuple(b["images"].shape[-2:]) for b in loader]
    assert sizes == [(64, 64), (48, 48)]
    plain = build_dataloader(data, "train", dataset=Rectangles([], side=48))
    with pytest.raises(ConfigError, match="no mixing transform"):
        hook.before_train(SimpleNamespace(loader=plain))
    with pytest.raises(ConfigError, match="epochs must be an integer >= 1"):
        CloseMosaic(0)


def test_repeat_factors_follow_the_lvis_formula(coco_fixture):
    categories = [[1], [1, 2], [1], [3], [], [1, 3]]
    f = {1: 4 / 6, 2: 1 / 6, 3: 2 / 6}  # fraction of images containing each category
    r = {c: max(1.0, math.sqrt(0.5 / f[c])) for c in f}
    expected = [r[1], max(r[1], r[2]), r[1], r[3], 1.0, max(r[1], r[3])]
    assert repeat_factors(categories, 0.5).tolist() == pytest.approx(expected, rel=1e-12)
    assert r[1] == 1.0 and r[2] == pytest.approx(math.sqrt(3))
    ds = CocoDataset(str(coco_fixture), str(coco_fixture.parent / "images"))
    assert image_categories(ds) == [[7, 3], [5], []]  # COCO ids of the non-crowd boxes


def rfs(rank: int = 0, world: int = 1, **kw) -> RepeatFactorSampler:
    categories = [[0]] * 12 + [[1]] * 3 + [[0, 2]] + [[]] * 4  # 20 images, categories 1 and 2 are rare
    dataset = SimpleNamespace(ids=list(range(20)), coco=SimpleNamespace(
        imgToAnns={i: [{"category_id": c} for c in cats] for i, cats in enumerate(categories)}))
    return RepeatFactorSampler(dataset, True, repeat_thr=0.4, seed=3, rank=rank, world_size=world, **kw)


def test_repeat_factor_sampler_is_stochastic_rounding_exact_on_resume_and_shards():
    sampler = rfs()
    assert sampler.factors.tolist() == pytest.approx([1.0] * 12 + [math.sqrt(0.4 / 0.15)] * 3
                                                     + [math.sqrt(0.4 / 0.05)] + [1.0] * 4)
    assert len(sampler) == round(sampler.factors.sum().item()) == 24  # 12 + 3 x 1.63 + 2.83 + 4 = 23.7
    counts = torch.zeros(20)
    for epoch in range(200):  # on average, image I is drawn r(I) times an epoch
        sampler.set_epoch(epoch)
        counts += torch.bincount(torch.tensor(sampler.epoch_order()), minlength=20)
    torch.testing.assert_close(counts / 200, sampler.factors.float(), atol=0.1, rtol=0)
    sampler.set_epoch(4)
    full = list(sampler)
    assert full != list(rfs()) and len({s for _, s in full}) == len(full)  # new order per epoch, a seed per sample
    part = rfs()
    part.set_epoch(4, start=9)
    assert list(part) == full[9:] and len(part) == 15
    shards = [rfs(rank, 2) for rank in (0, 1)]
    for shard in shards:
        shard.set_epoch(4)
    assert [x for pair in zip(*shards) for x in pair] == full  # rank-strided halves of the same sequence
    grouped = rfs(groups=[i % 2 for i in range(20)], batch_size=4)
    grouped.set_epoch(4)
    resumed = rfs(groups=[i % 2 for i in range(20)], batch_size=4)
    resumed.set_epoch(4, start=8)
    assert sorted(i for i, _ in grouped) == sorted(i for i, _ in full) and list(resumed) == list(grouped)[8:]


def test_sampler_option_errors_are_named(coco_fixture):
    ds = CocoDataset(str(coco_fixture), str(coco_fixture.parent / "images"))
    data = {"train": {}, "num_workers": 0}
    with pytest.raises(ConfigError, match=r"data\.sampler\.repeat_thr must be a number > 0, got 0"):
        build_dataloader({**data, "sampler": {"type": "RepeatFactorSampler", "repeat_thr": 0}}, "train", dataset=ds)
    with pytest.raises(UnknownTypeError, match="RepeatFactorSampler"):
        build_dataloader({**data, "sampler": {"type": "RepeatFactor"}}, "train", dataset=ds)
    with pytest.raises(ConfigError, match=r"data\.sampler\.seed is set by the loader"):
        build_dataloader({**data, "sampler": {"type": "RepeatFactorSampler", "seed": 1}}, "train", dataset=ds)
    val = build_dataloader({**data, "val": {}, "sampler": {"type": "RepeatFactorSampler", "repeat_thr": 0.1}},
                           "val", dataset=ds)
    assert type(val.sampler).__name__ == "EpochSampler" and not val.sampler.shuffle  # data.sampler: training only
