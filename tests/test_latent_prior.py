"""LatentEBMPrior: architecture, public methods, loss signs, divergence guard, checkpoints."""
import pytest
import torch
from _data import tensor_loader, tiny_trainer, uniform_images

import lebm_zoo
from lebm_zoo import CheckpointError, LatentEBMPrior
from lebm_zoo.nets import count_parameters


def tiny(**kw):
    cfg = dict(img_size=28, channels=1, nz=8, ngf=4, ndf=16, prior_steps=3, posterior_steps=3)
    cfg.update(kw)
    return LatentEBMPrior(**cfg)


def loader(n=8, c=1, s=28, bs=4, seed=0):
    return tensor_loader(uniform_images(n, c, s, seed), bs, labels=torch.zeros(n, dtype=torch.long))


def test_svhn_defaults_are_the_reference_ones():
    m = LatentEBMPrior()
    hp = m.hparams
    assert (hp.prior_steps, hp.prior_step_size, hp.posterior_steps, hp.posterior_step_size) == (60, 0.4, 20, 0.1)
    assert hp.llhd_sigma == 0.3 and (hp.lr_g, hp.lr_e) == (1e-4, 2e-5) and tuple(hp.betas) == (0.5, 0.999)
    assert count_parameters(m.generator) == 3_447_683  # families.md §1
    assert count_parameters(m.energy_net) == 60_601
    opts, scheds = m.configure_optimizers()
    assert [o.param_groups[0]["lr"] for o in opts] == [1e-4, 2e-5]
    assert all(s.lr_lambdas[0](2) == pytest.approx(0.998) for s in scheds)  # the reference schedule (gamma 0.998)


@pytest.mark.parametrize("img_size,channels", [(28, 1), (32, 3), (64, 3), (32, 1)])
def test_public_methods_shapes_and_ranges(img_size, channels):
    torch.manual_seed(0)
    m = tiny(img_size=img_size, channels=channels).eval()
    x = torch.rand(5, channels, img_size, img_size) * 2 - 1
    s = m.sample(3)
    assert s.shape == (3, channels, img_size, img_size) and s.min() >= -1 and s.max() <= 1
    z = m.infer_latent(x)
    assert z.shape == (5, 8) and not z.requires_grad
    assert m.reconstruct(x).shape == x.shape
    assert m.energy(z).shape == (5,) and m.log_joint(x, z).shape == (5,)


def test_log_joint_matches_hand_computation():
    torch.manual_seed(0)
    m = tiny(llhd_sigma=0.5, prior_sigma=2.0)
    x, z = torch.rand(3, 1, 28, 28) * 2 - 1, torch.randn(3, 8)
    with torch.no_grad():
        expected = (-((x - m.generator(z)) ** 2).flatten(1).sum(1) / (2 * 0.25) - m.energy_net(z).squeeze(-1)
                    - (z ** 2).sum(1) / (2 * 4.0))
        assert torch.allclose(m.log_joint(x, z), expected, atol=1e-4)
    g = tiny(prior="gaussian")
    assert g.energy_net is None and torch.equal(g.energy(z), torch.zeros(3))


def test_posterior_inference_improves_reconstruction():
    torch.manual_seed(0)
    m = tiny(ngf=16, posterior_steps=100, posterior_step_size=0.1, llhd_sigma=0.1).eval()
    with torch.no_grad():  # a more sensitive random generator, so that the likelihood term matters
        for p in m.generator.parameters():
            p.mul_(2.0)
    z_true = torch.randn(6, 8)
    x = m.generate(z_true)
    z0 = torch.randn(6, 8)
    err0 = ((m.generate(z0) - x) ** 2).mean()
    err = ((m.generate(m.infer_latent(x, z0=z0)) - x) ** 2).mean()
    assert err < 0.2 * err0


