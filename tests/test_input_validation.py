"""The public methods of every family validate what users give them (issue 15 item 5).

Wrong shapes, dtypes, scales and non-finite values raise ``DataShapeError`` (a ValueError) with a message naming the
expected shape and the fix, instead of broadcasting into wrong latents; counts below 1 raise a ValueError naming
``n``. The checks run on user calls, not in the training loop (whose batches ``data_from_batch`` /
``check_data_shape`` checked). Tiny models, 2-step chains.
"""
import warnings

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from _data import TINY_MODELS, TINY_VOCAB, tiny_trainer
from torch.utils.data import DataLoader, TensorDataset

import lebm_zoo.models.coopnets as coopnets_mod
import lebm_zoo.models.latent_prior as latent_prior_mod
import lebm_zoo.models.latent_sequence as latent_sequence_mod
from lebm_zoo.models.base import DataShapeError
from lebm_zoo.utils import check_count, check_images, check_latents, check_tokens, in_training_loop

VOCAB = TINY_VOCAB
BUILDERS = TINY_MODELS
_CACHE: dict = {}


def model(name):
    if name not in _CACHE:
        torch.manual_seed(0)
        _CACHE[name] = BUILDERS[name]().eval()
    return _CACHE[name]


def images(b=4, c=1, s=28):
    return torch.rand(b, c, s, s, generator=torch.Generator().manual_seed(0)) * 2 - 1


# every public method that takes images, as (model, call)
IMAGE_METHODS = {
    "LatentEBMPrior.infer_latent": ("LatentEBMPrior", lambda m, x: m.infer_latent(x)),
    "LatentEBMPrior.reconstruct": ("LatentEBMPrior", lambda m, x: m.reconstruct(x)),
    "LatentEBMPrior.anomaly_score": ("LatentEBMPrior", lambda m, x: m.anomaly_score(x)),
    "JointHierarchicalEBMPrior.infer_latent": ("JointHierarchicalEBMPrior", lambda m, x: m.infer_latent(x)),
    "JointHierarchicalEBMPrior.reconstruct": ("JointHierarchicalEBMPrior", lambda m, x: m.reconstruct(x)),
    "JointHierarchicalEBMPrior.anomaly_score": ("JointHierarchicalEBMPrior", lambda m, x: m.anomaly_score(x, k=1)),
    "ShortRunEBM.reconstruct": ("ShortRunEBM", lambda m, x: m.reconstruct(x, n_iters=1, progress=False)),
    "CoopNets.revise": ("CoopNets", lambda m, x: m.revise(x)),
    "DivergenceTriangle.infer_latent": ("DivergenceTriangle", lambda m, x: m.infer_latent(x)),
    "DivergenceTriangle.reconstruct": ("DivergenceTriangle", lambda m, x: m.reconstruct(x)),
}


def _nan():
    x = images()
    x[1, 0, 3, 4] = float("nan")
    x[2, 0, 5, 6] = float("nan")
    return x


def _inf():
    x = images()
    x[0, 0, 0, 0] = float("inf")
    return x


# bad inputs for a (B, 1, 28, 28) model, and what the message must say
BAD_IMAGES = {
    "no channel dim": (lambda: images()[:, 0], r"\(B, C, H, W\) = \(B, 1, 28, 28\), got shape \(4, 28, 28\)"),
    "3 channels": (lambda: images(c=3), r"\(B, 1, 28, 28\), got shape \(4, 3, 28, 28\).*channels=1"),
    "32 px": (lambda: images(s=32), r"\(B, 1, 28, 28\), got shape \(4, 1, 32, 32\).*img_size=28"),
    "channels last": (lambda: images().permute(0, 2, 3, 1), r"\(B, 1, 28, 28\).*permute\(0, 3, 1, 2\)"),
    "empty batch": (lambda: images(b=0), r"empty batch"),
    "numpy array": (lambda: images().numpy(), r"torch\.Tensor.*\(B, 1, 28, 28\)"),
    "uint8": (lambda: ((images() + 1) * 127.5).to(torch.uint8), r"torch\.uint8.*x\.float\(\) / 127\.5 - 1"),
    "int64": (lambda: ((images() + 1) * 127.5).long(), r"torch\.int64.*x\.float\(\) / 127\.5 - 1"),
    "0..255 floats": (lambda: (images() + 1) * 127.5, r"must be in \[-1, 1\]\. This looks like 0\.\.255 pixels: "
                                                      r"scale to \[-1, 1\] with x / 127\.5 - 1"),
    "unnormalised": (lambda: 3 * torch.randn(4, 1, 28, 28), r"must be in \[-1, 1\]"),
    "NaN": (_nan, r"non-finite values: 2 NaN"),
    "inf": (_inf, r"non-finite values: 0 NaN and 1 inf"),
}


