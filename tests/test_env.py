"""`lebm-zoo env`, the CPU's bf16 support, the bf16-on-emulating-CPU warning of `fit`, and the LSTM's fallback."""
import pytest
import torch

import lebm_zoo.hardware as hardware
import lebm_zoo.precision as precision
from lebm_zoo.cli import main
from lebm_zoo.nets import SequenceDecoder


@pytest.fixture
def fresh_warning(monkeypatch):
    monkeypatch.setattr(precision, "_warned", False)


def test_env_prints_software_cpu_features_and_the_measured_fastest_precision(capsys):
    assert main(["env", "--probe-seconds", "0.5"]) == 0
    out = capsys.readouterr().out
    assert f"torch {torch.__version__}" in out and "CUDA devices:" in out
    assert f"vector capability (ATen): {torch.backends.cpu.get_cpu_capability()}" in out
    assert "avx512_bf16" in out and "amx_bf16" in out
    assert ("native bf16 (oneDNN): yes" in out) == hardware.native_bf16()
    line = next(ln for ln in out.splitlines() if ln.startswith("probe ("))
    fp32_ms, bf16_ms = (float(line.split(p)[1].split()[0]) for p in ("fp32 ", "bf16-mixed "))
    fastest = next(ln for ln in out.splitlines() if ln.startswith("fastest precision"))
    assert ("bf16-mixed" in fastest) == (bf16_ms < fp32_ms) or abs(bf16_ms - fp32_ms) <= 1  # ms rounding


def test_probe_times_both_precisions():
    p = precision.probe_precision(0.2, batch=4)
    assert p["32-true"] > 0 and p["bf16-mixed"] > 0
    assert p["bf16_speedup"] == pytest.approx(p["32-true"] / p["bf16-mixed"])
    assert p["fastest"] == ("bf16-mixed" if p["bf16_speedup"] > 1 else "32-true")
    with pytest.raises(ValueError, match="seconds must be > 0"):
        precision.probe_precision(0)


def test_cpu_info_reports_capability_and_flags():
    info = hardware.cpu_info()
    assert info["capability"] == torch.backends.cpu.get_cpu_capability()
    assert set(info["flags"]) == {"avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}
    assert info["native_bf16"] == hardware.native_bf16()


def test_bf16_warning_only_on_a_cpu_without_bf16_units_and_only_once(monkeypatch, fresh_warning):
    monkeypatch.setattr(precision, "native_bf16", lambda: True)
    assert precision.warn_if_emulated_bf16("bf16-mixed", "cpu", probe_seconds=0) is None
    monkeypatch.setattr(precision, "native_bf16", lambda: False)
    assert precision.warn_if_emulated_bf16("32-true", "cpu", probe_seconds=0) is None
    assert precision.warn_if_emulated_bf16("bf16-mixed", "cuda", probe_seconds=0) is None
    with pytest.warns(UserWarning, match="without bf16 units.*emulated.*slower than in fp32.*32-true"):
        msg = precision.warn_if_emulated_bf16("bf16-mixed", "cpu", probe_seconds=0.2)
    assert "x slower" in msg
    assert precision.warn_if_emulated_bf16("bf16-mixed", "cpu", probe_seconds=0) is None  # once per process


def test_fit_warns_once_on_stderr_when_bf16_is_emulated(tmp_path, capsys, monkeypatch, fresh_warning):
    monkeypatch.setattr(precision, "native_bf16", lambda: False)
    code = main(["fit", "--recipe", "quickstart", "--trainer.default_root_dir", str(tmp_path), "--trainer.max_steps",
                 "1", "--trainer.limit_val_batches", "0", "--trainer.precision", "bf16-mixed",
                 "--trainer.enable_progress_bar", "false", "--model.prior_steps", "2", "--model.posterior_steps", "2"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert err.count("lebm-zoo: warning: --trainer.precision bf16-mixed on a CPU without bf16 units") == 1


def test_lstm_under_cpu_autocast_without_native_bf16_runs_atens_lstm(monkeypatch):
    # oneDNN cannot build a bf16 LSTM on a CPU without bf16 units; the decoder then runs ATen's LSTM in bf16
    import lebm_zoo.nets as nets

    torch.manual_seed(0)
    dec = SequenceDecoder(vocab_size=12, nz=3, emb_dim=8, hidden=8)
    tokens, z = torch.randint(0, 12, (4, 6)), torch.randn(4, 3)
    with torch.no_grad():
        exact = dec(tokens, z)[0]
        monkeypatch.setattr(nets, "native_bf16", lambda: False)
        used = []
        real_flags = torch.backends.mkldnn.flags

        def spy(*args, **kwargs):
            used.append(kwargs.get("enabled", args[0] if args else None))
            return real_flags(*args, **kwargs)

        monkeypatch.setattr(torch.backends.mkldnn, "flags", spy)
        with torch.autocast("cpu", torch.bfloat16):
            low = dec(tokens, z)[0]
    assert used == [False] and low.dtype == torch.bfloat16
    # bf16 keeps 8 significant bits (2^-9 relative per rounding); logits ~1 after a few roundings: within 2%
    assert (low.float() - exact).norm() <= 2e-2 * exact.norm()
