"""CoopNets against the authors' TF1 code (jianwen-xie/CoopNets @04d5c32: model/model.py, main.py,
model/utils/custom_ops.py, model/utils/data_io.py).

The reference is transcribed here from its equations, independently of lebm_zoo's implementation: TF ``SAME``
convolutions by explicit padding, ``conv2d_transpose`` as TF defines it (the gradient of a ``SAME``/``VALID`` conv2d
with respect to its input), ``contrib.layers.batch_norm`` with ``scale=False`` and batch statistics, the Langevin
updates, the losses as TF reduces them and TF1's Adam. One training iteration of the real module (through a
Lightning ``fit``) at float64 with replayed noise must land on the transcription's parameters.
"""
import math
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from lebm_zoo.models.coopnets import CoopDescriptor, CoopGenerator, CoopNets
from lebm_zoo.nets import count_parameters
from lebm_zoo.optim import AdamTF

RTOL = 1e-10  # relative error allowed against the transcription, float64
ROUNDOFF = 1e-12  # bound on the relative summation error of a float64 gradient, any x86-64 CPU


# ------------------------------------------------------------------------------------------------ transcription
def _tf_pad(n, k, s):
    """TF's SAME padding on an axis of n: output ceil(n / s); the odd pixel of the total goes to the end."""
    need = max((math.ceil(n / s) - 1) * s + k - n, 0)
    return need // 2, need - need // 2


def conv2d(x, w, b, s, padding):
    """tf.nn.conv2d + bias_add (NCHW here); w is ``(out, in, k, k)``."""
    if padding == "SAME":
        top, bottom = _tf_pad(x.shape[2], w.shape[2], s)
        left, right = _tf_pad(x.shape[3], w.shape[3], s)
        x = F.pad(x, (left, right, top, bottom))
    return F.conv2d(x, w, b, stride=s)


def conv2d_transpose(y, w, b, s, out_size, padding):
    """tf.nn.conv2d_transpose(y, w, output_shape, s, padding) + bias_add: the gradient, w.r.t. its input of shape
    ``out_size``, of the conv2d that maps that input to y's shape (w, ``(in_y, out, k, k)``, is that conv's filter)."""
    x0 = torch.zeros(y.shape[0], w.shape[1], out_size, out_size, dtype=y.dtype, requires_grad=True)
    with torch.enable_grad():
        (x,) = torch.autograd.grad(conv2d(x0, w, None, s, padding), x0, grad_outputs=y, create_graph=True)
    return x + b.view(1, -1, 1, 1)


def batch_norm(x, beta):
    """contrib.layers.batch_norm(x, is_training=True) defaults: batch moments, epsilon 1e-3, center, no scale."""
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = (x - mean).pow(2).mean(dim=(0, 2, 3), keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-3) + beta.view(1, -1, 1, 1)


def leaky_relu(x):
    return torch.maximum(x, 0.2 * x)  # custom_ops.leaky_relu, leakiness 0.2


# (kernel, stride, padding) of the descriptor convs and (kernel, out size) of the generator up-samplings, as the
# reference graph (model.py:357-444); 32 px (no TF counterpart) is the 28 px net with 4 -> 8 -> 16 -> 32
DES = {28: [(4, 2), (4, 2), (4, 2)], 32: [(4, 2), (4, 2), (4, 2)], 64: [(5, 2), (3, 2), (3, 1)]}
GEN = {28: [(4, 7), (4, 14), (4, 28)], 32: [(4, 8), (4, 16), (4, 32)], 64: [(5, 8), (5, 16), (5, 32), (5, 64)]}


def ref_descriptor(p, x, img_size):
    """The descriptor's 100-vector output ``(B, n_out)``; p: conv (w, b) pairs then the fc (w, b)."""
    h = x
    for (w, b), (_, s) in zip(p[:-1], DES[img_size]):
        h = leaky_relu(conv2d(h, w, b, s, "SAME"))
    w, b = p[-1]
    w = w.view(w.shape[0], h.shape[1], h.shape[2], h.shape[3])  # fully_connected: a VALID conv over the whole map
    return conv2d(h, w, b, 1, "VALID").flatten(1)


