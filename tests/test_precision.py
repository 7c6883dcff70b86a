"""bf16-mixed gives the fp32 results within bf16's precision, with fp32 chain states, energies and optimiser states.

Tolerances: bf16 keeps 8 significant bits, a relative rounding error of at most 2^-9 (0.2%) per element. A sum of
many elements' errors is bounded by the same 0.2% when the errors all align and is far smaller when they cancel
(measured here: 1e-4 relative on log p(x, z)); we allow the aligned bound, 2e-3. A Langevin chain moves z by
(s^2/2) * grad per step; a 0.2% gradient error over K1 = 20 steps of s = 0.1 moves z by well under 1e-2 (measured:
5e-4 max over 5,000 coordinates), far below the chain's own noise s = 0.1 per step; we allow 5e-3.
"""
import pytest
import torch
from _data import fit_steps

from lebm_zoo import (
    CoopNets,
    DivergenceTriangle,
    FlowContrastiveEBM,
    JointHierarchicalEBMPrior,
    LatentEBMPrior,
    ShortRunEBM,
)

BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


def model_and_data():
    torch.manual_seed(0)
    m = LatentEBMPrior(img_size=32, channels=3, ngf=16)
    x = (m.generate(torch.randn(50, 100)) + 0.1 * torch.randn(50, 3, 32, 32)).clamp(-1, 1)
    return m, x


def test_log_joint_and_chains_match_fp32_within_bf16_precision():
    m, x = model_and_data()
    z = torch.randn(50, 100)
    with torch.no_grad():
        ref = m.log_joint(x, z)
        with torch.autocast(**BF16):
            low = m.log_joint(x, z)
            assert m.generator(z).dtype == torch.bfloat16  # the network really runs in bf16
    assert low.dtype == torch.float32
    assert ((low - ref).abs() / ref.abs()).max() < 2e-3
    out = {}
    for bf in (False, True):
        torch.manual_seed(1)
        with torch.autocast(**BF16, enabled=bf):
            out[bf] = (m.infer_latent(x), m.sample_latent(50))
    for a, b in zip(out[False], out[True]):
        assert b.dtype == torch.float32  # chain states stay fp32
        assert (a - b).abs().max() < 5e-3


def test_bf16_mixed_training_keeps_fp32_parameters_and_optimizer_state_and_matches_losses():
    losses = {}
    for precision in ("32-true", "bf16-mixed"):
        m, x = model_and_data()
        torch.manual_seed(2)
        t = fit_steps(m, x, 3, batch_size=25, shuffle=False, precision=precision)
        assert all(p.dtype == torch.float32 for p in m.parameters())
        for opt in t.optimizers:
            states = [v for s in opt.state.values() for v in s.values() if v.is_floating_point()]
            assert states and all(v.dtype == torch.float32 for v in states)
        losses[precision] = float(t.callback_metrics["train/loss_g"])
    rel = abs(losses["bf16-mixed"] - losses["32-true"]) / losses["32-true"]
    assert rel < 1e-2  # same seed, 3 steps: trajectories differ only by bf16 rounding


@pytest.mark.parametrize("make", [
    lambda: ShortRunEBM(img_size=28, channels=1, nf=4, n_steps=3),
    lambda: CoopNets(img_size=28, channels=1, nz=8, ngf=4, ndf=4, n_out=5, n_chains=6, descriptor_steps=2),
    lambda: DivergenceTriangle(img_size=28, channels=1, nz=8, ngf=4, ndf=4, nif=4),
    lambda: FlowContrastiveEBM(img_size=28, channels=1, ndf=4, flow_transforms=2, flow_hidden=16),
    lambda: JointHierarchicalEBMPrior(img_size=28, channels=1, nz=(6, 4), ngf=4, cond_hidden=8, cond_layers=1,
                                      energy_hidden=8, energy_layers=1, prior_steps=2, posterior_steps=2),
], ids=["shortrun", "coopnets", "triangle", "fce", "hierarchical"])
def test_every_family_trains_under_bf16_mixed_with_fp32_state(make):
    torch.manual_seed(0)
    m = make()
    x = torch.rand(16, 1, 28, 28) * 2 - 1
    t = fit_steps(m, x, 2, batch_size=8, shuffle=False, precision="bf16-mixed")
    assert t.global_step == 2 and m.divergence is None
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in m.parameters())
    s = m.sample(3)
    assert s.dtype == torch.float32 and s.shape == (3, 1, 28, 28)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_the_lstm_runs_in_fp32_under_bf16_autocast_on_cuda():
    """PyTorch's autocast runs cuDNN's RNNs in fp16 whatever its dtype, and bf16-mixed scales no loss: under bf16
    autocast the sequence decoder's LSTM runs in fp32 (it would return fp16), in training and in the chains' eval
    mode, with finite gradients; the output layer still runs in bf16."""
    from lebm_zoo.nets import SequenceDecoder

    torch.manual_seed(0)
    dec = SequenceDecoder(12, nz=3, emb_dim=5, hidden=6).cuda()
    tokens = torch.randint(0, 12, (4, 7), device="cuda")
    for training in (True, False):
        dec.train(training)
        z = torch.randn(4, 3, device="cuda", requires_grad=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out, (h, c) = dec.hidden_states(tokens, z)
            logits, _ = dec(tokens, z)
        assert out.dtype == h.dtype == c.dtype == torch.float32 and logits.dtype == torch.bfloat16
        (g,) = torch.autograd.grad(logits.float().logsumexp(-1).sum(), z)
        assert torch.isfinite(g).all() and g.abs().sum() > 0
