"""What a zoo checkpoint is, in one place: its lebm-zoo record (written by :func:`write_record`), reading and checking
one (:func:`read_checkpoint`, :func:`model_class`), finding a run's newest one (:func:`find_last_checkpoint`) and its
best one on validation (:func:`find_best_checkpoint`), and writing them safely (:class:`AtomicCheckpointIO`, the
checkpoint I/O of ``lebm-zoo`` runs).

A checkpoint written by ``lebm-zoo fit`` is a Lightning ``.ckpt`` holding plain hyperparameters, the state dict and a
``"lebm_zoo"`` entry (class path, lebm-zoo version, recipe, RNG states), so it loads with torch's weights-only
unpickler (the default since torch 2.6) and can be rebuilt without the recipe.
"""
from __future__ import annotations

import importlib
import inspect
import os
import pickle
import tempfile
import zipfile
import zlib
from pathlib import Path

import torch
from fsspec.core import url_to_fs
from lightning_fabric.utilities.cloud_io import get_filesystem
from pytorch_lightning.plugins.io import TorchCheckpointIO

from lebm_zoo._version import __version__
from lebm_zoo.errors import CheckpointError
from lebm_zoo.utils import get_rng_state

__all__ = ["AtomicCheckpointIO", "CheckpointError", "TMP_PREFIX", "check_model_class", "class_path",
           "find_best_checkpoint", "find_last_checkpoint", "is_zoo_model", "model_class", "read_checkpoint",
           "write_record"]

#: name prefix of a checkpoint being written (``.<name>.tmp-<pid>`` beside the target file)
TMP_PREFIX = "."