@pytest.mark.parametrize("bad", list(BAD_IMAGES))
@pytest.mark.parametrize("method", list(IMAGE_METHODS))
def test_bad_images_raise_a_helpful_data_shape_error(method, bad):
    name, call = IMAGE_METHODS[method]
    make, message = BAD_IMAGES[bad]
    with pytest.raises(DataShapeError, match=message) as err:
        call(model(name), make())
    assert str(err.value).startswith(method + ":")  # names the method the user called
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize("method", list(IMAGE_METHODS))
def test_valid_images_still_work(method):
    name, call = IMAGE_METHODS[method]
    m = model(name)
    x = images()
    x[0, 0, 0, 0], x[0, 0, 0, 1] = -1.0005, 1.0005  # float rounding of scaled pixels is tolerated
    out = call(m, x.double() if name == "ShortRunEBM" else x)  # any floating dtype
    out = out if isinstance(out, torch.Tensor) else out[0]
    assert out.shape[0] == 4 and torch.isfinite(out).all()
    if method.endswith("reconstruct") or method.endswith("revise"):
        assert out.shape == x.shape


# ------------------------------------------------------------------------------------------------------ counts
SAMPLERS = {
    "LatentEBMPrior.sample": ("LatentEBMPrior", lambda m, n: m.sample(n)),
    "LatentEBMPrior.sample_latent": ("LatentEBMPrior", lambda m, n: m.sample_latent(n)),
    "JointHierarchicalEBMPrior.sample": ("JointHierarchicalEBMPrior", lambda m, n: m.sample(n)),
    "JointHierarchicalEBMPrior.sample_latent": ("JointHierarchicalEBMPrior", lambda m, n: m.sample_latent(n)),
    "ShortRunEBM.sample": ("ShortRunEBM", lambda m, n: m.sample(n)),
    "CoopNets.sample": ("CoopNets", lambda m, n: m.sample(n)),
    "DivergenceTriangle.sample": ("DivergenceTriangle", lambda m, n: m.sample(n)),
    "FlowContrastiveEBM.sample": ("FlowContrastiveEBM", lambda m, n: m.sample(n)),
    "FlowContrastiveEBM.sample (vectors)": ("FlowContrastiveEBM-2d", lambda m, n: m.sample(n)),
    "SequenceLatentEBMPrior.sample": ("SequenceLatentEBMPrior", lambda m, n: m.sample(n)),
    "LSTMLanguageModel.sample": ("LSTMLanguageModel", lambda m, n: m.sample(n)),
    "SequenceLatentEBMPrior.sample_tokens": ("SequenceLatentEBMPrior", lambda m, n: m.sample_tokens(n)),
    "SequenceLatentEBMPrior.sample_latent": ("SequenceLatentEBMPrior", lambda m, n: m.sample_latent(n)),
}


@pytest.mark.parametrize("n, message", [(0, r"n must be >= 1, got n=0"), (-3, r"n must be >= 1, got n=-3"),
                                        (2.5, r"n must be an integer >= 1, got n=2\.5"),
                                        (None, r"n must be an integer >= 1, got n=None"),
                                        (True, r"n must be an integer >= 1, got n=True")])
@pytest.mark.parametrize("method", list(SAMPLERS))
def test_bad_counts_raise_a_value_error_naming_n(method, n, message):
    name, call = SAMPLERS[method]
    with pytest.raises(ValueError, match=message) as err:
        call(model(name), n)
    assert str(err.value).startswith(method.split(" ")[0] + ":")


@pytest.mark.parametrize("method", list(SAMPLERS))
def test_valid_counts_still_work(method):
    name, call = SAMPLERS[method]
    for n in (3, np.int64(3), torch.tensor(3)):
        out = call(model(name), n)
        out = out["tokens"] if isinstance(out, dict) else out  # token batches
        out = out[0] if isinstance(out, list) and isinstance(out[0], torch.Tensor) else out  # latent layers
        assert len(out) == 3  # tensors (3, ...) or lists of 3 strings


@pytest.mark.parametrize("kwargs, name", [({"n_samples": 0}, "n_samples"), ({"n_chains": 0}, "n_chains")])
def test_sequence_log_marginal_counts(kwargs, name):
    m = model("SequenceLatentEBMPrior")
    with pytest.raises(ValueError, match=f"{name} must be >= 1, got {name}=0"):
        m.log_marginal(["a b"], **kwargs)
    with pytest.raises(ValueError, match="n_samples must be >= 1"):
        m.log_normalizer(n_samples=0)