class FixedChains(LatentEBMPrior):
    """Replaces the chains with fixed latents, to test the signs of the two updates."""

    z_pos = torch.randn(4, 8, generator=torch.Generator().manual_seed(1)) + 2.0
    z_neg = torch.randn(4, 8, generator=torch.Generator().manual_seed(2)) - 2.0

    def infer_latent(self, x, z0=None, n_steps=None):
        return self.z_pos[: x.shape[0]]

    def sample_latent(self, n, z0=None, n_steps=None):
        return self.z_neg[:n]


def test_update_signs_energy_down_on_posterior_up_on_prior_and_generator_fits_data():
    torch.manual_seed(0)
    m = FixedChains(img_size=28, channels=1, nz=8, ngf=4, ndf=16, lr_e=1e-2, lr_g=1e-2)
    data = loader(n=4, bs=4)
    x = next(iter(data))[0]
    with torch.no_grad():
        gap0 = m.energy(m.z_pos).mean() - m.energy(m.z_neg).mean()
        rec0 = ((m.generator(m.z_pos) - x) ** 2).sum()
    tiny_trainer(max_steps=20).fit(m, data)
    with torch.no_grad():
        gap = m.energy(m.z_pos).mean() - m.energy(m.z_neg).mean()
        rec = ((m.generator(m.z_pos) - x) ** 2).sum()
    assert gap < gap0 - 1.0  # E(z+) pushed down relative to E(z-)
    assert rec < 0.7 * rec0


def test_gaussian_prior_ablation_trains_generator_only():
    torch.manual_seed(0)
    m = tiny(prior="gaussian")
    assert len(m.configure_optimizers()[0]) == 1
    z = m.sample_latent(4000)
    assert abs(z.std().item() - 1.0) < 0.02
    t = tiny_trainer(max_steps=2)
    t.fit(m, loader())
    assert t.global_step == 2 and "train/loss_e" not in t.callback_metrics


def test_global_step_counts_iterations_and_logs_the_paper_quantities():
    m = tiny()
    t = tiny_trainer(max_steps=3)
    t.fit(m, loader(n=16))
    assert t.global_step == 3
    for k in ("loss_g", "energy_pos", "energy_neg", "energy_gap", "grad_norm_g", "grad_norm_e"):
        assert torch.isfinite(t.callback_metrics[f"train/{k}"])


def test_nan_stops_training_cleanly_and_keeps_weights():
    torch.manual_seed(0)
    m = tiny(llhd_sigma=1e-30)  # the posterior gradient overflows: z and losses become non-finite
    before = {k: v.clone() for k, v in m.state_dict().items()}
    t = tiny_trainer(max_steps=5)
    with pytest.warns(UserWarning, match="diverged"):
        t.fit(m, loader())
    assert m.divergence is not None and "loss_g" in m.divergence and "diverged" in m.divergence
    assert t.global_step == 0  # no update was applied
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_wrong_data_shape_is_a_clear_error():
    m = tiny(channels=3, img_size=32)
    with pytest.raises(ValueError, match=r"expects items of shape \(3, 32, 32\).*\(1, 28, 28\)"):
        tiny_trainer(max_steps=2).fit(m, loader())


