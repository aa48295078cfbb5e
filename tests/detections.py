"""Comparing two detectors' outputs when near-tied scores may come out in another order."""

from __future__ import annotations

import torch


def paired_max_diff(ref: dict, out: dict) -> tuple[float, float]:
    """Max box and score differences after pairing detections of the same label by nearest (box, score):
    normalisation rounding (~5e-7) may swap near-tied scores, so positions are not compared."""
    assert len(ref["boxes"]) == len(out["boxes"]) > 0
    assert torch.equal(ref["labels"].sort()[0], out["labels"].sort()[0])
    db = ds = 0.0
    for label in ref["labels"].unique():
        r, o = ref["labels"] == label, out["labels"] == label
        cost = (ref["boxes"][r][:, None] - out["boxes"][o][None]).abs().amax(-1) + 1e3 * (
            ref["scores"][r][:, None] - out["scores"][o][None]).abs()
        j = cost.argmin(1)
        assert len(j.unique()) == len(j)  # one to one
        db = max(db, float((ref["boxes"][r] - out["boxes"][o][j]).abs().max()))
        ds = max(ds, float((ref["scores"][r] - out["scores"][o][j]).abs().max()))
    return db, ds
