"""DiffusionRecoveryEBM: the reference's schedule and defaults, the chains' update, the loss's sign, a 1-D mixture
learned end to end, bf16-mixed, checkpoints and published folders, and the mnist_drl recipe through the CLI."""
import math

import pytest
import torch
from _data import fit_steps, recipe_fit_args, tensor_loader

import lebm_zoo
from lebm_zoo import CheckpointError, DiffusionRecoveryEBM, ShortRunEBM
from lebm_zoo.cli import main
from lebm_zoo.fingerprint import fingerprint
from lebm_zoo.models.recovery_likelihood import recovery_schedule


def tiny_images(**kw):
    cfg = dict(img_size=28, channels=1, ch=4, num_res_blocks=1, num_timesteps=2, mcmc_steps=2)
    cfg.update(kw)
    return DiffusionRecoveryEBM(**cfg)


def tiny_vectors(**kw):
    cfg = dict(dim=2, energy_hidden=8, num_res_blocks=1, mcmc_steps=2)
    cfg.update(kw)
    return DiffusionRecoveryEBM(**cfg)


# ----------------------------------------------------------------------------------------------- the schedule
# Computed with NumPy from the reference's formulas (ruiqigao/recovery_likelihood c77cc05): model.py lines 20-42
# (get_sigma_schedule with beta_start=1e-4, beta_end=0.02 as model.py line 51 passes them, T=6 of config.py line 43:
# indices 0, 100, ..., 500, 999 into 1,000 linear betas), lines 52-53 (a_cum, sigma_cum), lines 173-174 (step sizes:
# sigma_cum_t / sigma_cum_0 * b^2 * sigma_{t+1}^2 with b^2 = 2e-4, config.py line 59) and line 145 (loss weights).
REF_SIGMA = [0.01, 0.3236802218, 0.5164952947, 0.6322110688, 0.7132421412, 0.7733690260, 0.9997405831]
REF_A_CUM = [0.9999499987, 0.9461192266, 0.8101524582, 0.6277030528, 0.4399681917, 0.2789205234, 0.0063528181]
REF_SIGMA_CUM = [0.01, 0.3238184817, 0.5862192376, 0.7784528743, 0.8980133575, 0.9603141890, 0.9999798206]
REF_STEP_SIZE_SQ = [2.0953777198e-05, 1.7276842204e-03, 4.6861291366e-03, 7.9202029893e-03, 1.0742029503e-02,
                    1.9196320204e-02]
REF_LOSS_WEIGHT = [1.0, 0.6266857126, 0.5119812635, 0.4538153358, 0.4185326939, 0.3237642117]


def test_schedule_matches_the_reference_numbers():
    s = recovery_schedule()  # T=6, betas 1e-4..0.02, b^2 = 2e-4
    for key, ref in (("sigma", REF_SIGMA), ("a_cum", REF_A_CUM), ("sigma_cum", REF_SIGMA_CUM),
                     ("step_size_sq", REF_STEP_SIZE_SQ), ("loss_weights", REF_LOSS_WEIGHT)):
        assert s[key].tolist() == pytest.approx(ref, rel=1e-7), key
    assert s["a"] ** 2 + s["sigma"] ** 2 == pytest.approx([1.0] * 7)
    assert s["a_prev"].tolist() == pytest.approx(s["a"][:-1].tolist() + [1.0])  # a_T counts as 1 (top level)
    assert s["is_recovery"].tolist() == [1.0] * 6 + [0.0]
    # the model holds them in float32, as the reference gathers them
    m = tiny_vectors(num_timesteps=6)
    assert m.sigma.dtype == torch.float32 and m.sigma.tolist() == pytest.approx(REF_SIGMA, rel=1e-6)
    assert m.step_size_sq.tolist() == pytest.approx(REF_STEP_SIZE_SQ, rel=1e-6)
    # T=2: jumps at 0, 500, 999 (spacing 1000 // 2)
    s2 = recovery_schedule(2)
    assert s2["sigma"].shape == (3,) and s2["a_cum"][-1] == pytest.approx(REF_A_CUM[-1], rel=1e-7)
    for bad in (1, 502):
        with pytest.raises(ValueError, match="num_timesteps must be in"):
            recovery_schedule(bad)


