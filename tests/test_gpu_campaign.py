"""benchmarks/gpu_campaign.py and benchmarks/campaign_report.py: the campaign files expand to the runs the GPU call
trains, the dry run goes through the whole pipeline on the CPU (fit, test, weights, samples, packing), and the report
reads what comes back (tables, FID on stored samples, publishing into a registry)."""
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from _data import write_mnist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import campaign_report  # noqa: E402
import gpu_campaign  # noqa: E402

from lebm_zoo.errors import UsageError  # noqa: E402

CAMPAIGNS = [ROOT / "benchmarks" / "campaigns" / "anomaly.yaml", ROOT / "benchmarks" / "campaigns" / "mnist_zoo.yaml"]


def test_campaign_files_expand_to_the_issue_runs():
    runs = gpu_campaign.load_campaigns(CAMPAIGNS)
    anomaly = [r for r in runs if r["campaign"] == "anomaly"]
    zoo = [r for r in runs if r["campaign"] == "mnist_zoo"]
    assert len(anomaly) == 30 and runs[:30] == anomaly  # first in priority
    assert {(r["recipe"], r["digit"], r["seed"]) for r in anomaly} == {
        (rec, d, s) for rec in ("mnist_anomaly_prior", "mnist_anomaly_hierarchical") for d in (1, 4, 5, 7, 9)
        for s in (1, 2, 3)}
    run = next(r for r in anomaly if r["name"] == "lebm-anomaly-d7-s2")
    assert run["overrides"][-2:] == ["--data.heldout_digit", "7"] and run["publish"] == "lebm-mnist-anomaly-digit7"
    assert {r["recipe"] for r in zoo} == {"mnist_prior", "mnist_shortrun", "mnist_coopnets", "mnist_triangle",
                                          "mnist_fce_glow", "mnist_hierarchical", "mnist_semisup", "mnist_drl"}
    assert len(zoo) == 9 and all(r["fid_samples"] == 1000 for r in zoo)
    assert "gaussian" in next(r for r in zoo if r["name"] == "lebm-mnist-gaussian")["overrides"]


def test_campaign_config_drops_what_cannot_run_on_the_gpu_machine(tmp_path):
    path, has_metrics = gpu_campaign.campaign_config("mnist_prior", tmp_path)
    import yaml

    cfg = yaml.safe_load(path.read_text())
    kinds = [c["class_path"] for c in cfg["trainer"]["callbacks"]]
    assert "lebm_zoo.callbacks.FIDCallback" not in kinds and "lebm_zoo.callbacks.ReconstructionMSE" in kinds
    assert has_metrics and cfg["trainer"]["limit_val_batches"] == 0
    assert not gpu_campaign.campaign_config("mnist_shortrun", tmp_path)[1]  # FID only: nothing to test there


def test_which_recipes_take_capture_step(tmp_path):
    takes = {r: gpu_campaign.takes_capture_step(gpu_campaign.campaign_config(r, tmp_path)[0])
             for r in ("mnist_prior", "mnist_hierarchical", "mnist_triangle", "mnist_semisup", "mnist_fce_glow")}
    assert takes == {"mnist_prior": True, "mnist_hierarchical": True, "mnist_triangle": False, "mnist_semisup": True,
                     "mnist_fce_glow": False}


