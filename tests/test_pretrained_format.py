"""The published format (config.json + model.safetensors), the shipped registry, Hub ids and push_to_hub."""
import functools
import json
import shutil
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch
from _data import TINY_MODELS
from safetensors.torch import load_file

import lebm_zoo
import lebm_zoo.pretrained as pretrained
from datamodules import Vocabulary
from lebm_zoo import CheckpointError, LatentEBMPrior, SequenceLatentEBMPrior, ShortRunEBM
from lebm_zoo.fingerprint import fingerprint


def latent_prior():
    return LatentEBMPrior(img_size=28, channels=1, nz=8, ngf=4, ndf=16, prior_steps=3, posterior_steps=3)


def short_run():
    m = ShortRunEBM(img_size=28, channels=1, nf=4, n_steps=3, init="persistent", buffer_size=6)
    with torch.no_grad():
        m.replay_buffer.copy_(torch.linspace(-1, 1, m.replay_buffer.numel()).reshape(m.replay_buffer.shape))
    return m


def sequence_prior():
    return SequenceLatentEBMPrior(vocab=Vocabulary(["a", "b", "c", "d"]).to_list(), nz=2, ndf=8, emb_dim=8,
                                  hidden=8, prior_steps=3, posterior_steps=3, max_decode_length=8)


def language_model():
    return lebm_zoo.LSTMLanguageModel(vocab=Vocabulary(["a", "b", "c"]).to_list(), emb_dim=4, hidden=4)


def same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def draw(model, seed=0):
    torch.manual_seed(seed)
    return model.sample(4)


@pytest.mark.parametrize("make", [latent_prior, short_run, sequence_prior], ids=["lebm", "shortrun", "sequence"])
def test_round_trip(make, tmp_path):
    torch.manual_seed(1)
    model = make().eval()
    folder = model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    torch.manual_seed(2)  # the loaded model's fresh initialisation differs: equal weights come from the file
    loaded = lebm_zoo.load_pretrained(folder)
    assert type(loaded) is type(model) and not loaded.training
    assert same_state(model, loaded)
    a, b = draw(model), draw(loaded)
    assert a == b if isinstance(a, list) else torch.equal(a, b)
    assert dict(loaded.hparams) == dict(model.hparams)  # tuples (betas) come back as tuples
    assert loaded.pretrained_config["family"] == type(model).__name__


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_every_family_round_trips_with_its_fingerprint(name, tmp_path):
    """save_pretrained -> load_pretrained for every model class: the same weights, hyperparameters and fingerprint."""
    torch.manual_seed(3)
    model = TINY_MODELS[name]().eval()
    loaded = lebm_zoo.load_pretrained(model.save_pretrained(tmp_path / name, data="tiny"))
    assert type(loaded) is type(model) and same_state(model, loaded)
    assert dict(loaded.hparams) == dict(model.hparams)
    before = fingerprint(model)
    assert before and all(torch.isfinite(torch.tensor(v)) for v in before.values())
    assert fingerprint(loaded) == before
    # the fingerprint sees the weights of every network: perturb one and it moves
    for net_name, net in loaded.named_children():
        params = [p for p in net.parameters() if p.is_floating_point()]
        if not params:
            continue
        with torch.no_grad():
            params[0].add_(0.5)
        assert fingerprint(loaded) != before, net_name
        with torch.no_grad():
            params[0].sub_(0.5)


def test_short_run_buffer_and_vocabulary_travel(tmp_path):
    sr = short_run()
    loaded = lebm_zoo.load_pretrained(sr.save_pretrained(tmp_path / "sr"))
    assert loaded.replay_buffer.shape == (6, 1, 28, 28) and torch.equal(loaded.replay_buffer, sr.replay_buffer)
    seq = sequence_prior()
    loaded = SequenceLatentEBMPrior.load_pretrained(seq.save_pretrained(tmp_path / "seq"))
    assert loaded.vocab_obj == seq.vocab_obj and loaded.decode(seq.encode(["a b"])["tokens"]) == ["a b"]