def test_defaults_are_the_reference_ones():
    m = DiffusionRecoveryEBM()
    hp = m.hparams
    assert (hp.img_size, hp.channels, hp.ch, hp.num_res_blocks, hp.num_timesteps, hp.mcmc_steps, hp.b_square) == \
        (32, 3, 128, 2, 6, 30, 2e-4)
    assert (hp.noise_scale, hp.sample_noise_scale, hp.lr, hp.warmup, hp.ema_decay, hp.adam, hp.adam_eps) == \
        (1.0, 0.99, 1e-4, 1000, 0.999, "tf", 1e-7)
    assert tuple(hp.betas) == (0.9, 0.999) and hp.grad_clip is None and hp.random_flip and hp.spec_norm
    net = m.net
    assert net.conv_in.in_channels == 3 and net.conv_in.out_channels == 128
    assert [[blk.conv1.out_channels for blk in lvl] for lvl in net.levels] == [[128] * 2, [256] * 2, [256] * 2,
                                                                               [256] * 2]
    assert net.dense_out.sn is None and net.conv_in.sn is not None  # spectral norm on all but the readout
    blk = net.levels[1][0]
    assert blk.shortcut is not None and blk.conv2.g is not None and blk.conv2.sn.lower_bound
    assert blk.conv2.weight.abs().max() < 1e-4  # conv2 starts at ~0 (init scale 1e-10)
    assert torch.equal(m.ema_net.conv_in.weight, net.conv_in.weight)
    # warm-up: lr 0 at the first iteration (TF's schedule at step 0), linear to 1e-4 at 1,000
    assert [m.learning_rate(s) for s in (0, 500, 1000, 5000)] == pytest.approx([0.0, 5e-5, 1e-4, 1e-4])


def test_a_chain_step_is_the_reference_update_for_every_level_at_once():
    """One step of the shared sampler on u = y / s_t equals y + (s_t^2/2) grad_y log p(y | x_{t+1}) + s_t c eps."""
    torch.manual_seed(0)
    m = tiny_vectors(dim=3, num_timesteps=6, ema_decay=None).eval()
    t = torch.tensor([0, 2, 5, 1])
    x_next = torch.randn(4, 3)
    torch.manual_seed(5)
    y1 = m._chain(m.net, x_next, t, 1, noise_scale=0.7)
    y = x_next.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(m.recovery_log_prob(y, x_next, t, use_ema=False).sum(), y)
    s = m.step_size_sq[t].sqrt()[:, None]
    torch.manual_seed(5)
    expected = x_next + 0.5 * s ** 2 * grad + s * 0.7 * torch.randn_like(x_next)
    assert torch.allclose(y1, expected, rtol=1e-4, atol=1e-6)
    # the target: f / s^2 minus the Gaussian tether, which the top level t = T-1 does not have
    y = torch.randn(4, 3)
    f = m.neg_energy(y, t)
    quad = (y - x_next).pow(2).sum(1) / (2 * m.sigma[t + 1] ** 2) * (t != 5)
    assert torch.allclose(m.recovery_log_prob(y, x_next, t, use_ema=False), f / m.step_size_sq[t] - quad, rtol=1e-5)


def test_diffusion_pairs_have_the_level_variances():
    torch.manual_seed(0)
    m = tiny_vectors(dim=1, num_timesteps=6)
    x = torch.zeros(40000, 1)
    x_t, x_next = m.q_sample_pairs(x, 2)
    assert float(x_t.std()) == pytest.approx(REF_SIGMA_CUM[2], rel=0.02)
    assert float(x_next.std()) == pytest.approx(REF_SIGMA_CUM[3], rel=0.02)  # a_3^2 sigma_cum_2^2 + sigma_3^2
    corr = float((x_t * x_next).mean() / (x_t.std() * x_next.std()))
    assert corr == pytest.approx(math.sqrt(1 - REF_SIGMA[3] ** 2) * REF_SIGMA_CUM[2] / REF_SIGMA_CUM[3], abs=0.02)


class _Linear1D(torch.nn.Module):
    """f(y, t) = theta * y: the simplest energy whose loss gradient can be read off."""

    def __init__(self):
        super().__init__()
        self.theta = torch.nn.Parameter(torch.zeros(()))

    def forward(self, y, t):
        return self.theta * y.flatten(1).sum(1)


