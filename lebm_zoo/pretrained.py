"""Loading checkpoints from Python: :func:`load_pretrained` and the registry of published checkpoints.

A checkpoint written by ``lebm-zoo fit`` (a Lightning ``.ckpt``) holds plain hyperparameters, the state dict and a
``"lebm_zoo"`` entry naming the model class, so it loads with torch's weights-only unpickler (the default since
torch 2.6) and can be rebuilt without the recipe.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect
import os
import pickle
import zipfile
import zlib
from pathlib import Path

import torch

__all__ = ["CheckpointError", "PretrainedInfo", "REGISTRY", "list_pretrained", "load_pretrained"]


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used: missing, corrupt, not from lebm-zoo, or of another model class."""


@dataclasses.dataclass(frozen=True)
class PretrainedInfo:
    """A published checkpoint: where it lives, its checksum, the recipe that trained it and its measured metrics."""

    name: str
    url: str
    sha256: str
    recipe: str
    metrics: dict
    license: str = "MIT"


# name -> PretrainedInfo. No checkpoint has been published yet: names resolve once entries are added here.
REGISTRY: dict[str, PretrainedInfo] = {}


def list_pretrained() -> list[str]:
    """Names of the published checkpoints :func:`load_pretrained` accepts."""
    return sorted(REGISTRY)


def _cache_dir() -> Path:
    root = os.environ.get("LEBM_ZOO_CACHE") or Path.home() / ".cache" / "lebm_zoo"
    return Path(root) / "checkpoints"


def _fetch(info: PretrainedInfo) -> Path:
    dest = _cache_dir() / f"{info.name}.ckpt"
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(info.url, str(dest) + ".part", progress=True)
        except OSError as e:
            raise CheckpointError(f"could not download checkpoint {info.name!r} from {info.url}: {e}. Download it by "
                                  f"hand and pass its path to load_pretrained.") from None
        os.replace(str(dest) + ".part", dest)
    digest = hashlib.sha256(dest.read_bytes()).hexdigest()
    if not digest.startswith(info.sha256):
        raise CheckpointError(f"{dest} has sha256 {digest[:16]}..., expected {info.sha256}: delete it and retry.")
    return dest


def _resolve(name_or_path: str | os.PathLike) -> Path:
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    if str(name_or_path) in REGISTRY:
        return _fetch(REGISTRY[str(name_or_path)])
    if path.is_dir():
        found = sorted(path.rglob("last.ckpt"), key=lambda p: p.stat().st_mtime)
        if found:
            return found[-1]
        raise CheckpointError(f"{path} is a folder with no last.ckpt below it; pass a .ckpt file.")
    names = ", ".join(list_pretrained()) or "none published yet"
    raise CheckpointError(f"no checkpoint file at {path.resolve()} and no published checkpoint named "
                          f"{str(name_or_path)!r} (published: {names}).")


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


def read_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Read a checkpoint file with torch's weights-only loader, after checking every archive member's CRC-32.

    Raises:
        CheckpointError: if the file is corrupt/truncated (including a member whose data fail its CRC check: the
            message names it), not a torch checkpoint, or holds non-plain objects.
    """
    path = Path(path)
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
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is a torch file but not a Lightning checkpoint (no 'state_dict').")
    return ckpt


def _model_class(ckpt: dict, path: Path) -> type:
    from lebm_zoo.models.base import EBMModule

    meta = ckpt.get("lebm_zoo")
    if not isinstance(meta, dict) or "class_path" not in meta:
        raise CheckpointError(f"{path} is a Lightning checkpoint but was not written by a lebm-zoo model "
                              "(no 'lebm_zoo' entry).")
    module_name, _, cls_name = meta["class_path"].rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError) as e:
        raise CheckpointError(f"{path} holds a {meta['class_path']}, which cannot be imported here ({e}).") from None
    from lebm_zoo.models.language_model import LSTMLanguageModel

    if not (inspect.isclass(cls) and issubclass(cls, (EBMModule, LSTMLanguageModel))):
        raise CheckpointError(f"{path} names {meta['class_path']}, which is not a lebm-zoo model.")
    return cls


def load_pretrained(name_or_path: str | os.PathLike, map_location: str | torch.device = "cpu",
                    expected_class: type | None = None):
    """Load a trained model from a checkpoint file, a run folder or a published name.

    Args:
        name_or_path: a ``.ckpt`` written by ``lebm-zoo fit``; a folder (its newest ``last.ckpt`` below it is used);
            or a name from :func:`list_pretrained`.
        map_location: device for the weights (default CPU).
        expected_class: if given, the checkpoint must hold this class or a subclass of it.

    Returns:
        the model (an :class:`~lebm_zoo.models.EBMModule` subclass, or the
        :class:`~lebm_zoo.LSTMLanguageModel` used by the text metrics) in eval mode on ``map_location``.

    Raises:
        CheckpointError: missing file, corrupt file, not a lebm-zoo checkpoint, another model class than
            ``expected_class``, or weights that do not fit the stored hyperparameters.
    """
    path = _resolve(name_or_path)
    ckpt = read_checkpoint(path, map_location=map_location)
    cls = _model_class(ckpt, path)
    if expected_class is not None and not issubclass(cls, expected_class):
        raise CheckpointError(f"{path} holds a {cls.__name__} checkpoint, not a {expected_class.__name__}: load it "
                              f"with {cls.__name__}.load_pretrained or lebm_zoo.load_pretrained.")
    hparams = dict(ckpt.get("hyper_parameters", {}))
    params = inspect.signature(cls.__init__).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        hparams = {k: v for k, v in hparams.items() if k in params}
    try:
        model = cls(**hparams)
        model.on_load_checkpoint(ckpt)
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except (RuntimeError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: the stored weights do not fit a {cls.__name__} built from the stored "
                              f"hyperparameters: {str(e).splitlines()[0]}") from None
    return model.to(map_location).eval()