def ref_generator(p, z, img_size):
    """p: convt (w, b) pairs interleaved with BN betas: [(w, b), beta, (w, b), beta, ..., (w, b)]."""
    convts, betas = p[0::2], p[1::2]
    h = conv2d_transpose(z.view(z.shape[0], -1, 1, 1), *convts[0], 1, 4, "VALID")
    for (w, b), beta, (_, size) in zip(convts[1:], betas, GEN[img_size]):
        h = conv2d_transpose(leaky_relu(batch_norm(h, beta)), w, b, 2, size, "SAME")
    return torch.tanh(h)


def des_params(model):
    d = model.descriptor.net
    return [(m.weight, m.bias) for m in d if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]


def gen_params(model):
    out = []
    for m in model.generator.net:
        if isinstance(m, torch.nn.ConvTranspose2d):
            out.append((m.weight, m.bias))
        elif isinstance(m, torch.nn.BatchNorm2d):
            out.append(m.bias)
    return out


def _flat(p):
    return [t for item in p for t in (item if isinstance(item, tuple) else (item,))]


def adam_tf_first_step(params, grads, lr, b1, b2, eps=1e-8):
    """tf.train.AdamOptimizer's first update (t = 1, moments from 0): lr_t = lr sqrt(1 - b2) / (1 - b1)."""
    lr_t = lr * math.sqrt(1 - b2) / (1 - b1)
    out = []
    for p, g in zip(params, grads):
        m, v = (1 - b1) * g, (1 - b2) * g * g
        out.append(p - lr_t * m / (torch.sqrt(v) + eps))
    return out


def reference_iteration(hp, dp, gp, obs, noises):
    """One iteration of model.py:201-215 with its main.py hyperparameters; returns new params and the losses."""
    noises = list(noises)
    n, img = hp["n_chains"], hp["img_size"]
    if hp["channels"] == 3:  # data_io.py:91-93, per image over all pixels and channels
        lo = obs.amin(dim=(1, 2, 3), keepdim=True)
        hi = obs.amax(dim=(1, 2, 3), keepdim=True)
        obs = (obs - lo) / (hi - lo) * 2 - 1
    d1, s1, d2, s2 = (hp["descriptor_step_size"], hp["descriptor_sigma"], hp["generator_step_size"],
                      hp["generator_sigma"])
    z = noises.pop(0)  # G0
    g_res = ref_generator(gp, z, img).detach()
    syn = g_res  # D1, model.py:116-121
    for _ in range(hp["descriptor_steps"]):
        syn = syn.detach().requires_grad_(True)
        grad = torch.autograd.grad(ref_descriptor(dp, syn, img).sum(), syn)[0]
        syn = syn - 0.5 * d1 * d1 * (syn / s1 / s1 - grad) + d1 * noises.pop(0)
    syn = syn.detach()

    def gen_loss(zz):  # model.py:92-93 (and 136-137): mean over chains, summed over pixels by the gradient
        per_pixel = (1.0 / (2 * s2 * s2) * (syn - ref_generator(gp, zz, img)) ** 2).mean(dim=0)
        return per_pixel.sum()

    for _ in range(hp["generator_steps"]):  # G1, model.py:132-140
        z = z.detach().requires_grad_(True)
        loss = gen_loss(z) if hp["generator_langevin_grad"] == "batch_mean" else gen_loss(z) * n
        grad = torch.autograd.grad(loss, z)[0]
        z = z - 0.5 * d2 * d2 * (z + grad) + d2 * noises.pop(0)
    z = z.detach()
    assert not noises

    des_loss = (ref_descriptor(dp, syn, img).mean(dim=0) - ref_descriptor(dp, obs, img).mean(dim=0))  # (n_out,)
    dflat = _flat(dp)
    d_grads = torch.autograd.grad(des_loss.sum(), dflat)  # D2: gradient of the vector loss = of its sum
    g_loss = gen_loss(z)
    gflat = _flat(gp)
    g_grads = torch.autograd.grad(g_loss, gflat)  # G2
    # the descriptor gradient is a difference of two means; where they cancel (a bias whose LeakyReLU slopes are
    # the same for every image), what is left is their round-off: keep the size of the two terms to bound it
    d_obs = torch.autograd.grad(ref_descriptor(dp, obs, img).sum(1).mean(), dflat)
    d_syn = torch.autograd.grad(ref_descriptor(dp, syn, img).sum(1).mean(), dflat)
    d_terms = [float((a.abs() + b.abs()).max()) for a, b in zip(d_obs, d_syn)]
    b1, b2 = hp["betas"]
    new_d = adam_tf_first_step(dflat, d_grads, hp["lr_d"], b1, b2)
    new_g = adam_tf_first_step(gflat, g_grads, hp["lr_g"], b1, b2)
    f_obs, f_syn = ref_descriptor(dp, obs, img).sum(1).mean(), ref_descriptor(dp, syn, img).sum(1).mean()
    return dict(new_d=new_d, new_g=new_g, g_grads=g_grads, d_terms=d_terms, loss_d=float(des_loss.sum().detach()),
                loss_g=float(g_loss.detach()),
                score_pos=float(f_obs), score_neg=float(f_syn))


