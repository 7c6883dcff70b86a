"""Publishing and loading trained models: :func:`save_pretrained`, :func:`push_to_hub`, :func:`load_pretrained` and the
registry of the models shipped with the package (:func:`list_pretrained`).

The published format is the field's (timm, diffusers): a folder holding

* ``config.json``: the model class, its hyperparameters (a text model's vocabulary among them), the lebm-zoo version,
  the recipe, the data set, the training steps, the measured metrics with their protocol and the license;
* ``model.safetensors``: the state dict (parameters and persistent buffers, e.g. a replay buffer), floating tensors
  in fp32, no optimiser state.

:func:`load_pretrained` also reads the Lightning ``.ckpt`` files ``lebm-zoo fit`` writes (they hold plain
hyperparameters, the state dict and a ``"lebm_zoo"`` entry naming the model class, so they load with torch's
weights-only unpickler) and run folders, and it downloads published folders from the Hugging Face Hub
(``hf://owner/repo[@revision]``, through ``huggingface_hub``: its cache, token and ``HF_HUB_OFFLINE`` apply).

The registry is a JSON index shipped with the package (``lebm_zoo/weights/index.json``, see :func:`list_pretrained`);
each entry's files are in ``lebm_zoo/weights/<name>/`` and are checked against the index's sha256 before loading.
"""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import math
import os
import re
import sys
import tempfile
from pathlib import Path

import torch

from lebm_zoo.checkpoint import CheckpointError, class_path, model_class, read_checkpoint

__all__ = ["CONFIG_NAME", "CheckpointError", "FORMAT", "INDEX_PATH", "PretrainedEntry", "PretrainedMixin",
           "WEIGHTS_NAME", "list_pretrained", "load_pretrained", "make_registry_entry", "push_to_hub",
           "read_checkpoint", "save_pretrained"]

#: file names of a published folder
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
#: the ``format`` field of config.json
FORMAT = "lebm-zoo-pretrained"
FORMAT_VERSION = 1
#: the shipped registry: an index (a JSON list, see :func:`list_pretrained`) and a folder per entry beside it
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
INDEX_PATH = WEIGHTS_DIR / "index.json"
#: registry names: ``family-dataset[-variant]``, lower case, digits and hyphens
NAME_PATTERN = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)+$")
_HUB_ID = re.compile(r"^hf://(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[^@\s]+))?$")


# ------------------------------------------------------------------------------------------------------- registry
@dataclasses.dataclass(frozen=True)
class PretrainedEntry:
    """A model shipped with the package. ``str(entry)`` is its name (what :func:`list_pretrained` returned before).

    Attributes:
        name: ``family-dataset[-variant]``, what :func:`load_pretrained` accepts (e.g. ``"lebm-mnist"``).
        family: the model class (e.g. ``"LatentEBMPrior"``).
        recipe: the recipe that trained it (``recipes/<recipe>.yaml``).
        data: the data set it was trained on.
        size: bytes of all its files.
        sha256: file name -> sha256 hex digest, for every file.
        metrics: name -> ``{"value": ..., "protocol": "..."}``, measured on the shipped weights.
        license: the weights' license.
        path: the folder holding the files (inside the installed package).
    """

    name: str
    family: str
    recipe: str | None
    data: str | None
    size: int
    sha256: dict
    metrics: dict
    license: str
    path: Path

    def __str__(self) -> str:
        return self.name


def _index_path() -> Path:
    return Path(INDEX_PATH)


def _read_index() -> list[PretrainedEntry]:
    index = _index_path()
    if not index.is_file():
        return []
    try:
        raw = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"the registry index {index} is unreadable: {e}") from None
    if not isinstance(raw, list):
        raise CheckpointError(f"the registry index {index} must be a JSON list of entries, got {type(raw).__name__}")
    entries = []
    for i, item in enumerate(raw):
        try:
            name = item["name"]
            if not (isinstance(name, str) and NAME_PATTERN.match(name)):
                raise ValueError(f"name {name!r} is not family-dataset[-variant] (lower case, digits, hyphens)")
            files = item["files"]
            if not {CONFIG_NAME, WEIGHTS_NAME} <= set(files):
                raise ValueError(f"files must list {CONFIG_NAME} and {WEIGHTS_NAME}")
            entries.append(PretrainedEntry(
                name=name, family=item["family"], recipe=item.get("recipe"), data=item.get("data"),
                size=sum(int(f["bytes"]) for f in files.values()),
                sha256={k: str(f["sha256"]).lower() for k, f in files.items()},
                metrics=dict(item.get("metrics") or {}), license=item.get("license", "MIT"),
                path=(index.parent / item.get("folder", name)).resolve()))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CheckpointError(f"the registry index {index}: entry {i} is malformed ({type(e).__name__}: {e})"
                                  ) from None
    return entries