def _check_crcs(path: Path) -> None:
    """Refuse a zip archive with a member whose data does not match its stored CRC-32 (torch itself does not check
    them, so a flipped bit in a weight would load silently). Reads the whole file once."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, zlib.error) as e:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (corrupt or truncated?): "
                              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if bad is not None:
        raise CheckpointError(f"{path} is corrupt: the data of archive member {bad!r} does not match its CRC-32 "
                              "checksum (a damaged copy?); copy or download the checkpoint again.")


def read_checkpoint(path: str | os.PathLike, map_location="cpu", lightning: bool = True) -> dict:
    """Read a checkpoint file with torch's weights-only loader, after checking every archive member's CRC-32.

    ``path`` may be a local path, a ``file://`` URL or a remote fsspec URL (``s3://``, ...: copied to a temporary
    file first). ``lightning=False`` accepts any dict of plain values (a bare state dict) instead of requiring a
    Lightning checkpoint. Weights-only is asked for explicitly, so ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` does not turn
    it off.

    Raises:
        CheckpointError: if the file is corrupt/truncated (including a member whose data fail its CRC check: the
            message names it), not a torch checkpoint, or holds non-plain objects.
    """
    if isinstance(path, str) and "://" in path:
        fs, stripped = url_to_fs(path)
        protocol = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
        if "file" in protocol or "local" in protocol:
            return _read_local(Path(stripped), map_location, lightning)
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / Path(stripped).name
            try:
                fs.get(stripped, str(local))
            except (OSError, ValueError) as e:
                raise CheckpointError(f"{path} cannot be read: {type(e).__name__}: {e}") from None
            return _read_local(local, map_location, lightning)
    return _read_local(Path(path), map_location, lightning)


def _read_local(path: Path, map_location, lightning: bool) -> dict:
    if not zipfile.is_zipfile(path):  # every checkpoint torch >= 1.6 writes is a zip archive
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (corrupt or truncated?): not a torch "
                              "zip archive.")
    _check_crcs(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path} holds objects that torch's weights-only loader refuses ({str(e).splitlines()[0]}"
                              "); lebm-zoo checkpoints hold plain values only. Was it written by another program?"
                              ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (corrupt or truncated?): "
                              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if not isinstance(ckpt, dict) or (lightning and "state_dict" not in ckpt):
        raise CheckpointError(f"{path} is a torch file but not a Lightning checkpoint (no 'state_dict').")
    return ckpt


def class_path(cls: type) -> str:
    """The name a record (and a published ``config.json``) gives a model class: ``"<module>.<qualname>"``."""
    return f"{cls.__module__}.{cls.__qualname__}"


def is_zoo_model(cls) -> bool:
    """Whether ``cls`` is a class whose checkpoints and published folders lebm-zoo reads: one that inherits
    :class:`lebm_zoo.pretrained.PretrainedMixin` (the zoo's ``EBMModule`` subclasses and its LSTM language model),
    which marks it with ``lebm_zoo_model = True`` (read here, so that this module imports no model)."""
    return inspect.isclass(cls) and getattr(cls, "lebm_zoo_model", False) is True


def model_class(ckpt: dict, path: Path) -> type:
    """The model class a checkpoint's lebm-zoo record names (an EBMModule subclass or the LSTMLanguageModel).

    Raises:
        CheckpointError: no lebm-zoo record, a class that cannot be imported, or one that is not a zoo model.
    """
    meta = ckpt.get("lebm_zoo")
    if not isinstance(meta, dict) or "class_path" not in meta:
        raise CheckpointError(f"{path} is a Lightning checkpoint but was not written by a lebm-zoo model "
                              "(no 'lebm_zoo' entry).")
    module_name, _, cls_name = meta["class_path"].rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError) as e:
        raise CheckpointError(f"{path} holds a {meta['class_path']}, which cannot be imported here ({e}).") from None
    if not is_zoo_model(cls):
        raise CheckpointError(f"{path} names {meta['class_path']}, which is not a lebm-zoo model.")
    return cls


def check_model_class(checkpoint: dict, module) -> None:
    """Refuse a checkpoint whose lebm-zoo record names a model class unrelated to ``module``'s (``on_load_checkpoint``
    of every zoo model: a resume that Lightning found by itself, e.g. another family's ``hpc_ckpt_1.ckpt``).

    Raises:
        CheckpointError: naming both classes.
    """
    meta = checkpoint.get("lebm_zoo")
    if not isinstance(meta, dict) or "class_path" not in meta:
        return  # not a lebm-zoo checkpoint: the readers that need a record (the CLI's, load_pretrained) refuse it
    name = meta["class_path"]
    own = type(module)
    related = {class_path(c) for c in own.__mro__} | {class_path(c) for c in _subclasses(own)}
    if name not in related:
        raise CheckpointError(f"the checkpoint being loaded holds a {name.rpartition('.')[2]}, not a {own.__name__} "
                              "(a checkpoint of another model found in the run folder?); pass a checkpoint of a "
                              f"{own.__name__} or start a new run.")


def _subclasses(cls: type) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        out += [sub, *_subclasses(sub)]
    return out


def write_record(checkpoint: dict, module) -> None:
    """Add the lebm-zoo record to a checkpoint being saved (``on_save_checkpoint`` of every zoo model): the class
    path, the lebm-zoo version, the recipe (set by ``lebm-zoo``) and the RNG states (for an exact resume; ``"at"``
    says whether it was written inside an epoch or at its end)."""
    at = "epoch_end" if getattr(module, "_saving_at_epoch_end", False) else "batch"
    checkpoint["lebm_zoo"] = {"class_path": class_path(type(module)), "version": __version__,
                              "recipe": getattr(module, "recipe", None), "rng": {**get_rng_state(), "at": at}}


def find_last_checkpoint(root: str | os.PathLike, recipe: str | None = None,
                         skipped: list[tuple[Path, str]] | None = None) -> Path | None:
    """The newest ``last*.ckpt`` below ``root`` (by modification time), written by ``recipe`` when one is given
    (the ``"recipe"`` of its lebm-zoo record, see :func:`write_record`).

    Public: ``lebm-zoo``'s ``--ckpt_path last`` and :class:`~lebm_zoo.callbacks.PerplexityCallback`'s ``lm_path``
    (a recipe name) both find checkpoints with it. Unreadable checkpoints are passed over (only when ``recipe`` is
    given: the record must be read); each one passed over is appended to ``skipped`` as ``(path, why)``. Returns None
    when there is none.
    """
    root = Path(root)
    found = sorted(root.rglob("last*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True) if root.is_dir() else []
    for p in found:
        if recipe is None:
            return p
        try:
            meta = read_checkpoint(p).get("lebm_zoo", {})
        except CheckpointError as e:
            if skipped is not None:
                skipped.append((p, str(e)))
            continue
        if meta.get("recipe") == recipe:
            return p
    return None


def find_best_checkpoint(last: str | os.PathLike, required: bool = True) -> tuple[Path, str, float | None] | None:
    """The checkpoint that a run's monitored checkpoint callback (e.g. :class:`~lebm_zoo.callbacks.BestCheckpoint`)
    kept as its best, read from the run's ``last.ckpt``.

    Lightning stores each checkpoint callback's state in the checkpoints it writes; the state of one with a
    ``monitor`` names its best file (``best_model_path``) and score. That path is absolute as written, so the file of
    the same name beside ``last`` is tried first (a copied or moved run folder), then the path itself (a resumed run's
    best can lie in an earlier ``version_N`` folder). ``lebm-zoo test|validate|predict --ckpt_path best`` resolves
    through it, on the run that ``--ckpt_path last`` would pick.

    Args:
        last: the run's ``last.ckpt``.
        required: False returns None, instead of raising, when the run keeps no best checkpoint (no monitored
            callback, or no validation yet).

    Returns:
        ``(path, monitor, score)``: the best checkpoint, the metric it was chosen on (e.g. ``"val/ade"``) and its
        value there (None if not recorded).

    Raises:
        CheckpointError: ``last`` is unreadable; (with ``required``) it records no checkpoint callback with a
            ``monitor``, or none with a best file yet; the best file is in neither place.
    """
    last = Path(last)
    states = read_checkpoint(last).get("callbacks", {})
    monitored = [s for s in states.values() if isinstance(s, dict) and s.get("monitor") and "best_model_path" in s]
    chosen = [s for s in monitored if s.get("best_model_path")]
    if not chosen:
        if not required:
            return None
        if not monitored:
            raise CheckpointError(f"{last} records no checkpoint callback with a monitor, so there is no best "
                                  "checkpoint: add one to the recipe (lebm_zoo.callbacks.BestCheckpoint, e.g. monitor: "
                                  "val/ade) or use --ckpt_path last.")
        raise CheckpointError(f"{last}: its checkpoint callback (monitor {monitored[0]['monitor']}) has kept no best "
                              "checkpoint yet (no validation has run); use --ckpt_path last.")
    state = chosen[0]
    recorded = Path(state["best_model_path"])
    best = next((p for p in (last.parent / recorded.name, recorded) if p.is_file()), None)
    if best is None:
        raise CheckpointError(f"{last}: its best checkpoint {recorded} is missing (and so is "
                              f"{last.parent / recorded.name}).")
    score = state.get("best_model_score")
    return best, str(state["monitor"]), None if score is None else float(score)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoint I/O that writes a local checkpoint beside its target and renames it into place.

    Lightning's default writes through an fsspec transaction, whose temporary file lives in the system's temp folder:
    a run killed while saving (``kill -9``, out of memory, a preempted job) leaves a file of the checkpoint's size
    there (tens of MB for the image recipes) that nothing removes. Here the file is written as
    ``.<name>.tmp-<pid>`` in the checkpoint's own folder, flushed, and renamed onto ``<name>`` (atomic on POSIX: a
    reader sees the old checkpoint or the new one, never half of one); the temporary files of dead processes are
    removed from that folder at the next save. Remote paths (``s3://``, ...) keep Lightning's behaviour.
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        protocol = get_filesystem(path).protocol
        if storage_options is not None or "file" not in (protocol if isinstance(protocol, tuple) else (protocol,)):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.remove_stale_temporaries(path.parent)
        tmp = path.with_name(f"{TMP_PREFIX}{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        """Every checkpoint Lightning reads, whatever found it (``--ckpt_path``, a ``ckpt_path`` in a config file,
        ``hpc``, SLURM's auto-resume, a ``file://`` URL), goes through :func:`read_checkpoint` (CRC-32 of every
        member, weights-only whatever ``weights_only`` or ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` say) and must carry a
        lebm-zoo record naming a zoo model (:func:`model_class`); the model checks it is its own class when it loads
        it (:func:`check_model_class`). A file of bare weights (what ``ddp_spawn`` hands back from its workers) is
        read weights-only too.

        Raises:
            CheckpointError: a corrupt, foreign or non-plain checkpoint (names the file and why).
        """
        ckpt = read_checkpoint(path, map_location="cpu" if map_location is None else map_location, lightning=False)
        if "state_dict" in ckpt:  # not the bare weights ddp_spawn hands back to the main process
            model_class(ckpt, Path(str(path)))
        return ckpt

    @staticmethod
    def remove_stale_temporaries(folder: Path) -> list[Path]:
        """Delete ``.*.tmp-<pid>`` files of processes that no longer run in ``folder``; returns what was removed."""
        removed = []
        for p in folder.glob(f"{TMP_PREFIX}*.tmp-*"):
            pid = p.name.rsplit("-", 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                p.unlink(missing_ok=True)
                removed.append(p)
        return removed