def test_checkpoint_round_trip_and_clear_errors(tmp_path):
    torch.manual_seed(0)
    m = tiny()
    t = tiny_trainer(tmp_path, max_steps=2, enable_checkpointing=True)
    t.fit(m, loader())
    ckpt = tmp_path / "model.ckpt"
    t.save_checkpoint(ckpt)
    loaded = lebm_zoo.load_pretrained(ckpt)
    assert isinstance(loaded, LatentEBMPrior) and not loaded.training
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), loaded.state_dict().values()))
    assert loaded.hparams.nz == 8 and loaded.sample(2).shape == (2, 1, 28, 28)
    # weights-only loading works on our checkpoints
    assert "state_dict" in torch.load(ckpt, weights_only=True)
    assert LatentEBMPrior.load_pretrained(ckpt).hparams.ngf == 4

    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(ckpt.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        lebm_zoo.load_pretrained(corrupt)
    plain = tmp_path / "plain.pt"
    torch.save({"weights": torch.zeros(2)}, plain)
    with pytest.raises(CheckpointError, match="not a Lightning checkpoint"):
        lebm_zoo.load_pretrained(plain)
    with pytest.raises(CheckpointError, match="no checkpoint file"):
        lebm_zoo.load_pretrained(tmp_path / "missing.ckpt")


class OtherModel(lebm_zoo.EBMModule):
    """A user model subclassing the base class, as README "Adding a model" shows."""

    def __init__(self, width: int = 3):
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Linear(width, 1)

    def sample(self, n):
        return torch.zeros(n, self.hparams.width)


def test_checkpoint_of_another_model_is_refused(tmp_path):
    other = OtherModel()
    path = tmp_path / "other.ckpt"
    ckpt = {"state_dict": other.state_dict(), "hyper_parameters": dict(other.hparams)}
    other.on_save_checkpoint(ckpt)
    torch.save(ckpt, path)
    assert isinstance(lebm_zoo.load_pretrained(path), OtherModel)
    with pytest.raises(CheckpointError, match="holds a OtherModel checkpoint, not a LatentEBMPrior"):
        LatentEBMPrior.load_pretrained(path)


def test_prior_chain_trace_gives_the_energy_profile():
    torch.manual_seed(0)
    m = tiny(prior_steps=7)
    z, trace = m.sample_latent(16, return_trace=True)
    assert z.shape == (16, 8) and trace["log_prob"].shape == (7,)
    z0 = torch.zeros(16, 8)  # at z = 0 the first entry is exactly -mean E(0)
    _, trace = m.sample_latent(16, z0=z0, return_trace=True)
    assert torch.allclose(trace["log_prob"][0], -m.energy(z0).mean(), atol=1e-6)


def test_last_checkpoint_holds_the_final_step_when_training_stops_between_saves(tmp_path):
    from pytorch_lightning.callbacks import ModelCheckpoint

    torch.manual_seed(0)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=3)
    t = tiny_trainer(tmp_path, max_steps=5, enable_checkpointing=True, callbacks=[ckpt])
    t.fit(tiny(), loader(n=20))
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 5


def test_channels_last_is_the_same_model():
    torch.manual_seed(0)
    a = LatentEBMPrior(img_size=32, channels=3, ngf=8)
    b = LatentEBMPrior(img_size=32, channels=3, ngf=8, channels_last=True)
    b.load_state_dict(a.state_dict())
    w = next(m.weight for m in b.generator.modules() if isinstance(m, torch.nn.ConvTranspose2d) and m.weight.ndim == 4)
    assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    x, z = torch.rand(4, 3, 32, 32) * 2 - 1, torch.randn(4, 100)
    with torch.no_grad():
        assert torch.allclose(a.log_joint(x, z), b.log_joint(x, z), rtol=1e-5)


@pytest.mark.parametrize("img_size", [28, 32, 64])
def test_generator_first_layer_as_a_matrix_product_is_the_transposed_convolution(img_size):
    # ConvGenerator computes its first ConvTranspose2d (1x1 -> 4x4) as one GEMM; it must be the same function, with the
    # gradient w.r.t. z (what the posterior chain uses) and w.r.t. the weights (what the generator update uses).
    from lebm_zoo.nets import ConvGenerator

    torch.manual_seed(0)
    g = ConvGenerator(nz=10, ngf=4, img_size=img_size, channels=1)
    z = torch.randn(5, 10, requires_grad=True)
    out = g(z)
    ref = g.net(z.view(5, 10, 1, 1))  # the layers applied as convolutions
    assert out.shape == (5, 1, img_size, img_size)
    assert torch.allclose(out, ref, atol=1e-6)
    w = g.net[0].weight
    gz, gw = torch.autograd.grad(out.pow(2).sum(), (z, w))
    gz_ref, gw_ref = torch.autograd.grad(ref.pow(2).sum(), (z, w))
    assert torch.allclose(gz, gz_ref, atol=1e-5) and torch.allclose(gw, gw_ref, atol=1e-5)