def test_the_loss_raises_the_log_density_of_data_and_lowers_it_at_samples():
    m = tiny_vectors(dim=1, num_timesteps=6, ema_decay=None)
    m.net = _Linear1D()
    t = torch.tensor([0, 1, 3, 5])
    y_pos, y_neg = torch.full((4, 1), 0.8), torch.full((4, 1), -0.6)
    loss, f_pos, f_neg = m.recovery_loss(y_pos, y_neg, t)
    (g,) = torch.autograd.grad(loss, m.net.theta)
    # d loss / d theta = mean_i w_i (y_neg - y_pos) < 0: descending raises theta, so f(data) = 0.8 theta goes up and
    # f(samples) = -0.6 theta down; the data's energy -f / s_t^2 goes down
    w = torch.tensor(REF_LOSS_WEIGHT)[t]
    assert float(g) == pytest.approx(float((w * (-0.6 - 0.8)).mean()), rel=1e-5) and g < 0
    before = m.energy(y_pos / m.a_prev[t + 1][:, None], t).detach()
    with torch.no_grad():
        m.net.theta -= 0.1 * g
    assert (m.energy(y_pos / m.a_prev[t + 1][:, None], t) < before).all()
    assert (m.recovery_loss(y_pos, y_neg, t)[1] > f_pos).all() and (m.recovery_loss(y_pos, y_neg, t)[2] < f_neg).all()
    # the real network: the loss gradient is mean w (grad f(samples) - grad f(data)), nothing else (eval mode: the
    # spectral norms' power iterations, which advance at every training-mode call, stay put)
    m = tiny_vectors(dim=1, num_timesteps=6, ema_decay=None).eval()
    params = list(m.net.parameters())
    loss, _, _ = m.recovery_loss(y_pos, y_neg, t)
    g_loss = torch.autograd.grad(loss, params)
    g_pos = torch.autograd.grad((w * m.net(y_pos, t)).mean(), params)
    g_neg = torch.autograd.grad((w * m.net(y_neg, t)).mean(), params)
    for a, p, n in zip(g_loss, g_pos, g_neg):
        assert torch.allclose(a, n - p, atol=1e-6)


def test_a_1d_mixture_is_learned_by_the_chain_of_conditionals():
    """0.3 N(-0.5, 0.1^2) + 0.7 N(0.5, 0.1^2); the reference's schedule, T=6, K=30 and loss; 400 iterations of batch
    256 (20-40 s on one core; the test's settings: lr 3e-3, no warm-up, EMA 0.98, a width-32 one-block MLP).

    Tolerances, from runs of seeds 0-2 (400 iterations: |mean error| <= 0.03, std 0.49-0.51, weight 0.68-0.72, mode
    centres within 0.02, mode stds 0.16-0.25; 1,500 iterations reach mode stds 0.12): mean 0.2 +- 0.08, std 0.469 +-
    0.1, right-mode weight 0.7 +- 0.07, mode centres +-0.5 +- 0.08, mode stds < 0.3 (the untrained model's samples
    sit at -8, std 3.4)."""
    torch.manual_seed(0)
    n = 20000
    x = (torch.where(torch.rand(n) < 0.7, 0.5, -0.5) + 0.1 * torch.randn(n))[:, None]
    m = DiffusionRecoveryEBM(dim=1, energy_hidden=32, num_res_blocks=1, lr=3e-3, warmup=0, ema_decay=0.98)
    fit_steps(m, x, 400, batch_size=256)
    assert m.divergence is None
    s = m.sample(4000).squeeze(1)
    pos, neg = s[s > 0], s[s <= 0]
    assert float(s.mean()) == pytest.approx(0.2, abs=0.08)
    assert float(s.std()) == pytest.approx(0.469, abs=0.1)
    assert float((s > 0).float().mean()) == pytest.approx(0.7, abs=0.07)
    assert float(pos.mean()) == pytest.approx(0.5, abs=0.08) and float(neg.mean()) == pytest.approx(-0.5, abs=0.08)
    assert float(pos.std()) < 0.3 and float(neg.std()) < 0.3


def test_sample_returns_every_level_from_the_given_noise():
    torch.manual_seed(0)
    m = tiny_vectors(num_timesteps=3)
    x_T = torch.randn(5, 2)
    x0, levels = m.sample(5, return_levels=True, x_T=x_T)
    assert levels.shape == (4, 5, 2) and torch.equal(levels[3], x_T) and torch.equal(levels[0], x0)
    assert torch.isfinite(levels).all() and m.training  # the chains' eval mode is undone
    img = tiny_images()
    assert img.sample(2).shape == (2, 1, 28, 28) and img.energy(img.sample(2), 1).shape == (2,)


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="act must be one of"):
        tiny_vectors(act="relu")
    with pytest.raises(ValueError, match="loss_weight must be one of"):
        tiny_vectors(loss_weight="snr")
    with pytest.raises(ValueError, match="ema_decay"):
        tiny_vectors(ema_decay=1.0)
    with pytest.raises(ValueError, match="not divisible"):
        tiny_images(ch_mult=(1, 2, 2, 2))  # 28 px has no 4th level
    with pytest.raises(ValueError, match="ch and energy_hidden must be >= 4"):
        tiny_images(ch=2)
    m = tiny_vectors(num_timesteps=3, ema_decay=None)
    with pytest.raises(ValueError, match=r"levels t must be in \[0, 3\)"):
        m.energy(torch.zeros(2, 2), 3)
    with pytest.raises(ValueError, match="no EMA"):
        m.sample(2, use_ema=True)
    with pytest.raises(lebm_zoo.DataShapeError):
        m.sample(2, x_T=torch.zeros(2, 3))