# ----------------------------------------------------------------------------------------------------- latents
LATENT_METHODS = {
    "LatentEBMPrior.generate": ("LatentEBMPrior", 8, lambda m, z: m.generate(z)),
    "LatentEBMPrior.sample_latent": ("LatentEBMPrior", 8, lambda m, z: m.sample_latent(4, z0=z)),
    "LatentEBMPrior.infer_latent": ("LatentEBMPrior", 8, lambda m, z: m.infer_latent(images(), z0=z)),
    "JointHierarchicalEBMPrior.generate": ("JointHierarchicalEBMPrior", 7, lambda m, z: m.generate(z)),
    "JointHierarchicalEBMPrior.resample_below": ("JointHierarchicalEBMPrior", 7,
                                                 lambda m, z: m.resample_below(z, 1)),
    "SequenceLatentEBMPrior.generate": ("SequenceLatentEBMPrior", 2, lambda m, z: m.generate(z)),
}


def _nan_latents(nz):
    z = torch.randn(4, nz)
    z[0, 0] = float("nan")
    return z


BAD_LATENTS = {
    "wrong nz": (lambda nz: torch.randn(4, nz + 1), lambda nz: rf"\(B, {nz}\).*got shape \(4, {nz + 1}\)"),
    "1-d": (lambda nz: torch.randn(nz), lambda nz: rf"\(B, {nz}\).*got shape \({nz},\)"),
    "wrong batch": (lambda nz: torch.randn(3, nz), lambda nz: r"B = 4|got shape \(3,"),
    "int dtype": (lambda nz: torch.zeros(4, nz, dtype=torch.long), lambda nz: r"torch\.int64.*floating-point"),
    "NaN": (_nan_latents, lambda nz: r"non-finite values: 1 NaN"),
}


@pytest.mark.parametrize("bad", list(BAD_LATENTS))
@pytest.mark.parametrize("method", list(LATENT_METHODS))
def test_bad_latents_raise_a_helpful_data_shape_error(method, bad):
    name, nz, call = LATENT_METHODS[method]
    make, message = BAD_LATENTS[bad]
    if bad == "wrong batch" and method.endswith(("generate", "resample_below")):
        pytest.skip("any batch size is fine there")
    with pytest.raises(DataShapeError, match=message(nz)) as err:
        call(model(name), make(nz))
    assert str(err.value).startswith(method + ":")


def test_hierarchical_latent_lists_are_checked_per_layer():
    m = model("JointHierarchicalEBMPrior")
    zs = [torch.randn(4, 4), torch.randn(4, 3)]
    assert m.generate(zs).shape == (4, 1, 28, 28) and m.generate(m.pack(zs)).shape == (4, 1, 28, 28)
    assert [t.shape for t in m.resample_below(zs, 1)] == [(4, 4), (4, 3)]
    with pytest.raises(DataShapeError, match=r"list of 2 tensors.*got a list of 1"):
        m.generate(zs[:1])
    with pytest.raises(DataShapeError, match=r"got shape \[\(4, 3\), \(4, 3\)\]"):
        m.generate([torch.randn(4, 3), torch.randn(4, 3)])
    with pytest.raises(DataShapeError, match="same batch size"):
        m.generate([torch.randn(4, 4), torch.randn(2, 3)])
    zs[1][0, 0] = float("inf")
    with pytest.raises(DataShapeError, match="1 inf"):
        m.resample_below(zs, 1)


def test_shortrun_initial_states_are_checked_but_may_leave_the_data_range():
    m = model("ShortRunEBM")
    assert m.sample(4, x0=2 * torch.randn(4, 1, 28, 28)).shape == (4, 1, 28, 28)  # chain states: any finite values
    with pytest.raises(DataShapeError, match=r"x0 must hold 4 images.*got shape \(3, 1, 28, 28\)"):
        m.sample(4, x0=torch.zeros(3, 1, 28, 28))
    with pytest.raises(DataShapeError, match=r"x0 must be images of shape .*\(B, 1, 28, 28\)"):
        m.sample(4, x0=torch.zeros(4, 3, 28, 28))
    with pytest.raises(DataShapeError, match="x0 has non-finite values: 784 NaN"):
        m.sample(1, x0=torch.full((1, 1, 28, 28), float("nan")))