@pytest.mark.parametrize("img_size", [28, 32, 64])
@pytest.mark.parametrize("autocast", [False, True])
def test_channels_last_generator_has_the_same_gradients(autocast, img_size):
    """ConvGenerator(channels_last=True) runs its transposed convolutions on CPU through a custom autograd function
    (forward in channels_last, gradients in the layout fastest per layer): the same outputs and gradients w.r.t. z (the
    posterior chain) and every parameter (the generator update) as the plain layers.

    fp32: both are the same sums in another order, so they agree to float rounding (1e-5 relative, in norm).

    bf16 (autocast): each layer rounds its inputs, weights and outputs to 8 significant bits (2^-9 relative), and the
    backward pass rounds every layer's incoming gradient again; with the cancellation in these sums the gradients of
    the first layers end up 2-8% (in norm) from the exact ones, on either path. Where oneDNN runs bf16 natively (AMX or
    AVX512-BF16) both paths give bit-identical results; where bf16 is emulated (AVX2-only CPUs: ATen's own kernels)
    the two paths round at different points, so they differ from each other by about as much as each differs from
    the exact gradient (measured: 2-6%). Their difference is therefore no measure of correctness; what must hold is
    that the channels_last path is as accurate as the plain one: its error against the float64 gradients is at most
    1.5x the plain path's (two independent roundings of the same sums, measured ratio <= 1.14) plus one bf16 unit
    (2^-8). A layout bug (a transposed or permuted gradient) gives errors of order 1 and fails.
    """
    from lebm_zoo.nets import ConvGenerator

    torch.manual_seed(0)
    plain = ConvGenerator(nz=16, ngf=8, img_size=img_size, channels=3)
    split = ConvGenerator(nz=16, ngf=8, img_size=img_size, channels=3, channels_last=True)
    split.load_state_dict(plain.state_dict())
    x = torch.rand(6, 3, img_size, img_size) * 2 - 1

    def outputs_and_grads(g, dtype=torch.float32):
        g = g.to(dtype)
        z = torch.randn(6, 16, generator=torch.Generator().manual_seed(1)).to(dtype).requires_grad_()
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast and dtype == torch.float32):
            out = g(z)
            loss = (out.to(dtype) - x.to(dtype)).pow(2).sum()
        grads = torch.autograd.grad(loss, [z, *g.parameters()])
        g.float()
        return [out.to(dtype), *grads]

    a_all, b_all = outputs_and_grads(plain), outputs_and_grads(split)
    if not autocast:
        for a, b in zip(a_all, b_all):
            assert a.shape == b.shape and a.dtype == b.dtype
            assert (a - b).norm() <= 1e-5 * a.norm(), ((a - b).norm() / a.norm()).item()
        return
    exact = outputs_and_grads(plain, torch.float64)
    for a, b, e in zip(a_all, b_all, exact):
        assert a.shape == b.shape == e.shape and a.dtype == b.dtype == torch.float32
        err_plain = float((a.double() - e).norm() / e.norm())
        err_split = float((b.double() - e).norm() / e.norm())
        assert err_plain < 0.25  # bf16 really ran on a sensible network (a wrong network is off by order 1)
        assert err_split <= 1.5 * err_plain + 2**-8, (err_split, err_plain)


@pytest.mark.parametrize("kw, match", [({"prior": "flow"}, "prior must be 'ebm' or 'gaussian'"),
                                       ({"prior_sigma": 0.0}, "prior_sigma must be > 0"),
                                       ({"llhd_sigma": -1.0}, "llhd_sigma must be > 0"),
                                       ({"channels": 2}, "channels must be 1 or 3")])
def test_bad_hyperparameters_are_clear_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        LatentEBMPrior(**kw)
    if "llhd_sigma" not in kw and "channels" not in kw:  # the text/SMILES model shares the prior's checks
        with pytest.raises(ValueError, match=match):
            lebm_zoo.SequenceLatentEBMPrior(vocab=["<pad>", "<bos>", "<eos>", "<unk>", "a"], **kw)