def test_bf16_mixed_training_keeps_fp32_state_and_finite_losses():
    torch.manual_seed(0)
    m = tiny_images()
    dtypes = []
    m.net.conv_in.register_forward_hook(lambda mod, inp, out: dtypes.append(out.dtype))
    t = fit_steps(m, torch.rand(16, 1, 28, 28) * 2 - 1, 2, batch_size=8, precision="bf16-mixed")
    assert t.global_step == 2 and m.divergence is None
    assert torch.bfloat16 in dtypes  # the network really ran in bf16
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in m.parameters())  # net and EMA
    states = [v for s in t.optimizers[0].state.values() for v in s.values()
              if isinstance(v, torch.Tensor) and v.is_floating_point()]
    assert states and all(v.dtype == torch.float32 for v in states)
    assert math.isfinite(float(t.callback_metrics["train/loss"]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s = m.sample(3)
        assert m.energy(s, 0).dtype == torch.float32
    assert s.dtype == torch.float32 and s.shape == (3, 1, 28, 28)


def test_checkpoint_and_published_folder_round_trips(tmp_path):
    torch.manual_seed(0)
    m = tiny_images()
    t = fit_steps(m, torch.rand(16, 1, 28, 28) * 2 - 1, 2, tmp_path=tmp_path, batch_size=8)
    ckpt = tmp_path / "m.ckpt"
    t.save_checkpoint(ckpt)
    loaded = lebm_zoo.load_pretrained(ckpt)
    assert isinstance(loaded, DiffusionRecoveryEBM) and not loaded.training
    want = m.state_dict()
    assert loaded.state_dict().keys() == want.keys() and any(k.startswith("ema_net.") for k in want)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in want.items())
    ref = fingerprint(m)
    assert fingerprint(loaded) == pytest.approx(ref, rel=1e-6)
    folder = loaded.save_pretrained(tmp_path / "published", data="random images")
    again = lebm_zoo.load_pretrained(folder)
    assert isinstance(again, DiffusionRecoveryEBM) and fingerprint(again) == pytest.approx(ref, rel=1e-6)
    with pytest.raises(CheckpointError, match="not a ShortRunEBM"):
        ShortRunEBM.load_pretrained(ckpt)


def test_vector_data_trains_from_a_plain_loader():
    torch.manual_seed(0)
    m = tiny_vectors(warmup=0)
    before = [p.detach().clone() for p in m.net.parameters()]
    fit_steps(m, tensor_loader(torch.randn(32, 2) * 0.3, batch_size=16), 2)
    assert any(not torch.equal(a, b) for a, b in zip(before, m.net.parameters()))
    with pytest.raises(lebm_zoo.DataShapeError, match="--model.dim"):
        fit_steps(tiny_vectors(), tensor_loader(torch.randn(16, 3), batch_size=8), 1)


# ------------------------------------------------------------------------------------------------ the recipe
SMALL = ["--model.ch", "4", "--model.num_res_blocks", "1", "--model.num_timesteps", "2", "--model.mcmc_steps", "2"]


def test_mnist_drl_fits_and_tests_through_the_cli(tmp_path, capsys, fid_weights_env, fake_mnist_dir):
    code = main(recipe_fit_args("mnist_drl", fake_mnist_dir, tmp_path, *SMALL))
    assert code == 0, capsys.readouterr().err
    (last,) = tmp_path.rglob("last.ckpt")
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["global_step"] == 2 and ckpt["lebm_zoo"]["recipe"] == "mnist_drl"
    capsys.readouterr()
    # test: the recipe's SampleGrid and FID (the last callback: 4 samples vs 4 test images for speed)
    args = ["test", "--recipe", "mnist_drl", "--data.data_dir", str(fake_mnist_dir), "--data.download", "false",
            "--data.val_size", "4", "--data.batch_size", "8", "--data.num_workers", "0",
            "--trainer.default_root_dir", str(tmp_path), "--trainer.limit_test_batches", "1",
            "--trainer.enable_progress_bar", "false", *SMALL, "--trainer.callbacks.init_args.num_samples", "4",
            "--trainer.callbacks.init_args.num_real", "4", "--ckpt_path", str(last)]
    code = main(args)
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "test/fid" in out.out
    assert list(tmp_path.rglob("samples/test.png")), "SampleGrid wrote no test grid"
    model = lebm_zoo.load_pretrained(tmp_path)
    assert isinstance(model, DiffusionRecoveryEBM) and model.sample(2).shape == (2, 1, 28, 28)