class Replay:
    """torch.randn / torch.randn_like returning pre-drawn tensors in order (shapes checked)."""

    def __init__(self, tensors):
        self.queue = list(tensors)

    def _next(self, shape, dtype):
        assert self.queue, "more random draws than prepared"
        t = self.queue.pop(0)
        assert tuple(t.shape) == tuple(shape), (tuple(t.shape), tuple(shape))
        return t.clone().to(dtype or t.dtype)

    def randn(self, *size, dtype=None, device=None, **kw):
        shape = size[0] if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)) else size
        return self._next(shape, dtype)

    def randn_like(self, t, dtype=None, **kw):
        return self._next(t.shape, dtype or t.dtype)


def _rel(a, b, scale):
    return float((a - b).abs().max() / scale)


CASES = [  # (img_size, channels, generator_steps, generator_langevin_grad)
    (28, 1, 0, "batch_mean"),  # the reference's MNIST nets (7 -> 4 px SAME conv and 4 -> 7 px transpose asymmetric)
    (64, 3, 0, "batch_mean"),  # its scene nets (asymmetric pads), RGB min-max scaling
    (28, 1, 2, "batch_mean"),  # with its generator Langevin (gen_sample_steps > 0)
    (28, 1, 2, "per_chain"),  # the deviating option, against the transcription scaled back by N
]