def test_language_model_round_trip(tmp_path):
    lm = language_model()
    loaded = lebm_zoo.LSTMLanguageModel.load_pretrained(lm.save_pretrained(tmp_path / "lm"))
    assert same_state(lm, loaded)
    with pytest.raises(CheckpointError, match="not a LatentEBMPrior"):
        LatentEBMPrior.load_pretrained(tmp_path / "lm")


def test_text_model_without_vocabulary_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no vocabulary"):
        SequenceLatentEBMPrior(nz=2, ndf=8, emb_dim=8, hidden=8).save_pretrained(tmp_path / "x")


def test_config_fields(tmp_path):
    model = latent_prior().double()  # stored as fp32 whatever the model's precision
    model.recipe = "mnist_prior"
    metrics = {"fid": {"value": 84.7, "protocol": "1k samples vs 1k test images"}}
    folder = model.save_pretrained(tmp_path / "m", data="MNIST train (60k)", training_steps=1234, metrics=metrics,
                                   license="CC-BY-4.0")
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["format"] == "lebm-zoo-pretrained" and cfg["format_version"] == 1
    assert cfg["class_path"] == "lebm_zoo.models.latent_prior.LatentEBMPrior"
    assert cfg["family"] == "LatentEBMPrior"
    assert cfg["lebm_zoo_version"] == lebm_zoo.__version__
    assert cfg["recipe"] == "mnist_prior" and cfg["data"] == "MNIST train (60k)" and cfg["training_steps"] == 1234
    assert cfg["metrics"] == metrics and cfg["license"] == "CC-BY-4.0"
    assert cfg["hyperparameters"]["nz"] == 8 and cfg["hyperparameters"]["betas"] == [0.5, 0.999]
    tensors = load_file(folder / "model.safetensors")
    assert tensors.keys() == model.state_dict().keys()  # weights and buffers, no optimiser state
    assert {t.dtype for t in tensors.values()} == {torch.float32}
    assert cfg["weights"]["file"] == "model.safetensors" and cfg["weights"]["tensors"] == len(tensors)
    assert cfg["weights"]["bytes"] == (folder / "model.safetensors").stat().st_size
    assert lebm_zoo.load_pretrained(folder / "config.json").recipe == "mnist_prior"
    seq_cfg = json.loads((sequence_prior().save_pretrained(tmp_path / "s") / "config.json").read_text())
    assert seq_cfg["hyperparameters"]["vocab"][-4:] == ["a", "b", "c", "d"] and seq_cfg["hyperparameters"]["sep"] == " "


def test_metrics_need_value_and_protocol(tmp_path):
    with pytest.raises(ValueError, match="protocol"):
        latent_prior().save_pretrained(tmp_path / "m", metrics={"fid": 84.7})


# ----------------------------------------------------------------------------------------------- tamper-proofing
def edit_config(folder: Path, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    for k, v in changes.items():
        if k == "hyperparameters":
            cfg[k].update(v)
        else:
            cfg[k] = v
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("class_path", ["torch.nn.Linear", "lebm_zoo.samplers.LangevinSampler",
                                        "evil_module_that_does_not_exist.Model"])
def test_config_naming_a_foreign_class_is_refused(class_path, tmp_path):
    folder = latent_prior().save_pretrained(tmp_path / "m")
    edit_config(folder, class_path=class_path)
    with pytest.raises(CheckpointError, match="not a lebm-zoo model"):
        lebm_zoo.load_pretrained(folder)
    assert "evil_module_that_does_not_exist" not in sys.modules  # not even tried


def test_weights_that_do_not_fit_the_config(tmp_path):
    folder = latent_prior().save_pretrained(tmp_path / "m")
    edit_config(folder, hyperparameters={"nz": 16})
    with pytest.raises(CheckpointError, match="do not fit a LatentEBMPrior"):
        lebm_zoo.load_pretrained(folder)


def test_modified_or_truncated_weights(tmp_path):
    folder = latent_prior().save_pretrained(tmp_path / "m")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="model.safetensors does not match the sha256"):
        lebm_zoo.load_pretrained(folder)
    edit_config(folder, weights={})  # no recorded digest: the safetensors reader's own error, as a CheckpointError
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        lebm_zoo.load_pretrained(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a readable lebm-zoo config"):
        lebm_zoo.load_pretrained(folder)


def test_lightning_checkpoints_and_run_folders_still_load(tmp_path):
    model = latent_prior()
    cls = type(model)
    ckpt = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
            "lebm_zoo": {"class_path": f"{cls.__module__}.{cls.__qualname__}"}}
    path = tmp_path / "run" / "checkpoints" / "last.ckpt"
    path.parent.mkdir(parents=True)
    torch.save(ckpt, path)
    assert same_state(model, lebm_zoo.load_pretrained(path))
    assert same_state(model, lebm_zoo.load_pretrained(tmp_path / "run"))