# ------------------------------------------------------------------------------------------------------ tokens
def _tokens(values, mask=None):
    t = torch.tensor(values)
    return {"tokens": t, "mask": torch.ones(t.shape, dtype=torch.bool) if mask is None else mask}


TOKEN_METHODS = {
    "SequenceLatentEBMPrior.infer_latent": ("SequenceLatentEBMPrior", lambda m, b: m.infer_latent(b)),
    "SequenceLatentEBMPrior.reconstruct": ("SequenceLatentEBMPrior", lambda m, b: m.reconstruct(b)),
    "SequenceLatentEBMPrior.anomaly_score": ("SequenceLatentEBMPrior", lambda m, b: m.anomaly_score(b)),
    "SequenceLatentEBMPrior.log_marginal": ("SequenceLatentEBMPrior",
                                            lambda m, b: m.log_marginal(b, n_samples=4, n_chains=2)),
    "LSTMLanguageModel.log_prob": ("LSTMLanguageModel", lambda m, b: m.log_prob(b)),
}
BAD_TOKENS = {
    "index beyond the vocabulary": (lambda: _tokens([[1, 4, 99, 2]]), r"\[0, 7\).*got values in \[1, 99\]"),
    "negative index": (lambda: _tokens([[1, -4, 5, 2]]), r"\[0, 7\).*got values in \[-4, 5\]"),
    "float tokens": (lambda: _tokens([[1.0, 4.0, 2.0]]), r"torch\.float32.*integers.*model\.encode"),
    "1-d tokens": (lambda: {"tokens": torch.tensor([1, 4, 2]), "mask": torch.ones(3, dtype=torch.bool)},
                   r"\(B, T\)"),
    "int mask": (lambda: _tokens([[1, 4, 2]], mask=torch.ones(1, 3, dtype=torch.long)), r"mask\.bool\(\)"),
    "no token batch": (lambda: torch.zeros(2, 3), r"token batches"),
}


@pytest.mark.parametrize("bad", list(BAD_TOKENS))
@pytest.mark.parametrize("method", list(TOKEN_METHODS))
def test_bad_token_batches_raise_a_helpful_data_shape_error(method, bad):
    name, call = TOKEN_METHODS[method]
    make, message = BAD_TOKENS[bad]
    with pytest.raises(DataShapeError, match=message):
        call(model(name), make())


@pytest.mark.parametrize("method", list(TOKEN_METHODS))
def test_valid_token_batches_and_strings_still_work(method):
    name, call = TOKEN_METHODS[method]
    m = model(name)
    for data in (m.encode(["a b", "c a b"]), ["a b", "c a b"]):
        out = call(m, data)
        assert len(out) == 2


def test_decode_checks_its_tokens():
    m = model("SequenceLatentEBMPrior")
    assert m.decode(m.encode(["a b"])["tokens"]) == ["a b"]
    with pytest.raises(DataShapeError, match=r"SequenceLatentEBMPrior\.decode: .*\[0, 7\).*\[-1, 4\]"):
        m.decode(torch.tensor([[1, 4, -1]]))  # a negative index would silently wrap around the vocabulary


# --------------------------------------------------------------------------------------------- the validators
def test_validators_return_their_input_and_name_the_argument():
    x, z = images(), torch.randn(4, 8)
    assert check_images(x, 1, 28) is x and check_latents(z, 8) is z and check_count(5) == 5
    t = torch.tensor([[1, 2]])
    assert check_tokens(t, 3) is t
    with pytest.raises(DataShapeError, match=r"^M\.f: y must be images"):
        check_images(x[0], 1, 28, name="y", where="M.f")
    with pytest.raises(ValueError, match=r"^M\.f: batch_size must be >= 2, got batch_size=1$"):
        check_count(1, "batch_size", minimum=2, where="M.f")


class _Recorder(pl.Callback):
    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append(("train", in_training_loop(pl_module)))

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.seen.append(("val", in_training_loop(pl_module)))