def compare_one_iteration(img_size, channels, gen_steps, gen_grad, monkeypatch, sabotage=None):
    """Train the real module one iteration (float64, replayed noise) and the transcription side by side.

    Returns ``(excess, metrics, ref)``: ``excess`` is the largest parameter-update error over its allowance (<= 1:
    equal), ``metrics`` the trainer's logged values and ``ref`` the transcription's. ``sabotage(model)`` may break
    the module after the transcription's copy is taken (to show that the comparison catches a wrong model).

    Allowance of a tensor's update: ``RTOL`` of the size of the reference update, plus, for the descriptor, the
    round-off that Adam can amplify. Adam's first step ``lr_t g / (|g| + eps)`` moves by at most ``lr_t / eps``
    per unit of gradient error, and the descriptor gradient is a difference of two means whose summation error is
    bounded by ``ROUNDOFF`` times the size of those two terms. Where they cancel exactly (a bias whose LeakyReLU
    slopes are the same for every image) only that round-off is left, and its sign depends on the CPU's float64
    kernels; everywhere else the allowance is far below the update.
    """
    torch.manual_seed(0)
    hp = dict(img_size=img_size, channels=channels, nz=6, ngf=2, ndf=2, n_out=5, n_chains=6, descriptor_steps=3,
              generator_steps=gen_steps, generator_langevin_grad=gen_grad)
    model = CoopNets(**hp)
    assert model.hparams.adam == "tf"
    # perturb the zero-initialised biases and BN offsets so that every parameter's role is exercised
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_(0, 0.05)
    full = {**model.hparams}
    b, n = 5, hp["n_chains"]
    obs = (torch.rand(b, channels, img_size, img_size) * 1.2 - 0.7).double()  # not spanning [-1, 1]
    noises = [torch.randn(n, hp["nz"], dtype=torch.float64)]
    noises += [torch.randn(n, channels, img_size, img_size, dtype=torch.float64) for _ in range(3)]
    noises += [torch.randn(n, hp["nz"], dtype=torch.float64) for _ in range(gen_steps)]

    before = {k: v.detach().double().clone() for k, v in model.state_dict().items()}
    ref_model = CoopNets(**hp).double()
    ref_model.load_state_dict(before)
    ref = reference_iteration(full, des_params(ref_model), gen_params(ref_model), obs, noises)
    if sabotage is not None:
        sabotage(model)

    replay = Replay(noises)
    monkeypatch.setattr(torch, "randn", replay.randn)
    monkeypatch.setattr(torch, "randn_like", replay.randn_like)
    trainer = pl.Trainer(accelerator="cpu", precision="64-true", max_steps=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0)
    trainer.fit(model, DataLoader(TensorDataset(obs, torch.zeros(b)), batch_size=b, shuffle=False))
    monkeypatch.undo()
    assert not replay.queue and trainer.global_step == 1

    got_d = [t.detach() for t in _flat(des_params(model))]
    got_g = [t.detach() for t in _flat(gen_params(model))]
    old_d = [t.detach() for t in _flat(des_params(ref_model))]
    old_g = [t.detach() for t in _flat(gen_params(ref_model))]
    assert all(t.dtype == torch.float64 for t in got_d + got_g)
    b1, b2 = full["betas"]
    lr_t_d = full["lr_d"] * math.sqrt(1 - b2) / (1 - b1)  # TF Adam's first-step learning rate
    # The biases of the ConvTs that feed a BatchNorm (custom_ops.py:70, before model.py:398/427) have an exactly zero
    # gradient (BN removes the mean), in TF as here: only round-off reaches them, which Adam's first step turns into
    # steps of up to lr in either direction. They are checked apart: zero reference gradient, a step within lr.
    n_conv = sum(isinstance(x, tuple) for x in gen_params(ref_model))
    pre_bn = {len(got_d) + 3 * i + 1 for i in range(n_conv - 1)}  # flat order: w, b, beta, w, b, beta, ..., w, b
    g_scale = max(float(g.abs().max()) for g in ref["g_grads"])
    excess, strict = 0.0, 0
    for i, (got, new, old) in enumerate(zip(got_d + got_g, ref["new_d"] + ref["new_g"], old_d + old_g)):
        if i in pre_bn:
            assert float(ref["g_grads"][i - len(got_d)].abs().max()) <= 1e-12 * g_scale
            excess = max(excess, float((got - old).abs().max()) / (model.hparams.lr_g * (1 + 1e-12)))
            continue
        step_ref = (new - old).detach()
        scale = float(step_ref.abs().max())
        allowance = RTOL * scale
        if i < len(got_d):
            allowance += lr_t_d * ROUNDOFF * ref["d_terms"][i] / 1e-8
        strict += allowance < 1e-3 * scale  # the round-off allowance is negligible: checked to RTOL
        excess = max(excess, float((got - old - step_ref).abs().max()) / allowance)
    # most tensors are checked to RTOL: a wrong sign or reduction cannot hide in the round-off allowances
    assert strict >= (len(got_d) + len(got_g) - len(pre_bn)) // 2, strict
    return excess, trainer.callback_metrics, ref


@pytest.mark.parametrize("img_size,channels,gen_steps,gen_grad", CASES)
def test_one_training_iteration_matches_the_tf_reference(img_size, channels, gen_steps, gen_grad, monkeypatch):
    excess, m, ref = compare_one_iteration(img_size, channels, gen_steps, gen_grad, monkeypatch)
    assert excess <= 1.0, excess
    f_scale = abs(ref["score_pos"]) + abs(ref["score_neg"])  # loss_d is their difference: cancellation
    assert abs(float(m["train/loss_d"]) - ref["loss_d"]) <= RTOL * f_scale
    for k in ("loss_g", "score_pos", "score_neg"):
        assert abs(float(m[f"train/{k}"]) - ref[k]) <= RTOL * abs(ref[k]), k