# ------------------------------------------------------------------------------------------------------ registry
@pytest.fixture
def registry(tmp_path, monkeypatch):
    """A temporary registry holding ``lebm-mnist`` (a tiny LatentEBMPrior); returns (model, index path)."""
    root = tmp_path / "weights"
    model = latent_prior()
    metrics = {"fid": {"value": 99.0, "protocol": "test"}}
    folder = model.save_pretrained(root / "lebm-mnist", recipe="mnist_prior", data="MNIST", metrics=metrics)
    index = root / "index.json"
    index.write_text(json.dumps([pretrained.make_registry_entry(folder, "lebm-mnist")]))
    monkeypatch.setattr(pretrained, "INDEX_PATH", index)
    return model, index


def test_registry_entry_loads_by_name(registry):
    model, index = registry
    (entry,) = lebm_zoo.list_pretrained()
    assert str(entry) == entry.name == "lebm-mnist" and [str(e) for e in lebm_zoo.list_pretrained()] == ["lebm-mnist"]
    assert entry.family == "LatentEBMPrior" and entry.recipe == "mnist_prior" and entry.data == "MNIST"
    assert entry.metrics == {"fid": {"value": 99.0, "protocol": "test"}} and entry.license == "MIT"
    assert entry.path == index.parent / "lebm-mnist"
    assert set(entry.sha256) == {"config.json", "model.safetensors"}
    assert entry.size == sum((entry.path / f).stat().st_size for f in entry.sha256)
    assert same_state(model, lebm_zoo.load_pretrained("lebm-mnist"))
    assert same_state(model, LatentEBMPrior.load_pretrained("lebm-mnist"))
    with pytest.raises(CheckpointError, match="not a ShortRunEBM"):
        ShortRunEBM.load_pretrained("lebm-mnist")


@pytest.mark.parametrize("file", ["model.safetensors", "config.json"])
def test_registry_refuses_a_modified_file(registry, file):
    _, index = registry
    path = index.parent / "lebm-mnist" / file
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one byte
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"lebm-mnist.*{file}.*modified or damaged"):
        lebm_zoo.load_pretrained("lebm-mnist")


def test_unknown_name_lists_the_known_ones(registry, tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match=r"no published model named 'lebm-cifar10' \(published: lebm-mnist\)"):
        lebm_zoo.load_pretrained("lebm-cifar10")
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    monkeypatch.setattr(pretrained, "INDEX_PATH", empty)
    assert lebm_zoo.list_pretrained() == []
    with pytest.raises(CheckpointError, match="none published yet"):
        lebm_zoo.load_pretrained("lebm-mnist")


def test_registry_names_and_malformed_index(registry, tmp_path, monkeypatch):
    _, index = registry
    with pytest.raises(ValueError, match="family-dataset"):
        pretrained.make_registry_entry(index.parent / "lebm-mnist", "LEBM_mnist")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"name": "lebm-mnist"}]))
    monkeypatch.setattr(pretrained, "INDEX_PATH", bad)
    with pytest.raises(CheckpointError, match="entry 0 is malformed"):
        lebm_zoo.list_pretrained()