def list_pretrained() -> list[PretrainedEntry]:
    """The models shipped with the package, sorted by name (``lebm-zoo pretrained`` prints them as a table).

    Each entry's ``str()`` and ``.name`` is the name :func:`load_pretrained` accepts. The registry is read from
    ``lebm_zoo/weights/index.json``, a JSON list whose entries are (see :func:`make_registry_entry`)::

        {"name": "lebm-mnist", "family": "LatentEBMPrior", "recipe": "mnist_prior", "data": "MNIST train",
         "license": "MIT", "metrics": {"fid": {"value": 84.7, "protocol": "..."}}, "folder": "lebm-mnist",
         "files": {"config.json": {"bytes": 1234, "sha256": "..."}, "model.safetensors": {"bytes": ..., ...}}}

    ``folder`` (default: the name) is relative to the index's folder.
    """
    return sorted(_read_index(), key=lambda e: e.name)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _verify_entry(entry: PretrainedEntry) -> None:
    for file, expected in entry.sha256.items():
        path = entry.path / file
        if not path.is_file():
            raise CheckpointError(f"pretrained model {entry.name!r}: its file {path} is missing; reinstall lebm-zoo.")
        digest = _sha256(path)
        if digest != expected:
            raise CheckpointError(f"pretrained model {entry.name!r}: {path} has sha256 {digest[:16]}..., the registry "
                                  f"expects {expected[:16]}...: the file was modified or damaged; reinstall lebm-zoo.")


def make_registry_entry(folder: str | os.PathLike, name: str, *, data: str | None = None) -> dict:
    """The index entry (a dict, to append to ``lebm_zoo/weights/index.json``) of a folder written by
    :func:`save_pretrained`: family, recipe, data, metrics and license from its config.json, bytes and sha256 of
    every file. ``folder`` should be ``lebm_zoo/weights/<name>/``.

    Raises:
        ValueError: a name that is not ``family-dataset[-variant]``. CheckpointError: no readable config.json.
    """
    if not NAME_PATTERN.match(name):
        raise ValueError(f"registry names are family-dataset[-variant] (lower case, digits, hyphens), got {name!r}")
    folder = Path(folder)
    cfg = _read_config(folder / CONFIG_NAME)
    files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")}
    return {"name": name, "family": cfg.get("family"), "recipe": cfg.get("recipe"),
            "data": data if data is not None else cfg.get("data"), "license": cfg.get("license"),
            "metrics": cfg.get("metrics") or {}, "folder": folder.name, "files": files}


# --------------------------------------------------------------------------------------------------------- saving
def _plain(value, key: str):
    """``value`` as JSON (tuples as lists); ValueError naming ``key`` for anything that is not a plain value."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{key} = {value!r} cannot be written to config.json (not a finite number)")
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{key}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {str(k): _plain(v, f"{key}.{k}") for k, v in value.items()}
    raise ValueError(f"{key} = {value!r} ({type(value).__name__}) is not a plain value and cannot be written to "
                     "config.json")


def _check_metrics(metrics: dict | None) -> dict:
    metrics = dict(metrics or {})
    for name, m in metrics.items():
        if not (isinstance(m, dict) and "value" in m and isinstance(m.get("protocol"), str) and m["protocol"]):
            raise ValueError(f"metric {name!r} must be {{'value': ..., 'protocol': 'how it was measured'}}, got {m!r}")
    return _plain(metrics, "metrics")


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict as safetensors wants it: tensors only, on the CPU, contiguous, unshared; floats in fp32."""
    out = {}
    for k, v in model.state_dict().items():
        if not isinstance(v, torch.Tensor):
            continue
        v = v.detach().to("cpu")
        v = v.to(torch.float32, copy=True) if v.is_floating_point() else v.clone()
        out[k] = v.contiguous()
    return out