def _flip_descriptor_sign(model):
    model.descriptor.net[-1].weight.data.neg_()  # f -> -f + 2 b: the descriptor loss with the wrong sign
    model.descriptor.net[-1].bias.data.mul_(-1)


def _sum_over_chains(model):
    neg_energy = model.neg_energy
    model.neg_energy = lambda x: neg_energy(x) * x.shape[0]  # a sum over chains and images, not the reference's means


@pytest.mark.parametrize("sabotage", [_flip_descriptor_sign, _sum_over_chains])
def test_the_reference_comparison_catches_a_wrong_sign_or_reduction(sabotage, monkeypatch):
    excess, _, _ = compare_one_iteration(28, 1, 0, "batch_mean", monkeypatch, sabotage)
    assert excess > 1e3, excess


@pytest.mark.parametrize("img_size,channels", [(28, 1), (32, 3), (64, 3)])
def test_nets_are_the_transcribed_tf_graphs(img_size, channels):
    torch.manual_seed(1)
    d = CoopDescriptor(channels, img_size, ndf=4, n_out=7).double()
    g = CoopGenerator(nz=5, ngf=2, img_size=img_size, channels=channels).double()
    z = torch.randn(4, 5, dtype=torch.float64)
    nets = SimpleNamespace(descriptor=d, generator=g)  # what des_params / gen_params read
    with torch.no_grad():
        for p in g.parameters():
            if p.dim() == 1:
                p.normal_(0, 0.1)
    x = g(z)
    x_ref = ref_generator(gen_params(nets), z, img_size)
    assert x.shape == (4, channels, img_size, img_size)
    assert _rel(x, x_ref, float(x_ref.abs().max())) < RTOL
    f_ref = ref_descriptor(des_params(nets), x_ref, img_size).sum(1)
    assert _rel(d(x), f_ref, float(f_ref.abs().max())) < RTOL
    assert torch.equal(g.eval()(z), g.train()(z))  # batch statistics in eval mode too (is_training=True)


def test_parameter_counts_are_the_reference_graphs():
    # 28 px (net_type mnist, model.py:374-386, 422-444), 1 channel, nz 100, n_out 100:
    #   D: conv1 4*4*1*64+64 = 1,088; conv2 4*4*64*128+128 = 131,200; conv3 4*4*128*256+256 = 524,544;
    #      fc over 4x4x256 (SAME: 28 -> 14 -> 7 -> 4): 4*4*256*100+100 = 409,700              -> 1,066,532
    #   G: convt1 4*4*512*100+512 + beta 512; convt2 4*4*256*512+256 + 256; convt3 4*4*128*256+128 + 128;
    #      convt5 4*4*1*128+1                       = 820,224 + 2,097,664 + 524,544 + 2,049    -> 3,444,481
    assert count_parameters(CoopDescriptor(1, 28)) == 1_066_532
    assert count_parameters(CoopGenerator(100, 64, 28, 1)) == 3_444_481
    # 64 px (net_type scene, model.py:360-372, 393-420), 3 channels:
    #   D: conv1 5*5*3*64+64 = 4,864; conv2 3*3*64*128+128 = 73,856; conv3 3*3*128*256+256 = 295,168;
    #      fc over 16x16x256 (64 -> 32 -> 16 -> 16): 16*16*256*100+100 = 6,553,700             -> 6,927,588
    #   G: convt1 4*4*512*100+512 + 512 = 820,224; convt2 5*5*256*512+256 + 256 = 3,277,312;
    #      convt3 5*5*128*256+128 + 128 = 819,456; convt4 5*5*64*128+64 + 64 = 204,928;
    #      convt5 5*5*3*64+3 = 4,803                                                             -> 5,126,723
    assert count_parameters(CoopDescriptor(3, 64)) == 6_927_588
    assert count_parameters(CoopGenerator(100, 64, 64, 3)) == 5_126_723


# ------------------------------------------------------------------------------------------------ AdamTF
def _grads(steps, shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g, dtype=torch.float64) * 10 ** -k for s in shapes] for k in range(steps)]