def test_shipped_index_is_valid():
    assert json.loads(pretrained.INDEX_PATH.read_text()) is not None
    for entry in lebm_zoo.list_pretrained():
        assert (entry.path / "config.json").is_file() and (entry.path / "model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------- Hub id and push
def test_hub_id_resolves_through_hf_hub_download(tmp_path, monkeypatch):
    model = sequence_prior()
    folder = model.save_pretrained(tmp_path / "hub")
    calls = []

    def fake_download(repo_id, filename, revision=None, **kw):
        calls.append((repo_id, filename, revision))
        return str(folder / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    assert same_state(model, lebm_zoo.load_pretrained("hf://someone/lebm-ptb@v1.0"))
    assert calls == [("someone/lebm-ptb", "config.json", "v1.0"), ("someone/lebm-ptb", "model.safetensors", "v1.0")]
    calls.clear()
    SequenceLatentEBMPrior.load_pretrained("hf://someone/lebm-ptb")
    assert calls[0] == ("someone/lebm-ptb", "config.json", None)
    with pytest.raises(CheckpointError, match="not a Hugging Face Hub id"):
        lebm_zoo.load_pretrained("hf://no-repo-name")


def _hub_cache(root: Path, repo: str, folder: Path, commit: str) -> None:
    """Lay ``folder``'s files out as huggingface_hub's cache holds a download of ``repo`` at ``commit`` (main):
    ``models--owner--name/{blobs/<sha256>, snapshots/<commit>/<file> -> ../../blobs/<sha256>, refs/main}``."""
    import hashlib

    base = root / ("models--" + repo.replace("/", "--"))
    (base / "blobs").mkdir(parents=True)
    (base / "refs").mkdir()
    snap = base / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in folder.iterdir():
        blob = base / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, blob)
        (snap / f.name).symlink_to(Path("..") / ".." / "blobs" / blob.name)
    (base / "refs" / "main").write_text(commit)


def test_hub_id_loads_offline_from_the_real_hub_cache(tmp_path):
    """The real huggingface_hub code path: HF_HUB_OFFLINE=1 and a cache in its own layout, in a fresh process (the
    library reads both variables at import)."""
    import os
    import subprocess

    model = sequence_prior()
    folder = model.save_pretrained(tmp_path / "published")
    commit = "0123456789abcdef0123456789abcdef01234567"
    _hub_cache(tmp_path / "hf" / "hub", "someone/lebm-tiny", folder, commit)
    torch.save(model.state_dict(), tmp_path / "expected.pt")
    script = (
        "import sys, torch, lebm_zoo\n"
        "exp = torch.load(sys.argv[1], weights_only=True)\n"
        "ids = ('hf://someone/lebm-tiny', 'hf://someone/lebm-tiny@main', 'hf://someone/lebm-tiny@" + commit + "')\n"
        "for ident in ids:\n"
        "    m = lebm_zoo.load_pretrained(ident)\n"
        "    got = m.state_dict()\n"
        "    assert got.keys() == exp.keys() and all(torch.equal(got[k], exp[k]) for k in exp), ident\n"
        "try:\n"
        "    lebm_zoo.load_pretrained('hf://someone/not-cached')\n"
        "except lebm_zoo.CheckpointError as e:\n"
        "    print('REFUSED', e)\n"
        "print('OK')\n")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    env.pop("HUGGINGFACE_HUB_CACHE", None)
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path / "expected.pt")], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().endswith("OK")
    assert "REFUSED" in r.stdout and "HF_HUB_OFFLINE is set" in r.stdout and "someone/not-cached" in r.stdout


def test_hub_errors_become_checkpoint_errors(monkeypatch):
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(repo_id, filename, revision=None, **kw):
        raise LocalEntryNotFoundError("Cannot find the requested files in the disk cache and outgoing traffic has "
                                      "been disabled.")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match=r"config.json of hf://someone/lebm-mnist .*LocalEntryNotFoundError.*"
                                              r"HF_HUB_OFFLINE") as info:
        lebm_zoo.load_pretrained("hf://someone/lebm-mnist")
    assert isinstance(info.value.__cause__, LocalEntryNotFoundError)

    def no_network(repo_id, filename, revision=None, **kw):
        raise ConnectionError("Failed to establish a new connection")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(CheckpointError, match="hf://someone/lebm-mnist.*ConnectionError: Failed to establish"):
        lebm_zoo.load_pretrained("hf://someone/lebm-mnist")


