"""Atomic checkpoints: a crash or a kill during a save never leaves a truncated file behind."""

from __future__ import annotations

import logging
import os
import pickle
import re
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from detkit.registry import ConfigError

logger = logging.getLogger("detkit")

EPOCH_FILE = re.compile(r"^epoch_(\d+)\.pth$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or holds what a checkpoint must not (names the file)."""


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some filesystems do not open folders
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_error(path: Path, err: Exception) -> CheckpointError:
    """The error of a failed write naming ``path`` and the OS reason: torch's zip writer turns the
    ``OSError`` of its file (disk full, EFBIG) into ``RuntimeError: [enforce fail at inline_container.cc]
    unexpected pos``, keeping the ``OSError`` as ``__context__``, where the reason is found."""
    cause: BaseException | None = err
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__context__
    if isinstance(cause, OSError):
        meaning = os.strerror(cause.errno) if cause.errno else str(cause)
    else:
        meaning = str(err)
    return CheckpointError(f"cannot write {path}: {meaning} (the previous {path.name}, if any, is intact)")


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Write ``state`` to a temp file in the same folder, fsync it, then rename over ``path``.

    Any OS error (disk full, read-only folder) is a :class:`CheckpointError` naming ``path`` and the
    error; the temp file is removed and a previous ``path`` stays as it was.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise _write_error(path, err) from None
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; a checkpoint should read like any file
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:  # RuntimeError: torch's writer failing on an OSError
        Path(tmp).unlink(missing_ok=True)
        raise _write_error(path, err) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def copy_checkpoint(source: Path, target: Path) -> None:
    """Copy ``source`` to ``target`` atomically (a byte copy: no second pickling). A copy, not a hard
    link: the two files stay independent, so one damaged file leaves the other to fall back to."""
    tmp = target.with_name(f".{target.name}.copy.tmp")
    try:
        shutil.copyfile(source, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise _write_error(target, err) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


def remove_stale_temp_files(work_dir: str | os.PathLike) -> list[Path]:
    """Delete the ``.*.tmp`` files a killed save left in ``work_dir``; returns what was removed."""
    stale = [p for p in Path(work_dir).glob(".*.tmp") if p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        logger.info("removed %d temporary file(s) left by an interrupted save: %s", len(stale),
                    ", ".join(p.name for p in stale))
    return stale


def is_torchscript(path: Path) -> bool:
    """Whether ``path`` is a TorchScript archive (a zip holding ``<name>/code/`` and ``constants.pkl``)."""
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return False
    return any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu", mmap: bool = False
                    ) -> dict[str, Any]:
    """Read a checkpoint with ``torch.load(weights_only=True)``: tensors and plain Python types only.

    A file whose pickle would import or call anything else (code could run) is refused with
    :class:`CheckpointError`, as are missing, truncated and foreign files; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if is_torchscript(path):
        raise CheckpointError(f"{path} is a TorchScript module (as `detkit export --format torchscript` writes), "
                              f"not a detkit checkpoint: give the checkpoint it was exported from (best.pth, "
                              f"model_final.pth or latest.pth of its training run), or run the module itself "
                              f"with torch.jit.load")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        unsafe = re.search(r"GLOBAL ([\w.]+)", str(err))
        if unsafe:
            raise CheckpointError(
                f"refusing to load {path}: it holds a Python object ({unsafe.group(1)}) whose unpickling could run "
                f"code; detkit loads checkpoints weights-only. Only load files you trust, and convert them to a "
                f"plain state dict.") from None
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated and cannot be loaded") from None
    except Exception as err:  # truncated zip, wrong format: all mean "corrupt"
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated and cannot be loaded "
                              f"({type(err).__name__}: {err})") from None
    if not isinstance(state, dict) or "model" not in state:
        keys = f" with keys {sorted(state)}" if isinstance(state, dict) else ""
        raise CheckpointError(f"{path} is not a detkit checkpoint (expected a dict with 'model', got "
                              f"{type(state).__name__}{keys})")
    return state


def check_resumable(state: Mapping[str, Any], path: str | os.PathLike) -> None:
    """A :class:`~detkit.registry.ConfigError` saying what to do when ``state`` (read from ``path``) is
    not a training state that ``--resume`` can continue (inference or bare weights)."""
    if state.get("inference_only"):
        held = "inference weights only (no optimizer or counters)"
    elif not all(key in state for key in ("epoch", "iter")):
        held = f"weights only (keys {sorted(state)}; no epoch, iteration or optimizer)"
    else:
        return
    raise ConfigError(f"--resume {path}: this checkpoint holds {held}; resume from latest.pth or epoch_N.pth, or "
                      f"start a new run from it with --load-from {path}")


def epoch_checkpoints(work_dir: Path) -> list[Path]:
    """``epoch_N.pth`` files of ``work_dir``, newest epoch first."""
    found = [(int(m.group(1)), p) for p in work_dir.glob("epoch_*.pth") if (m := EPOCH_FILE.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def find_resume_checkpoint(work_dir: str | os.PathLike) -> tuple[Path, dict[str, Any]] | None:
    """The readable training checkpoint of ``work_dir`` with the most iterations (``latest.pth`` on a tie).

    Unreadable candidates are skipped with a warning that names them; None when there is none.
    """
    work_dir = Path(work_dir)
    best: tuple[int, Path] | None = None
    for path in [work_dir / "latest.pth", *epoch_checkpoints(work_dir)]:
        if not path.is_file():
            continue
        try:
            iteration = int(load_checkpoint(path, mmap=True).get("iter", -1))
        except CheckpointError as err:
            logger.warning("auto-resume: skipping %s", err)
            continue
        if best is None or iteration > best[0]:
            best = (iteration, path)
    if best is None:
        return None
    if best[1].name != "latest.pth":
        logger.warning("auto-resume: latest.pth unreadable, missing or older; falling back to %s", best[1])
    return best[1], load_checkpoint(best[1])


def prune_epoch_checkpoints(work_dir: str | os.PathLike, keep: int) -> None:
    """Delete all but the newest ``keep`` ``epoch_N.pth`` files (``keep <= 0``: keep all)."""
    if keep <= 0:
        return
    for path in epoch_checkpoints(Path(work_dir))[keep:]:
        path.unlink(missing_ok=True)


def evaluation_weights(state: Mapping[str, Any]) -> dict[str, Tensor]:
    """The weights training evaluated: the EMA model's when the checkpoint has one, else ``model``."""
    ema = (state.get("hooks") or {}).get("EMAHook", {}).get("ema") or state.get("ema")
    if not ema:
        return state["model"]
    return {k[len("module."):]: v for k, v in ema.items() if k.startswith("module.")}


def inference_state(trainer: Any) -> dict[str, Any]:
    """What inference needs and nothing else: evaluation weights, config, classes, COCO category ids."""
    return {"model": trainer.eval_model().state_dict(), "config": trainer.cfg,
            "classes": list(getattr(trainer.loader.dataset, "classes", [])),
            "cat_ids": list(getattr(trainer.loader.dataset, "cat_ids", [])),
            "epoch": trainer.epoch, "iter": trainer.iter, "inference_only": True}


def check_model_weights(model: torch.nn.Module, weights: Mapping[str, Tensor], path: str | os.PathLike) -> None:
    """One short :class:`CheckpointError` naming ``path`` when ``weights`` do not fit ``model`` (another
    detector, class count or depth): counts and a few examples, no traceback. Loads nothing."""
    own = model.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    shapes = [f"{k} {tuple(weights[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in weights and tuple(weights[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        parts = [f"{len(missing)} missing (e.g. {missing[:2]})" if missing else "",
                 f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})" if unexpected else "",
                 f"{len(shapes)} of another shape (e.g. {shapes[:2]})" if shapes else ""]
        raise CheckpointError(f"{path}: its weights do not fit this config's model ({type(model).__name__}): "
                              f"{'; '.join(p for p in parts if p)}. Use the config the checkpoint was trained with "
                              f"(it is stored in the checkpoint), or start from it with load_from to keep what fits.")


def load_model_weights(model: torch.nn.Module, weights: Mapping[str, Tensor], path: str | os.PathLike) -> None:
    """``model.load_state_dict(weights)`` after :func:`check_model_weights`."""
    check_model_weights(model, weights, path)
    model.load_state_dict(weights)