def save_pretrained(model, folder: str | os.PathLike, *, recipe: str | None = None, data: str | None = None,
                    training_steps: int | None = None, metrics: dict | None = None, license: str = "MIT",
                    training: dict | None = None) -> Path:
    """Write ``model`` as a published folder: ``config.json`` and ``model.safetensors`` (see the module's doc).

    Args:
        model: a zoo model (an :class:`~lebm_zoo.models.EBMModule` subclass or the LSTMLanguageModel).
        folder: created if needed; files of those names in it are replaced.
        recipe: the recipe that trained it (default: ``model.recipe``, set by ``lebm-zoo``).
        data: the data set it was trained on (e.g. ``"MNIST train (60k)"``).
        training_steps: training iterations (default: the attached trainer's ``global_step``, if any).
        metrics: name -> ``{"value": ..., "protocol": "..."}`` (e.g. ``{"fid": {"value": 84.7, "protocol":
            "1k samples vs 1k test images"}}``).
        license: the weights' license.
        training: how it was trained and evaluated, plain values (e.g. ``{"command": "lebm-zoo fit ...",
            "budget": "15 min, one thread", "cpu": "...", "evaluation": "lebm-zoo test ..."}``); written as
            ``config.json``'s ``training``.

    Returns:
        the folder.

    Raises:
        ValueError: a model that is not a zoo model, a text model without a vocabulary (its networks are not built
            yet), a hyperparameter that is not a plain value, or a metric without its value and protocol.
    """
    from safetensors.torch import save_file

    from lebm_zoo._version import __version__

    if not isinstance(model, PretrainedMixin):
        raise ValueError(f"save_pretrained writes lebm-zoo models, not a {type(model).__name__}")
    cls = type(model)
    hparams = dict(model.hparams)
    if "vocab" in hparams and hparams["vocab"] is None:
        raise ValueError(f"this {cls.__name__} has no vocabulary yet, so no networks: build it with vocab=... or "
                         "train it first")
    if training_steps is None and getattr(model, "_trainer", None) is not None:
        training_steps = int(model.trainer.global_step)
    tensors = _weights(model)
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "class_path": class_path(cls),
        "family": cls.__name__,
        "lebm_zoo_version": __version__,
        "hyperparameters": _plain(hparams, "hyperparameters"),
        "recipe": recipe if recipe is not None else getattr(model, "recipe", None),
        "data": data,
        "training_steps": None if training_steps is None else int(training_steps),
        "metrics": _check_metrics(metrics),
        "license": license,
    }
    if training:
        config["training"] = _plain(dict(training), "training")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / WEIGHTS_NAME
    save_file(tensors, str(weights), metadata={"format": "pt", "class_path": config["class_path"]})
    config["weights"] = {"file": WEIGHTS_NAME, "dtype": "float32", "tensors": len(tensors),
                         "bytes": weights.stat().st_size, "sha256": _sha256(weights)}
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return folder


def _model_card(config: dict, repo_id: str) -> str:
    rows = "".join(f"| {k} | {m['value']} | {m['protocol']} |\n" for k, m in config["metrics"].items())
    table = f"\n| metric | value | protocol |\n|---|---|---|\n{rows}" if rows else ""
    return (f"---\nlicense: {config['license'].lower()}\nlibrary_name: lebm-zoo\ntags:\n- energy-based-model\n"
            f"- {config['family']}\n---\n\n# {repo_id}\n\nA {config['family']} of lebm-zoo "
            f"(version {config['lebm_zoo_version']}), recipe "
            f"`{config['recipe']}`, trained on {config['data']} for {config['training_steps']} steps.\n{table}\n"
            f"```python\nimport lebm_zoo\nmodel = lebm_zoo.load_pretrained(\"hf://{repo_id}\")\n```\n")


def push_to_hub(model, repo_id: str, *, private: bool | None = None, token: str | None = None,
                revision: str | None = None, commit_message: str | None = None, create_repo: bool = True,
                **save_kwargs):
    """Publish ``model`` on the Hugging Face Hub: :func:`save_pretrained` into a temporary folder (with a model card
    ``README.md``), then ``huggingface_hub.HfApi().upload_folder``. It loads back with
    ``lebm_zoo.load_pretrained("hf://<repo_id>")``.

    Args:
        repo_id: ``owner/name``.
        private: visibility of a repository created here.
        token: a Hub token (default: the one ``huggingface_hub`` finds, e.g. from ``hf auth login``).
        revision: the branch to commit to (default: the main branch).
        commit_message: default ``"Upload <class> with lebm-zoo"``.
        create_repo: create the repository when it does not exist.
        save_kwargs: ``recipe``, ``data``, ``training_steps``, ``metrics``, ``license`` of :func:`save_pretrained`.

    Returns:
        what ``upload_folder`` returns (the commit's info).
    """
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="lebm_zoo_push_") as tmp:
        folder = save_pretrained(model, Path(tmp), **save_kwargs)
        config = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
        (folder / "README.md").write_text(_model_card(config, repo_id), encoding="utf-8")
        if create_repo:
            api.create_repo(repo_id=repo_id, private=private, exist_ok=True, token=token)
        return api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision, token=token,
                                 commit_message=commit_message or f"Upload {type(model).__name__} with lebm-zoo")