def test_push_to_hub_uploads_the_saved_folder(tmp_path, monkeypatch):
    calls = {}
    uploaded = tmp_path / "uploaded"

    def create_repo(self, repo_id, **kw):
        calls["create_repo"] = (repo_id, kw)

    def upload_folder(self, *, repo_id, folder_path, **kw):
        calls["upload_folder"] = (repo_id, kw)
        shutil.copytree(folder_path, uploaded)  # the temporary folder is gone once push_to_hub returns
        return "commit-info"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    model = short_run()
    metrics = {"fid": {"value": 50.0, "protocol": "1k samples"}}
    out = model.push_to_hub("me/shortrun-mnist", private=True, data="MNIST", metrics=metrics, training_steps=10)
    assert out == "commit-info"
    assert calls["create_repo"] == ("me/shortrun-mnist", {"private": True, "exist_ok": True, "token": None})
    assert calls["upload_folder"][0] == "me/shortrun-mnist"
    assert "ShortRunEBM" in calls["upload_folder"][1]["commit_message"]
    assert sorted(p.name for p in uploaded.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    card = (uploaded / "README.md").read_text()
    assert "library_name: lebm-zoo" in card and 'load_pretrained("hf://me/shortrun-mnist")' in card
    cfg = json.loads((uploaded / "config.json").read_text())
    assert cfg["metrics"] == metrics and cfg["data"] == "MNIST" and cfg["training_steps"] == 10
    assert same_state(model, lebm_zoo.load_pretrained(uploaded))


class UserModel(lebm_zoo.EBMModule):
    """A model of the user's own (README "Adding a model"): its module is imported, so its config loads."""

    def __init__(self, width: int = 3):
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Linear(width, 1)

    def sample(self, n):
        return self.net.weight.expand(n, -1)


def test_a_users_own_model_class_loads_once_imported(tmp_path):
    model = UserModel(width=5)
    loaded = lebm_zoo.load_pretrained(model.save_pretrained(tmp_path / "u"))
    assert type(loaded) is UserModel and same_state(model, loaded)


@pytest.mark.parametrize("reachable", [True, False])
def test_an_unreachable_hub_is_asked_once_then_only_the_cache(monkeypatch, reachable):
    # issue 30 (minor): offline, `hf://x/y` failed only after 23-29 s of the client's retries
    from huggingface_hub.errors import LocalEntryNotFoundError

    import lebm_zoo.pretrained as pretrained

    seen = []

    def download(repo_id, filename, revision=None, local_files_only=False, **kw):
        seen.append(local_files_only)
        raise LocalEntryNotFoundError("not in the cache")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(pretrained, "_hub_reachable", lambda timeout=3.0: reachable)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    with pytest.raises(CheckpointError, match="cannot be reached" if not reachable else "check the id and the network"):
        lebm_zoo.load_pretrained("hf://someone/lebm-mnist")
    assert seen == [not reachable]


def test_hyperparameters_that_do_not_fit_the_weights_are_refused_before_the_network_is_built(tmp_path, monkeypatch):
    # issue 30 (minor): a config.json with nz 1e6 built a 4.9 GB network before the shape check
    folder = TINY_MODELS["LatentEBMPrior"]().save_pretrained(tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["hyperparameters"]["nz"] = 10 ** 6
    (folder / "config.json").write_text(json.dumps(cfg))
    real_init = LatentEBMPrior.__init__

    @functools.wraps(real_init)
    def init(self, *args, **kw):  # only the meta-device probe may build it
        assert torch.empty(0).device.type == "meta", "the full network was built"
        real_init(self, *args, **kw)

    monkeypatch.setattr(LatentEBMPrior, "__init__", init)
    with pytest.raises(CheckpointError, match=r"do not fit a LatentEBMPrior .*stored \(16, 8\), built \(16, 1000000\)"):
        lebm_zoo.load_pretrained(folder)