def test_the_budget_is_split_into_waves(tmp_path, capsys):
    with pytest.raises(UsageError, match="give one or more campaign files"):
        gpu_campaign.main(["--out", str(tmp_path)])
    with pytest.raises(UsageError, match="39 runs in 39 waves of 1 leave"):
        gpu_campaign.main([*map(str, CAMPAIGNS), "--parallel", "1", "--out", str(tmp_path)])
    # from the command line: one line and exit code 2, nothing written
    script = Path(gpu_campaign.__file__)
    out = subprocess.run([sys.executable, str(script), *map(str, CAMPAIGNS), "--parallel", "1", "--out",
                          str(tmp_path / "out")], capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.startswith("gpu_campaign.py: 39 runs in 39 waves")
    assert len(out.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_dry_run_then_report_and_publish(tmp_path, monkeypatch, capsys):
    """Both campaigns on the CPU at two steps a run (each entry once), then the report on what was packed, FID with a
    small feature net, and publishing into a registry of its own."""
    data = tmp_path / "data"
    (data / "mnist").mkdir(parents=True)
    write_mnist(data / "mnist", n=1200)
    out = tmp_path / "out"
    code = gpu_campaign.main([*map(str, CAMPAIGNS), "--dry-run", "--data", str(data), "--out", str(out),
                              "--work", str(tmp_path / "work"), "--capture-step"])
    assert code == 0, capsys.readouterr().out[-3000:]
    parts = sorted(out.glob("campaign-part*.zip"))
    assert 1 <= len(parts) <= 8 and all(p.stat().st_size <= 16_000_000 for p in parts)
    with zipfile.ZipFile(parts[0]) as z:
        summary = json.loads(z.read("summary.json"))
    recs = {r["name"]: r for r in summary["runs"]}
    assert len(recs) == 11 and not [r for r in recs.values() if "error" in r]
    for name in ("lebm-anomaly-d1-s1", "hierarchical-anomaly-d1-s1"):  # the AUPRC and AUROC computed there
        assert 0 <= recs[name]["metrics"]["test/auprc"] <= 1 and 0 <= recs[name]["metrics"]["test/auroc"] <= 1
    assert 0 < recs["lebm-mnist"]["metrics"]["test/recon_mse"] < 1 and recs["lebm-mnist"]["iterations"] == 2
    assert 0 <= recs["semisup-mnist"]["metrics"]["test/accuracy"] <= 1
    assert recs["drl-mnist"]["samples"] == 16 and recs["lebm-mnist"]["device"] == "cpu"
    # --capture-step: the runs whose model has the option trained with it (on a CPU: the eager step) and SyncEvery
    captured = {name for name, r in recs.items() if r["capture_step"]}
    assert captured == {"lebm-anomaly-d1-s1", "hierarchical-anomaly-d1-s1", "lebm-mnist", "lebm-mnist-gaussian",
                        "shortrun-mnist", "coopnets-mnist", "hierarchical-mnist", "semisup-mnist", "drl-mnist"}
    assert "--model.capture_step true --trainer.callbacks+=lebm_zoo.callbacks.SyncEvery" in " ".join(
        json.loads((tmp_path / "work" / "runs" / "lebm-mnist" / "weights" / "config.json").read_text())
        ["training"]["command"].split())

    work = tmp_path / "report"
    assert campaign_report.main([str(out), "--work", str(work), "--no-fid"]) == 0
    text = (work / "report.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| ours, LEBM |"))
    assert f"{recs['lebm-anomaly-d1-s1']['metrics']['test/auprc']:.3f} +- 0.000" in row and "1 seeds" in row
    assert "| `drl-mnist` | `mnist_drl` | 2 |" in text

    from test_callbacks import TinyFeature

    fid = campaign_report.fid_of_samples(work / "runs" / "lebm-mnist" / "samples.npz", str(data / "mnist"),
                                         feature=TinyFeature(), num=16)
    assert fid > 0

    import publish_pretrained as pp

    from lebm_zoo import pretrained as P

    registry = tmp_path / "registry"
    registry.mkdir()
    monkeypatch.setattr(P, "WEIGHTS_DIR", registry)
    monkeypatch.setattr(P, "INDEX_PATH", registry / "index.json")
    monkeypatch.setattr(pp, "FINGERPRINTS", tmp_path / "fingerprints.json")
    records = json.loads((work / "records.json").read_text())
    records[2]["fid"] = 12.5
    done = campaign_report.publish(records, work)
    assert "lebm-mnist" in done and "lebm-mnist-anomaly-digit1" in done and len(done) == 11
    entry = {e.name: e for e in P.list_pretrained()}["lebm-mnist"]
    assert entry.metrics["fid"]["value"] == 12.5 and "recon_mse" in entry.metrics
    model = P.load_pretrained("lebm-mnist")
    assert model.pretrained_config["training"]["iterations"] == 2
    assert set(json.loads((tmp_path / "fingerprints.json").read_text())) == set(done)


def test_a_worker_stopped_after_training_keeps_its_weights_and_says_where_it_stopped(tmp_path, monkeypatch):
    """The weights and the record are written after each phase: a worker killed at the deadline during its test
    (here: the test command raising) leaves trained weights that get packed, and a record that says it stopped."""
    import lebm_zoo.cli

    data = tmp_path / "data"
    (data / "mnist").mkdir(parents=True)
    write_mnist(data / "mnist", n=1200)
    run = next(r for r in gpu_campaign.load_campaigns(CAMPAIGNS[:1]) if r["name"] == "lebm-anomaly-d1-s1")
    real_cli = lebm_zoo.cli.main

    def cli(argv):
        if argv[0] == "test":
            raise KeyboardInterrupt  # the deadline's kill, while testing
        return real_cli(argv)

    monkeypatch.setattr(lebm_zoo.cli, "main", cli)
    with pytest.raises(KeyboardInterrupt):
        gpu_campaign.run_one(run, tmp_path / "work", str(data), 10, True)
    folder = tmp_path / "work" / "runs" / run["name"]
    record = json.loads((folder / "record.json").read_text())
    assert record["error"] == "stopped after training (not tested, no samples)" and record["iterations"] == 2
    assert (folder / "weights" / "model.safetensors").is_file()
    config = json.loads((folder / "weights" / "config.json").read_text())
    assert config["training"]["iterations"] == 2 and config.get("metrics", {}) == {}
    parts = gpu_campaign.pack(tmp_path / "work", tmp_path / "out", [record])
    with zipfile.ZipFile(parts[0]) as z:
        assert f"runs/{run['name']}/weights/model.safetensors" in z.namelist()


def test_a_worker_stopped_by_sigterm_in_training_ships_its_weights(tmp_path, monkeypatch):
    """At its time limit a worker gets SIGTERM; ``lebm-zoo fit`` then writes ``last.ckpt`` and exits 143 (here: the
    fit runs, then answers 143). The run keeps those weights, is neither tested nor sampled, and says why."""
    import lebm_zoo.cli

    data = tmp_path / "data"
    (data / "mnist").mkdir(parents=True)
    write_mnist(data / "mnist", n=1200)
    run = next(r for r in gpu_campaign.load_campaigns(CAMPAIGNS[:1]) if r["name"] == "lebm-anomaly-d1-s1")
    real_cli, commands = lebm_zoo.cli.main, []

    def cli(argv):
        commands.append(argv[0])
        return 143 if real_cli(argv) == 0 and argv[0] == "fit" else 1

    monkeypatch.setattr(lebm_zoo.cli, "main", cli)
    record = gpu_campaign.run_one(run, tmp_path / "work", str(data), 10, True)
    folder = tmp_path / "work" / "runs" / run["name"]
    assert commands == ["fit"] and record["fit_exit_code"] == 143 and record["iterations"] == 2
    assert record["error"] == ("stopped after training, by SIGTERM at its time limit or the deadline (not tested, "
                               "no samples)")
    assert json.loads((folder / "record.json").read_text()) == record
    assert (folder / "weights" / "model.safetensors").is_file() and not (folder / "samples.npz").exists()
    # a fit that failed otherwise ships nothing
    monkeypatch.setattr(lebm_zoo.cli, "main", lambda argv: 1)
    assert gpu_campaign.run_one(run, tmp_path / "work", str(data), 10, True)["error"].startswith("fit exited 1")


def test_stop_workers_terminates_then_kills_after_one_grace_period():
    """SIGTERM first (a worker that handles it exits on its own); SIGKILL, after one grace period shared by all, to
    those that ignore it; a worker that already exited is left alone."""
    import time

    code = "import signal, sys, time; signal.signal(signal.SIGTERM, {}); print('ready', flush=True); time.sleep(60)"
    polite = subprocess.Popen([sys.executable, "-c", code.format("lambda *a: sys.exit(143)")], stdout=subprocess.PIPE)
    stubborn = [subprocess.Popen([sys.executable, "-c", code.format("signal.SIG_IGN")], stdout=subprocess.PIPE)
                for _ in range(3)]
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    for p in (polite, *stubborn):
        assert p.stdout.readline().strip() == b"ready"  # its handler is in place
    t0 = time.time()
    gpu_campaign.stop_workers([polite, *stubborn, done], grace=1.0)
    took = time.time() - t0
    assert polite.returncode == 143 and [p.returncode for p in stubborn] == [-9] * 3 and done.returncode == 0
    assert 1.0 <= took < 2.5  # one grace period for the three stubborn workers, not one each (3 s)
    for p in (polite, *stubborn):
        p.stdout.close()


@pytest.mark.slow
def test_the_real_schedule_runs_its_workers_and_packs_what_they_made(tmp_path, capsys):
    """Not a dry run: each run in its own worker process (``gpu_campaign.py --worker``, as on the GPU machine),
    trained under ``--trainer.max_time``, tested, saved and packed (on a CPU, here, at tiny sizes given as the run's
    own overrides). The dry run trains in its own process, so only this test covers the worker's command line."""
    import yaml

    data = tmp_path / "data"
    (data / "mnist").mkdir(parents=True)
    write_mnist(data / "mnist", n=1200)
    campaign = tmp_path / "tiny.yaml"
    tiny = ["--data.data_dir", "{data}/mnist", "--data.num_workers", "0", "--data.heldout_digit", "1",
            "--data.batch_size", "400", "--model.prior_steps", "2", "--model.posterior_steps", "2",
            *gpu_campaign.DRY_OVERRIDES]
    campaign.write_text(yaml.safe_dump({"name": "tiny", "priority": 1, "runs": [
        {"name": "tiny-lebm", "recipe": "mnist_anomaly_prior", "seed": 1, "overrides": tiny}]}))
    out = tmp_path / "out"
    code = gpu_campaign.main([str(campaign), "--data", str(data), "--out", str(out), "--budget", "120",
                              "--startup", "10", "--eval-margin", "30", "--parallel", "1", "--work",
                              str(tmp_path / "work")])
    printed = capsys.readouterr().out
    assert code == 0, printed + (tmp_path / "work" / "logs" / "tiny-lebm.log").read_text()[-3000:]
    assert "1 of 1 runs done" in printed and "80 s of training each" in printed
    record = json.loads((tmp_path / "work" / "runs" / "tiny-lebm" / "record.json").read_text())
    assert record["fit_exit_code"] == 0 and record["iterations"] == 2 and "error" not in record
    assert {"test/auprc", "test/auroc"} <= set(record["metrics"])
    (part,) = sorted(out.glob("campaign-part*.zip"))
    with zipfile.ZipFile(part) as z:
        assert "runs/tiny-lebm/weights/model.safetensors" in z.namelist()
    # the worker's command line alone, as main starts it, is not an error (it was: 'campaigns' required)
    assert "the following arguments are required" not in (tmp_path / "work" / "logs" / "tiny-lebm.log").read_text()


def test_runs_that_wrote_no_record_keep_their_place_in_the_report():
    """A run never started (the budget spent) or whose worker died before writing its record gets a stub record: the
    run as listed and the reason. The report then counts it with its campaign, not as a zoo run."""
    runs = gpu_campaign.load_campaigns(CAMPAIGNS)
    anomaly = next(r for r in runs if r["name"] == "lebm-anomaly-d4-s2")
    stub = gpu_campaign.stub_record(anomaly, "not started: the wall budget was spent")
    assert stub["campaign"] == "anomaly" and stub["model"] == "prior" and stub["digit"] == 4
    assert stub["error"] == "not started: the wall budget was spent" and not any(k.startswith("_") for k in stub)
    assert f"`{stub['name']}`" not in campaign_report.zoo_table([stub])  # (a stub without its campaign was listed)