# -------------------------------------------------------------------------------------------------------- loading
def _read_config(path: Path) -> dict:
    try:
        cfg = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: a published folder holds {CONFIG_NAME} and {WEIGHTS_NAME}."
                              ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not a readable lebm-zoo config: {type(e).__name__}: {e}") from None
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT or not isinstance(cfg.get("class_path"), str):
        raise CheckpointError(f"{path} is not a lebm-zoo config.json (no 'format': {FORMAT!r} and 'class_path').")
    if not isinstance(cfg.get("hyperparameters", {}), dict):
        raise CheckpointError(f"{path}: 'hyperparameters' must be an object.")
    return cfg


def _config_class(cfg: dict, path: Path) -> type:
    """The zoo model class config.json names. Modules outside lebm_zoo are not imported on a config's say-so (a
    subclass of your own loads once its module is imported); anything that is not a zoo model is refused."""
    module_name = cfg["class_path"].rpartition(".")[0]
    if not (module_name == "lebm_zoo" or module_name.startswith("lebm_zoo.") or module_name in sys.modules):
        raise CheckpointError(f"{path} names {cfg['class_path']}, which is not a lebm-zoo model (a model class of "
                              "your own loads once its module is imported).")
    return model_class({"lebm_zoo": {"class_path": cfg["class_path"]}}, path)


