"""The compiled Langevin chain (``LangevinSampler(compile=...)``, ``LatentEBMPrior(compile_chains=...)``): the same
states as the eager chain with the same seed, no recompilation for a fresh closure, the argument check.

torch.compile on a CPU builds C++ with the system compiler: where torch's inductor finds none (or cannot build a
trivial function), the tests that compile are skipped with the reason. The distinct compiled graphs are kept few
(one per target function) so that the file runs in about a minute on one core.
"""
from __future__ import annotations

import functools

import pytest
import pytorch_lightning as pl
import torch
from _data import tensor_loader, tiny_trainer, uniform_images
from torch import nn

from lebm_zoo import LatentEBMPrior
from lebm_zoo.samplers import LangevinSampler


@functools.lru_cache(maxsize=1)
def _compile_unavailable() -> str | None:
    """Why torch.compile cannot run on this CPU (None when it can)."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
        get_cpp_compiler()
    except Exception as e:  # any failure to find a compiler is a reason to skip
        return (f"torch.compile's CPU backend (inductor) needs a C++ compiler (torch._inductor.config.cpp.cxx or "
                f"$CXX): none found ({type(e).__name__}: {e})")
    try:
        torch.compile(lambda t: t.sin() + 1.0)(torch.randn(3))
    except Exception as e:
        return f"torch.compile cannot build a trivial function on this CPU: {type(e).__name__}: {e}"
    return None


@pytest.fixture(scope="module", autouse=True)
def fresh_dynamo():
    """Start and leave with dynamo's caches empty (its recompile limit counts graphs per code object)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def compiler():
    reason = _compile_unavailable()
    if reason:
        pytest.skip(reason)


def unique_graphs() -> int:
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


class MLPEnergy(nn.Module):
    def __init__(self, d=4, h=16):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, h), nn.GELU(), nn.Linear(h, 1))

    def forward(self, z):
        return self.net(z).squeeze(-1)


def target(energy: nn.Module, centre: torch.Tensor):
    """A fresh closure per call, as the models pass: MLP energy tilting a Gaussian centred at ``centre``."""
    return lambda z: -energy(z) - 0.5 * ((z - centre) ** 2).sum(1)


@pytest.fixture
def energy():
    torch.manual_seed(0)
    e = MLPEnergy()
    for p in e.parameters():
        p.requires_grad_(False)
    return e


def run(sampler, log_prob, x0, seed=1):
    torch.manual_seed(seed)
    return sampler(log_prob, x0, return_trace=True)


def test_compiled_chain_matches_eager_with_grad_clip_and_clamp_and_does_not_recompile(compiler, energy):
    torch.manual_seed(0)
    x0, centre = torch.randn(6, 4) * 2, torch.full((4,), 0.3)
    cfg = dict(n_steps=6, step_size=0.5, grad_clip=1.0, clamp=(-2.0, 2.0))
    eager = LangevinSampler(**cfg)
    compiled = LangevinSampler(**cfg, compile=True)
    x_e, tr_e = run(eager, target(energy, centre), x0)
    x_c, tr_c = run(compiled, target(energy, centre), x0)
    # the clip and the clamp are active: some gradient norms exceed 1, some states leave the box unclamped
    assert ((x_e == 2.0) | (x_e == -2.0)).any() and not ((x_e == 2.0) | (x_e == -2.0)).all()
    torch.testing.assert_close(x_c, x_e, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tr_c["log_prob"], tr_e["log_prob"], rtol=1e-5, atol=1e-5)
    assert not x_c.requires_grad and x_c.shape == x0.shape
    assert all(p.grad is None for p in energy.parameters())

    # a second call with a new closure of the same code (holding a new tensor) reuses the graph, and so does a new
    # sampler of the same configuration; the chain continues the same RNG stream as the eager one
    graphs = unique_graphs()
    centre2 = torch.full((4,), -0.2)
    x_c2, _ = run(compiled, target(energy, centre2), x0, seed=2)
    x_c3, _ = run(LangevinSampler(**cfg, compile=True), target(energy, centre2), x0, seed=2)
    x_e2, _ = run(eager, target(energy, centre2), x0, seed=2)
    assert unique_graphs() == graphs
    torch.testing.assert_close(x_c2, x_e2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_c3, x_e2, rtol=1e-5, atol=1e-5)


