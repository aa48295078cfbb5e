"""A model's labels matched to a dataset's categories by class name, so that a model is scored on the
classes it learned whatever order or subset an evaluation set lists (a val split holding some of the
classes, ``classes: [dog]`` on a cat/dog model, a checkpoint evaluated on another dataset)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from pycocotools.coco import COCO

from detkit.data.annotations import index_coco
from detkit.registry import ConfigError

#: How many names a message lists before it shortens the list.
SHOWN = 12


def format_names(names: Sequence[str]) -> str:
    """``[a, b, c]``, shortened to the first :data:`SHOWN` names and a count."""
    shown = ", ".join(map(str, names[:SHOWN]))
    return f"[{shown}{f', ... ({len(names)} in all)' if len(names) > SHOWN else ''}]"


@dataclass(frozen=True)
class ClassMatch:
    """``labels``: model label -> dataset label for every class both sides have; ``model_only`` and
    ``dataset_only``: the names that only one side has, left out of evaluation."""

    labels: dict[int, int]
    model_only: list[str]
    dataset_only: list[str]

    def left_out(self, model_source: str, dataset_source: str) -> str:
        """One sentence naming the classes left out, or ``''`` when both sides have the same classes."""
        if not self.model_only and not self.dataset_only:
            return ""
        parts = [f"only {side} has {format_names(names)}" for side, names in
                 ((model_source, self.model_only), (dataset_source, self.dataset_only)) if names]
        return (f"evaluating the {len(self.labels)} classes that {model_source} and {dataset_source} share, "
                f"matched by name; left out: {'; '.join(parts)}")


def _repeated(names: Sequence[str]) -> list[str]:
    return sorted({n for n in names if list(names).count(n) > 1})


def match_classes(model_classes: Sequence[str] | None, dataset_classes: Sequence[str], num_model_classes: int | None,
                  model_source: str = "the model", dataset_source: str = "the dataset") -> ClassMatch:
    """Model label ``i`` (``model_classes[i]``) -> the dataset label of the same name.

    Identical lists match one to one. Otherwise the names decide, in any order; a side's names that
    the other lacks are left out (``ClassMatch.model_only`` / ``dataset_only``); model labels from
    ``num_model_classes`` on have no name and are dropped. Without model names (``None`` or empty: a
    checkpoint that stores none) label ``i`` is dataset class ``i``, only when the counts agree.
    Raises :class:`ConfigError` naming both lists when nothing can be matched: no name in common, a
    name listed twice, or unknown names and different counts.
    """
    dataset_classes, model_classes = list(dataset_classes), list(model_classes or [])
    if num_model_classes is not None:
        model_classes = model_classes[:num_model_classes]
    if not model_classes:
        if num_model_classes != len(dataset_classes):
            raise ConfigError(f"{model_source} stores no class names and has {num_model_classes} classes, but "
                              f"{dataset_source} has {len(dataset_classes)} {format_names(dataset_classes)}: its "
                              f"labels cannot be matched to categories; evaluate on data with the model's classes in "
                              f"training order, or use a checkpoint that stores its class names")
        return ClassMatch({i: i for i in range(len(dataset_classes))}, [], [])
    if model_classes == dataset_classes:
        return ClassMatch({i: i for i in range(len(model_classes))}, [], [])
    for side, names in ((model_source, model_classes), (dataset_source, dataset_classes)):
        if _repeated(names):
            raise ConfigError(f"{side} lists the classes {_repeated(names)} more than once "
                              f"{format_names(names)}, so {model_source}'s labels cannot be matched to "
                              f"{dataset_source}'s categories by name")
    index = {name: k for k, name in enumerate(dataset_classes)}
    labels = {i: index[name] for i, name in enumerate(model_classes) if name in index}
    if not labels:
        raise ConfigError(f"{model_source} has the classes {format_names(model_classes)} but {dataset_source} has "
                          f"{format_names(dataset_classes)}: no class name in common, so no detection can be scored; "
                          f"evaluate on data labelled with the model's class names")
    learnt = set(model_classes)
    return ClassMatch(labels, [n for n in model_classes if n not in index],
                      [n for n in dataset_classes if n not in learnt])


def keep_categories(coco: COCO, cat_ids: Sequence[int], source: object) -> COCO:
    """A pycocotools index of ``coco``'s ground truth reduced to the categories ``cat_ids`` (ids kept;
    every image kept), for evaluating only the classes a model and a dataset share."""
    keep = set(cat_ids)
    dataset = coco.dataset
    return index_coco({**dataset, "categories": [c for c in dataset["categories"] if c["id"] in keep],
                       "annotations": [a for a in dataset.get("annotations", []) if a.get("category_id") in keep]},
                      source)