def _check_shapes_before_building(cls: type, hparams: dict, ckpt: dict, where) -> None:
    """Build the model on the meta device (no memory) and compare its tensors' names and shapes with the stored
    weights, so that hyperparameters that do not fit them (a tampered ``nz: 1e6``) are refused before gigabytes are
    allocated. A model that cannot be built on the meta device is checked after the real build only."""
    state = ckpt.get("state_dict", {})
    try:
        with torch.device("meta"):
            probe = cls(**hparams)
    except Exception:  # noqa: BLE001 - the real build reports its own errors
        return
    want = {k: tuple(v.shape) for k, v in probe.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
    missing, unexpected = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    wrong = [f"{k}: stored {got[k]}, built {want[k]}" for k in want if k in got and got[k] != want[k]]
    if missing or unexpected or wrong:
        detail = "; ".join(filter(None, [f"missing {missing[:3]}" if missing else "",
                                         f"unexpected {unexpected[:3]}" if unexpected else "", *wrong[:3]]))
        raise CheckpointError(f"{where}: the stored weights do not fit a {cls.__name__} built from the stored "
                              f"hyperparameters: {detail}")


def _build(cls: type, hparams: dict, ckpt: dict, where) -> torch.nn.Module:
    """``cls(**hparams)`` with the checkpoint's weights; CheckpointError when they do not fit."""
    params = inspect.signature(cls.__init__).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        hparams = {k: v for k, v in hparams.items() if k in params}
    for k, v in hparams.items():  # JSON has no tuples: give tuple-valued arguments (betas=...) their type back
        if isinstance(v, list) and k in params and isinstance(params[k].default, tuple):
            hparams[k] = tuple(v)
    _check_shapes_before_building(cls, hparams, ckpt, where)
    try:
        model = cls(**hparams)
        model.on_load_checkpoint(ckpt)
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except (RuntimeError, TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: the stored weights do not fit a {cls.__name__} built from the stored "
                              f"hyperparameters: {str(e).splitlines()[0]}") from None
    return model


def _load_published(config_path: Path, weights_path: Path, map_location, expected_class, origin: str,
                    verified: bool = False):
    """Load a config.json + model.safetensors pair (``origin`` names them in errors)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    cfg = _read_config(config_path)
    cls = _config_class(cfg, config_path)
    _check_expected(cls, expected_class, origin)
    expected = (cfg.get("weights") or {}).get("sha256")
    if not weights_path.is_file():
        raise CheckpointError(f"{weights_path} is missing: a published folder holds {CONFIG_NAME} and {WEIGHTS_NAME}.")
    if expected and not verified and _sha256(weights_path) != expected:
        raise CheckpointError(f"{weights_path} does not match the sha256 its {CONFIG_NAME} records: the file was "
                              "modified or damaged; copy or download it again.")
    try:
        state = load_file(str(weights_path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{weights_path} is not a readable safetensors file (corrupt or truncated?): "
                              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    ckpt = {"state_dict": state, "hyper_parameters": dict(cfg.get("hyperparameters", {})),
            "lebm_zoo": {"class_path": cfg["class_path"], "version": cfg.get("lebm_zoo_version"),
                         "recipe": cfg.get("recipe")}}
    model = _build(cls, ckpt["hyper_parameters"], ckpt, origin)
    model.recipe = cfg.get("recipe")
    model.pretrained_config = cfg
    return model.to(map_location).eval()


def _check_expected(cls: type, expected_class: type | None, where) -> None:
    if expected_class is not None and not issubclass(cls, expected_class):
        raise CheckpointError(f"{where} holds a {cls.__name__} checkpoint, not a {expected_class.__name__}: load it "
                              f"with {cls.__name__}.load_pretrained or lebm_zoo.load_pretrained.")


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub's host (``HF_ENDPOINT``'s) accepts a connection within ``timeout`` seconds."""
    import socket
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    url = urlsplit(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError:
        return False
    return True


def _hub_download(repo: str, filename: str, revision: str | None, hub_id: str) -> Path:
    import huggingface_hub

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        # without a network the client retries for about half a minute: look once, then use only the cache
        local_only = offline or not _hub_reachable()
        return Path(huggingface_hub.hf_hub_download(repo_id=repo, filename=filename, revision=revision,
                                                    local_files_only=local_only))
    except Exception as e:  # network, offline mode, unknown repo/revision/file, auth: all reported the same way
        hint = ("HF_HUB_OFFLINE is set and the file is not in the Hugging Face cache: unset it or download it once "
                "online" if offline else "the Hub cannot be reached and the file is not in the Hugging Face cache"
                if local_only else "check the id and the network (HF_HUB_OFFLINE=1 uses only the cache)")
        raise CheckpointError(f"could not get {filename} of {hub_id} from the Hugging Face Hub: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''} ({hint}).") from e


def _load_hub(hub_id: str, map_location, expected_class):
    m = _HUB_ID.match(hub_id)
    if m is None:
        raise CheckpointError(f"{hub_id!r} is not a Hugging Face Hub id: write hf://owner/repo or "
                              "hf://owner/repo@revision.")
    repo, rev = m["repo"], m["rev"]
    config_path = _hub_download(repo, CONFIG_NAME, rev, hub_id)
    weights_path = _hub_download(repo, WEIGHTS_NAME, rev, hub_id)
    return _load_published(config_path, weights_path, map_location, expected_class, hub_id)


def _load_ckpt(path: Path, map_location, expected_class):
    ckpt = read_checkpoint(path, map_location=map_location)
    cls = model_class(ckpt, path)
    _check_expected(cls, expected_class, path)
    model = _build(cls, dict(ckpt.get("hyper_parameters", {})), ckpt, path)
    return model.to(map_location).eval()


def load_pretrained(name_or_path: str | os.PathLike, map_location: str | torch.device = "cpu",
                    expected_class: type | None = None):
    """Load a trained model.

    Args:
        name_or_path: one of

            * a name from :func:`list_pretrained` (``family-dataset[-variant]``): the files shipped with the package,
              checked against the registry's sha256 first (a string that is a registry name means the registry
              entry, even where a file or folder of that name lies in the current folder: pass ``./name`` or a
              ``Path`` for that);
            * a folder written by :func:`save_pretrained` (``config.json`` + ``model.safetensors``), or its
              ``config.json``;
            * ``hf://owner/repo[@revision]``: such a folder on the Hugging Face Hub (downloaded into, or with
              ``HF_HUB_OFFLINE=1`` read from, the Hugging Face cache);
            * a ``.ckpt`` written by ``lebm-zoo fit``;
            * a run folder (its newest ``last.ckpt`` below it).
        map_location: device for the weights (default CPU).
        expected_class: if given, the model must be of this class or a subclass of it.

    Returns:
        the model (an :class:`~lebm_zoo.models.EBMModule` subclass, or the :class:`~lebm_zoo.LSTMLanguageModel`
        used by the text metrics) in eval mode on ``map_location``. A model loaded from a published folder has its
        ``config.json`` as ``model.pretrained_config`` (metrics, data, recipe, ...).

    Raises:
        CheckpointError: missing file, unknown name, corrupt or modified file (a registry or config sha256 mismatch
            names the file), a download that failed (naming the id and the cause), not a lebm-zoo model, another
            model class than ``expected_class``, or weights that do not fit the stored hyperparameters.
    """
    text = os.fspath(name_or_path)
    if isinstance(text, str) and not text.strip():
        raise CheckpointError("load_pretrained needs a registry name (see list_pretrained()), a path or an hf:// id; "
                              "got an empty string")
    if isinstance(text, str) and text.startswith("hf://"):
        return _load_hub(text, map_location, expected_class)
    entries = {e.name: e for e in list_pretrained()}
    if text in entries and not isinstance(name_or_path, Path):  # a registry name wins over a file of that name
        entry = entries[text]
        _verify_entry(entry)
        return _load_published(entry.path / CONFIG_NAME, entry.path / WEIGHTS_NAME, map_location, expected_class,
                               f"pretrained model {entry.name!r}", verified=True)
    path = Path(text).expanduser()
    if path.is_file():
        if path.name == CONFIG_NAME or path.suffix == ".safetensors":
            return _load_published(path.parent / CONFIG_NAME, path.parent / WEIGHTS_NAME, map_location,
                                   expected_class, path.parent)
        return _load_ckpt(path, map_location, expected_class)
    if path.is_dir():
        if (path / CONFIG_NAME).is_file():
            return _load_published(path / CONFIG_NAME, path / WEIGHTS_NAME, map_location, expected_class, path)
        found = sorted(path.rglob("last.ckpt"), key=lambda p: p.stat().st_mtime)
        if found:
            return _load_ckpt(found[-1], map_location, expected_class)
        raise CheckpointError(f"{path} is a folder with neither {CONFIG_NAME} nor a last.ckpt below it; pass a "
                              ".ckpt file or a folder written by save_pretrained.")
    names = ", ".join(entries) or "none published yet"
    raise CheckpointError(f"no checkpoint file at {path.resolve()} and no published model named {text!r} "
                          f"(published: {names}).")


class PretrainedMixin:
    """The published-model methods of every zoo model (the ``EBMModule`` subclasses and the LSTM language model):
    :meth:`load_pretrained`, :meth:`save_pretrained`, :meth:`push_to_hub`. Inheriting it also marks a class as one
    whose checkpoints lebm-zoo reads (:func:`lebm_zoo.checkpoint.is_zoo_model`)."""

    lebm_zoo_model = True

    @classmethod
    def load_pretrained(cls, name_or_path: str, map_location: str | torch.device = "cpu"):
        """Load a checkpoint of this class (or a subclass); see :func:`lebm_zoo.load_pretrained`.

        Raises:
            lebm_zoo.CheckpointError: if the file holds another model, is corrupt or is no checkpoint.
        """
        return load_pretrained(name_or_path, map_location=map_location, expected_class=cls)

    def save_pretrained(self, folder, *, recipe: str | None = None, data: str | None = None,
                        training_steps: int | None = None, metrics: dict | None = None, license: str = "MIT"):
        """Write this model as a published folder, ``config.json`` + ``model.safetensors`` (fp32 weights and buffers,
        no optimiser state), that :func:`lebm_zoo.load_pretrained` loads; see
        :func:`lebm_zoo.pretrained.save_pretrained` for the arguments.

        Returns:
            the folder (a ``Path``).
        """
        return save_pretrained(self, folder, recipe=recipe, data=data, training_steps=training_steps,
                               metrics=metrics, license=license)

    def push_to_hub(self, repo_id: str, **kwargs):
        """Publish this model on the Hugging Face Hub (``save_pretrained`` into a temporary folder, then
        ``HfApi().upload_folder``); it loads back with ``lebm_zoo.load_pretrained("hf://<repo_id>")``. See
        :func:`lebm_zoo.pretrained.push_to_hub` for the arguments."""
        return push_to_hub(self, repo_id, **kwargs)