def test_adam_tf_is_tensorflows_update_formula():
    lr, b1, b2, eps = 0.007, 0.5, 0.999, 1e-8
    shapes = [(3, 4), (5,)]
    init = [torch.randn(s, dtype=torch.float64) for s in shapes]
    params = [p.clone().requires_grad_(True) for p in init]
    opt = AdamTF(params, lr=lr, betas=(b1, b2), eps=eps)
    # by hand: m, v moments; lr_t = lr sqrt(1 - b2^t) / (1 - b1^t); p -= lr_t m / (sqrt(v) + eps)
    ref = [p.clone() for p in init]
    m = [torch.zeros_like(p) for p in init]
    v = [torch.zeros_like(p) for p in init]
    for t, grads in enumerate(_grads(6, shapes), start=1):  # gradients from 1 down to 1e-5: eps matters late
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        lr_t = lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
        for i, g in enumerate(grads):
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            ref[i] = ref[i] - lr_t * m[i] / (torch.sqrt(v[i]) + eps)
        for p, r, p0 in zip(params, ref, init):
            assert _rel(p.detach() - p0, r - p0, float((r - p0).abs().max())) < 1e-13


def test_adam_tf_differs_from_torch_adam_only_by_the_epsilon_placement():
    shapes = [(4, 3), (6,)]
    init = [torch.randn(s, dtype=torch.float64) for s in shapes]
    grads = _grads(6, shapes, seed=1)

    def run(make, eps_schedule=None):
        ps = [p.clone().requires_grad_(True) for p in init]
        opt = make(ps)
        for t, gs in enumerate(grads, start=1):
            for p, g in zip(ps, gs):
                p.grad = g.clone()
            if eps_schedule:
                opt.param_groups[0]["eps"] = eps_schedule(t)
            opt.step()
        return torch.cat([p.detach().flatten() for p in ps])

    kw = dict(lr=0.01, betas=(0.5, 0.999))
    p0 = torch.cat([p.flatten() for p in init])
    tf0, torch0 = run(lambda ps: AdamTF(ps, eps=0.0, **kw)), run(lambda ps: torch.optim.Adam(ps, eps=0.0, **kw))
    assert _rel(tf0 - p0, torch0 - p0, float((torch0 - p0).abs().max())) < 1e-13  # eps = 0: the same update
    tf8 = run(lambda ps: AdamTF(ps, eps=1e-8, **kw))
    torch8 = run(lambda ps: torch.optim.Adam(ps, eps=1e-8, **kw))
    assert _rel(tf8 - p0, torch8 - p0, float((torch8 - p0).abs().max())) > 1e-6  # default eps: they differ
    # torch's eps at step t set to TF's eps / sqrt(1 - b2^t): the same update again
    moved = run(lambda ps: torch.optim.Adam(ps, eps=1e-8, **kw),
                eps_schedule=lambda t: 1e-8 / math.sqrt(1 - 0.999 ** t))
    assert _rel(tf8 - p0, moved - p0, float((moved - p0).abs().max())) < 1e-12


def test_adam_option_picks_the_optimiser():
    tf_opts = CoopNets(img_size=28, channels=1, nz=4, ngf=2, ndf=2, n_out=3).configure_optimizers()
    torch_opts = CoopNets(img_size=28, channels=1, nz=4, ngf=2, ndf=2, n_out=3, adam="torch").configure_optimizers()
    assert all(type(o) is AdamTF for o in tf_opts) and all(type(o) is torch.optim.Adam for o in torch_opts)
    assert tf_opts[0].defaults["lr"] == 0.007 and tf_opts[1].defaults["lr"] == 1e-4
    assert tf_opts[0].defaults["betas"] == (0.5, 0.999) and tf_opts[0].defaults["eps"] == 1e-8
    with pytest.raises(ValueError, match="adam"):
        CoopNets(adam="sgd")
    with pytest.raises(ValueError, match="generator_langevin_grad"):
        CoopNets(generator_langevin_grad="sum")
    with pytest.raises(ValueError, match="data_scaling"):
        CoopNets(data_scaling="zscore")