def test_compiled_step_without_noise_and_pickling(compiler, energy):
    import pickle

    x0 = torch.randn(5, 4)
    eager, compiled = (LangevinSampler(3, 0.3, noise_scale=0.0, compile=c) for c in (None, "default"))
    torch.testing.assert_close(compiled(target(energy, torch.zeros(4)), x0), eager(target(energy, torch.zeros(4)), x0),
                               rtol=1e-5, atol=1e-5)
    clone = pickle.loads(pickle.dumps(compiled))  # the compiled function stays behind
    assert clone._compiled is None and clone.compile == "default"
    x, lp = compiled.step(target(energy, torch.zeros(4)), x0)
    assert x.shape == x0.shape and lp.shape == (5,)


def test_whole_chain_compiles_to_one_graph_and_matches_eager(compiler, energy):
    """compile_scope="chain": the K steps are one graph (fullgraph=True: a break would raise), the eager states."""
    torch.manual_seed(0)
    x0, centre = torch.randn(6, 4) * 2, torch.full((4,), 0.3)
    cfg = dict(n_steps=6, step_size=0.5, grad_clip=1.0, clamp=(-2.0, 2.0))
    eager = LangevinSampler(**cfg)
    whole = LangevinSampler(**cfg, compile=True, compile_scope="chain")
    graphs = unique_graphs()
    x_c, tr_c = run(whole, target(energy, centre), x0)
    assert unique_graphs() == graphs + 1  # one graph holds the whole chain
    x_e, tr_e = run(eager, target(energy, centre), x0)
    assert ((x_e == 2.0) | (x_e == -2.0)).any()  # the clamp is active
    torch.testing.assert_close(x_c, x_e, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tr_c["log_prob"], tr_e["log_prob"], rtol=1e-5, atol=1e-5)
    assert tr_c["log_prob"].shape == (6,) and not x_c.requires_grad
    # a fresh closure reuses the graph; the RNG stream continues as the eager one's (the draws come before the region)
    x_c2 = run(whole, target(energy, -centre), x0, seed=3)[0]
    assert unique_graphs() == graphs + 1
    torch.testing.assert_close(x_c2, run(eager, target(energy, -centre), x0, seed=3)[0], rtol=1e-5, atol=1e-5)
    # another number of steps is another graph; zero steps return x0
    torch.manual_seed(4)
    x_2 = whole(target(energy, centre), x0, n_steps=2)
    assert unique_graphs() == graphs + 2
    torch.manual_seed(4)
    torch.testing.assert_close(x_2, eager(target(energy, centre), x0, n_steps=2), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(whole(target(energy, centre), x0, n_steps=0), x0)
    assert "compile_scope='chain'" in repr(whole)


def test_whole_chain_without_noise_and_a_graph_break_is_an_error(compiler, energy):
    x0 = torch.randn(5, 4)
    whole = LangevinSampler(3, 0.3, noise_scale=0.0, compile=True, compile_scope="chain")
    torch.testing.assert_close(whole(target(energy, torch.zeros(4)), x0),
                               LangevinSampler(3, 0.3, noise_scale=0.0)(target(energy, torch.zeros(4)), x0),
                               rtol=1e-5, atol=1e-5)

    def breaking(z):  # a host round trip in the target: no whole-chain graph can hold it
        return -energy(z) * len(z.tolist())

    with pytest.raises(Exception, match="(?i)graph break"):  # dynamo refuses it: no silently split graph
        LangevinSampler(2, 0.3, compile=True, compile_scope="chain")(breaking, x0)


def test_bad_compile_scope_raises():
    with pytest.raises(ValueError, match="compile_scope must be"):
        LangevinSampler(3, 0.1, compile=True, compile_scope="epoch")
    with pytest.raises(ValueError, match="compile_scope must be"):
        tiny(compile_chains=True, compile_scope="batch")


def tiny(**kw):
    return LatentEBMPrior(img_size=28, channels=1, nz=8, ngf=4, ndf=16, prior_steps=3, posterior_steps=3, **kw)


def one_step(compile_chains, **kw):
    pl.seed_everything(0, verbose=False)
    m = tiny(compile_chains=compile_chains, **kw)
    data = tensor_loader(uniform_images(4, 1, 28, seed=0), 4)
    t = tiny_trainer(max_steps=1)
    t.fit(m, data)
    return m, {k: v.clone() for k, v in t.callback_metrics.items()}


@pytest.mark.parametrize("scope", ["step", "chain"])
def test_latent_ebm_prior_compiled_chains_train_as_eager(compiler, scope):
    m_c, logs_c = one_step(True, compile_scope=scope)
    assert all(s.compile is True and s.compile_scope == scope for s in m_c.samplers.values())
    m_e, logs_e = one_step(None)
    assert all(s.compile is None for s in m_e.samplers.values())
    assert set(logs_c) == set(logs_e) and "train/loss_g" in logs_e and "train/energy_gap" in logs_e
    for k in logs_e:
        torch.testing.assert_close(logs_c[k], logs_e[k], rtol=1e-4, atol=1e-5, msg=f"{k}")
    sd_c, sd_e = m_c.state_dict(), m_e.state_dict()
    assert set(sd_c) == set(sd_e)
    for k in sd_e:
        torch.testing.assert_close(sd_c[k], sd_e[k], rtol=1e-5, atol=1e-6, msg=f"{k}")


@pytest.mark.parametrize("bad", [1, 0.5, "fast", "", ["default"]])
def test_bad_compile_value_raises(bad):
    with pytest.raises(ValueError, match="compile must be"):
        LangevinSampler(3, 0.1, compile=bad)
    with pytest.raises(ValueError, match="compile must be"):
        tiny(compile_chains=bad)


def test_compile_defaults_off_and_shows_in_repr():
    s = LangevinSampler(3, 0.1)
    assert s.compile is None and s.compile_mode is None and "compile=None" in repr(s)
    assert LangevinSampler(3, 0.1, compile=False).compile_mode is None
    assert LangevinSampler(3, 0.1, compile=True).compile_mode == "default"
    assert "compile='reduce-overhead'" in repr(LangevinSampler(3, 0.1, compile="reduce-overhead"))
    m = tiny()
    assert m.hparams.compile_chains is None and all(s.compile is None for s in m.samplers.values())
    assert m.hparams.compile_scope == "step" and all(s.compile_scope == "step" for s in m.samplers.values())


CUDA_MODES = ["default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_whole_chain_cuda_graph_matches_eager(energy):
    """compile_scope="chain" in "reduce-overhead": one CUDA graph per chain, the eager chain's states (training with
    it: the whole-chain rows of ``benchmarks/run.py --device cuda``). Before the compile modes' test: the GPU check's
    compile step runs both, and this one matters more than the slowest modes' cold compiles."""
    e = energy.cuda()
    x0 = torch.randn(6, 4, device="cuda")
    for seed in (1, 2):  # the second call replays the captured graph
        eager = run(LangevinSampler(4, 0.3, grad_clip=5.0), target(e, torch.zeros(4, device="cuda")), x0, seed)
        whole = run(LangevinSampler(4, 0.3, grad_clip=5.0, compile="reduce-overhead", compile_scope="chain"),
                    target(e, torch.zeros(4, device="cuda")), x0, seed)
        torch.testing.assert_close(whole[0], eager[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(whole[1]["log_prob"], eager[1]["log_prob"], rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
@pytest.mark.parametrize("mode", CUDA_MODES)
def test_every_compile_mode_trains_and_samples_on_cuda(mode, energy):
    # the CUDA-graph modes reuse the graph's output memory at each replay: a chain state fed back as the next step's
    # input used to be "overwritten by a subsequent run" at the first chain (issue 29)
    torch._dynamo.reset()  # each mode compiles the same step function: the modes before would count towards its
    # recompile limit, and past it the chains run eagerly, silently (the last mode would not be tested compiled)
    if mode == "reduce-overhead":  # the chain's states and trace are the eager chain's (one mode: compiling is slow)
        e = energy.cuda()
        x0 = torch.randn(6, 4, device="cuda")
        eager = run(LangevinSampler(4, 0.3, grad_clip=5.0), target(e, torch.zeros(4, device="cuda")), x0)
        compiled = run(LangevinSampler(4, 0.3, grad_clip=5.0, compile=mode),
                       target(e, torch.zeros(4, device="cuda")), x0)
        torch.testing.assert_close(compiled[0], eager[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(compiled[1]["log_prob"], eager[1]["log_prob"], rtol=1e-4, atol=1e-4)
    pl.seed_everything(0, verbose=False)
    m = tiny(compile_chains=mode)
    t = tiny_trainer(accelerator="cuda", max_steps=2)
    t.fit(m, tensor_loader(uniform_images(8, 1, 28, seed=0), 4))
    assert t.global_step == 2 and all(torch.isfinite(p).all() for p in m.parameters())
    m.cuda().eval()  # (fit's teardown moved it to the CPU)
    x = m.sample(4)
    assert x.shape == (4, 1, 28, 28) and x.is_cuda and torch.isfinite(x).all()


#: the chain-heavy families with the compile_chains / compile_scope option besides LatentEBMPrior
COMPILABLE = ["CoopNets", "JointHierarchicalEBMPrior", "ShortRunEBM", "SymbolVectorLEBM"]
#: parameters whose true gradient is zero (a bias before a batch norm): Adam turns the rounding noise of their gradient
#: into steps of up to the learning rate, whose sign can differ between the compiled and the eager arithmetic
ZERO_GRADIENT = {"CoopNets": ("generator.net.0.bias", "generator.net.3.bias", "generator.net.6.bias")}


@pytest.mark.parametrize("name", COMPILABLE)
def test_every_chain_heavy_family_trains_with_whole_chains_compiled_as_eager(compiler, name):
    """One training step with each whole chain one compiled region (``fullgraph=True``: a graph break is an error)
    gives the eager step's weights: what a CPU proves of the CUDA-graph mode (``compile_chains reduce-overhead``)."""
    from _data import TINY_MODELS
    from test_devices import training_data

    torch._dynamo.reset()  # the graphs of the tests before count towards dynamo's recompile limit

    def step(**kw):
        pl.seed_everything(0, verbose=False)
        tiny_model = TINY_MODELS[name]()
        m = type(tiny_model)(**{**dict(tiny_model.hparams), **kw})
        # after the other tests' shapes dynamo would compile these chains for dynamic shapes (four times slower)
        with torch._dynamo.config.patch(automatic_dynamic_shapes=False):
            tiny_trainer(max_steps=1).fit(m, training_data(name))
        return m

    compiled, eager = step(compile_chains=True, compile_scope="chain"), step()
    assert all(s.compile is True and s.compile_scope == "chain" for s in compiled.samplers.values())
    assert all(s.compile is None for s in eager.samplers.values())
    sd_c, sd_e = compiled.state_dict(), eager.state_dict()
    assert set(sd_c) == set(sd_e)
    for k in sd_e:
        atol = 2.5 * eager.hparams.lr_g if k in ZERO_GRADIENT.get(name, ()) else 1e-5
        torch.testing.assert_close(sd_c[k], sd_e[k], rtol=1e-4, atol=atol, msg=f"{name}: {k}")


def test_whole_chains_past_the_recompile_limit_run_eagerly_with_a_warning(compiler, energy):
    """fullgraph=True makes dynamo's recompile limit an error; the sampler runs such a chain eagerly instead, from
    the same pre-drawn noise: the eager chain's states."""
    torch._dynamo.reset()
    sampler = LangevinSampler(3, 0.3, compile=True, compile_scope="chain")
    with torch._dynamo.config.patch(recompile_limit=1, automatic_dynamic_shapes=False):
        run(sampler, target(energy, torch.zeros(4)), torch.randn(5, 4))  # the one graph allowed
        x0 = torch.randn(7, 4)  # a new shape: a second graph
        with pytest.warns(RuntimeWarning, match="recompile_limit"):
            over = run(sampler, target(energy, torch.zeros(4)), x0)
    eager = run(LangevinSampler(3, 0.3), target(energy, torch.zeros(4)), x0)
    torch.testing.assert_close(over[0], eager[0], rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


@pytest.mark.parametrize("name", COMPILABLE)
def test_every_chain_heavy_family_refuses_a_bad_compile_value(name):
    from _data import TINY_MODELS

    tiny_model = TINY_MODELS[name]()
    with pytest.raises(ValueError, match="compile must be one of"):
        type(tiny_model)(**{**dict(tiny_model.hparams), "compile_chains": "fast"})