@pytest.mark.parametrize("family, module, validator", [
    ("LatentEBMPrior", latent_prior_mod, "check_images"),
    ("JointHierarchicalEBMPrior", latent_prior_mod, "check_images"),  # LatentImagesMixin checks its images
    ("CoopNets", coopnets_mod, "check_images"),
])
def test_training_steps_skip_the_checks_which_run_again_after_fit(family, module, validator, monkeypatch, tmp_path):
    """The training loop calls infer_latent / revise on batches data_from_batch / check_data_shape checked: no extra
    checks (nor host syncs) there; validation batches and calls after fit are checked."""
    calls = []
    real = getattr(module, validator)
    monkeypatch.setattr(module, validator, lambda *a, **k: (calls.append(k.get("where")), real(*a, **k))[1])
    torch.manual_seed(0)
    m = BUILDERS[family]()
    x = images(8)
    rec = _Recorder()
    trainer = tiny_trainer(tmp_path, [rec], max_steps=3, limit_val_batches=1, num_sanity_val_steps=0)
    trainer.fit(m, DataLoader(TensorDataset(x), batch_size=4), DataLoader(TensorDataset(x), batch_size=4))
    assert calls == []
    assert ("train", True) in rec.seen and ("val", False) in rec.seen
    assert not in_training_loop(m)  # after fit
    (m.revise if family == "CoopNets" else m.infer_latent)(x)
    assert len(calls) == 1


def test_sequence_training_skips_the_token_check(monkeypatch, tmp_path):
    calls = []
    real = latent_sequence_mod.check_tokens
    monkeypatch.setattr(latent_sequence_mod, "check_tokens", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    torch.manual_seed(0)
    m = BUILDERS["SequenceLatentEBMPrior"]()
    batch = m.encode(["a b c", "c b a", "a a", "b"])
    trainer = tiny_trainer(tmp_path, max_steps=2)
    trainer.fit(m, DataLoader([batch], batch_size=None))
    assert calls == []
    m.infer_latent(batch)
    assert calls == [1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="counts CUDA host synchronisations")
def test_a_check_costs_one_host_synchronisation():
    x, z = images().cuda(), torch.randn(4, 8, device="cuda")
    tokens = torch.randint(0, 7, (4, 5), device="cuda")
    for check in (lambda: check_images(x, 1, 28), lambda: check_latents(z, 8),
                  lambda: check_latents([z[:, :5], z[:, 5:]], [5, 3]), lambda: check_tokens(tokens, 7)):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                check()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert len([w for w in caught if "synchroniz" in str(w.message)]) == 1


# ------------------------------------------------------------------------------ densities (issue 30 finding 5)
def _density_calls(name, m):
    """(method name, call with good inputs, [calls with bad inputs]) for the public densities of family ``name``."""
    img = torch.rand(4, 1, 28, 28) * 2 - 1
    if name in ("LatentEBMPrior", "SymbolVectorLEBM", "JointHierarchicalEBMPrior"):
        nz = sum(m.nz) if name == "JointHierarchicalEBMPrior" else m.hparams.nz
        z = torch.randn(4, nz)
        return [("energy", lambda: m.energy(z), [lambda: m.energy(z[:, :1]), lambda: m.energy(z * float("nan"))]),
                ("log_joint", lambda: m.log_joint(img, z),
                 [lambda: m.log_joint(img[:, 0], z), lambda: m.log_joint(img.repeat(1, 3, 1, 1), z),
                  lambda: m.log_joint(((img + 1) * 127.5).to(torch.uint8), z), lambda: m.log_joint(img, z[:2]),
                  lambda: m.log_joint(img * float("nan"), z)])]
    method = "neg_energy" if name in ("ShortRunEBM", "CoopNets") else "energy"
    f = getattr(m, method)
    if name == "FlowContrastiveEBM-2d":
        pts = torch.randn(4, 2)
        return [(method, lambda: f(pts), [lambda: f(pts[:, :1]), lambda: f(pts.long()), lambda: f(pts * float("inf"))])]
    return [(method, lambda: f(img * 3),  # chain states may leave [-1, 1]
             [lambda: f(img[:, 0]), lambda: f(img.repeat(1, 3, 1, 1)), lambda: f(img.to(torch.uint8)),
              lambda: f(img * float("nan"))])]


@pytest.mark.parametrize("name", ["LatentEBMPrior", "SymbolVectorLEBM", "JointHierarchicalEBMPrior", "ShortRunEBM",
                                  "CoopNets", "DivergenceTriangle", "FlowContrastiveEBM", "FlowContrastiveEBM-2d"])
def test_public_densities_check_their_inputs(name):
    # m.log_joint(x[:, 0], z) broadcast to (4, 4, 28, 28) and returned a number per chain; 3-channel and uint8 images
    # returned numbers too
    from _data import TINY_MODELS

    m = TINY_MODELS[name]().eval()
    for method, good, bads in _density_calls(name, m):
        out = good()
        assert out.shape == (4,) and torch.isfinite(out).all(), method
        for bad in bads:
            with pytest.raises(DataShapeError, match=f"{type(m).__name__}.{method}"):
                bad()
    m.sample(2)  # the chains call the same methods on their states, unchecked
