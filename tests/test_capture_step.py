"""A training step as one CUDA graph (``capture_step=True`` on ``LatentEBMPrior``, ``JointHierarchicalEBMPrior``,
``ShortRunEBM``, ``CoopNets``, ``DiffusionRecoveryEBM``, ``SymbolVectorLEBM`` and ``SequenceLatentEBMPrior``;
:class:`lebm_zoo.capture.CapturedStep`, :meth:`EBMModule.run_region`).

On a CPU: the option's checks, the captured regions' arithmetic (the same step as the eager one), no host reads and
no data-dependent shapes in the regions, and the wrapper's bookkeeping that does not need a GPU. On a GPU (marker
``cuda``, run by ``benchmarks/gpu_check.sh``): the replayed graphs train as the eager step with the same seed, through
the warm-up, the capture, the replays and an epoch's smaller last batch, in fp32 and bf16-mixed.
"""
from __future__ import annotations

import copy
import pickle

import pytest
import pytorch_lightning as pl
import torch
from _data import TINY_MODELS, tensor_loader, tiny_trainer, uniform_images
from test_compiled_chain import ZERO_GRADIENT  # parameters whose true gradient is zero: rounding decides Adam's sign
from test_devices import training_data
from torch.utils._python_dispatch import TorchDispatchMode

from lebm_zoo import LatentEBMPrior
from lebm_zoo.capture import CapturedStep
from lebm_zoo.models.base import EBMModule


def tiny(**kw):
    return LatentEBMPrior(img_size=28, channels=1, nz=4, ngf=4, ndf=8, prior_steps=3, posterior_steps=2, **kw)


def fit(device="cpu", precision="32-true", n=22, epochs=2, **kw):
    """22 images in batches of 4: five full batches and one of 2 per epoch."""
    pl.seed_everything(0, verbose=False)
    m = tiny(**kw)
    t = tiny_trainer(accelerator=device, max_epochs=epochs, precision=precision)
    t.fit(m, tensor_loader(uniform_images(n, 1, 28, seed=1), 4))
    return m, t


def assert_same_training(a, b, ta, tb, rtol, atol):
    assert ta.global_step == tb.global_step == 12
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(va, vb, rtol=rtol, atol=atol, msg=k)
    assert set(ta.callback_metrics) == set(tb.callback_metrics) and "train/energy_gap" in ta.callback_metrics
    for k, v in ta.callback_metrics.items():
        torch.testing.assert_close(v, tb.callback_metrics[k], rtol=rtol, atol=atol, msg=k)


def test_capture_step_on_a_cpu_warns_and_trains_as_the_eager_step():
    with pytest.warns(UserWarning, match="capture_step needs a CUDA device; on cpu the training step runs eagerly"):
        captured, tc = fit(capture_step=True)
    eager, te = fit()
    assert captured.hparams.capture_step is True and eager.hparams.capture_step is False
    graph = captured._step_graphs["step"]
    assert isinstance(graph, CapturedStep) and not graph.captured and graph.calls == 0  # CPU inputs: fn itself
    assert eager._step_graphs == {}
    assert_same_training(captured, eager, tc, te, rtol=0, atol=0)


#: the families with the capture_step option (each as a name of tests/_data.py:TINY_MODELS and the settings to test)
CAPTURABLE = {"LatentEBMPrior": {}, "JointHierarchicalEBMPrior": {}, "ShortRunEBM": {}, "CoopNets": {},
              "DiffusionRecoveryEBM": {}, "SymbolVectorLEBM": {}, "SymbolVectorLEBM-joint": {"update_order": "joint"},
              "SequenceLatentEBMPrior": {}, "SequenceLatentEBMPrior-dropout": {"num_layers": 2, "dropout": 0.1}}
#: settings whose CUDA runs cannot be compared weight for weight: cuDNN's LSTM dropout state is one per device, and the
#: eager run would go on from where the captured run left it
NOT_ON_CUDA = {"SequenceLatentEBMPrior-dropout"}
#: families whose captured region computes otherwise than the eager one (the sequence decoder scores every position
#: and zeroes the padding): the same weights to float rounding, not bit for bit
DENSE = {"SequenceLatentEBMPrior", "SequenceLatentEBMPrior-dropout"}
#: the regions of each (run_region's names, in the order of a step)
REGIONS = {"SymbolVectorLEBM": ["classify", "unlabelled"], "SymbolVectorLEBM-joint": ["joint"]}
HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")
#: ATen operations a CUDA graph cannot hold: a read of a value on the host (what item, bool, float and int dispatch)
#: and the operations whose output shape depends on the data
DATA_DEPENDENT = {"aten::_local_scalar_dense", "aten::nonzero", "aten::nonzero_static", "aten::_unique",
                  "aten::_unique2", "aten::unique_dim", "aten::unique_consecutive", "aten::masked_select"}


class DataDependentOps(TorchDispatchMode):
    """Records the dispatched operations of :data:`DATA_DEPENDENT`, and indexing by a boolean mask (it runs
    ``nonzero`` inside its kernel, below this mode)."""

    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        masks = name == "aten::index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                              for i in (args[1] if len(args) > 1 else ()) if i is not None)
        if name in DATA_DEPENDENT or masks:
            self.found.append(name)
        return func(*args, **(kwargs or {}))


def tiny_family(name, **kw):
    base = TINY_MODELS[name.split("-")[0]]()
    return type(base)(**{**dict(base.hparams), **CAPTURABLE.get(name, {}), **kw})


def capturable_data(name):
    """The family's training batches; symbol-vector coupling's hold a labelled part, ``(x_u, x_l, y_l)``."""
    if name.startswith("SymbolVectorLEBM"):
        g = torch.Generator().manual_seed(0)
        x = torch.rand(32, 1, 28, 28, generator=g) * 2 - 1
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:16], x[16:], torch.arange(16) % 3),
                                           batch_size=8)
    return training_data(name.split("-")[0])


@pytest.mark.parametrize("name", CAPTURABLE)
def test_every_capturable_family_trains_as_eager_and_its_regions_read_nothing_on_the_host(name, monkeypatch):
    """Two training steps with capture_step (on a CPU: the regions run eagerly, with ``Tensor.backward``) give the
    eager steps' weights; each region, run as the training loop runs it, makes no host read and no operation whose
    output shape depends on the data (what a graph cannot hold: the capture would read a placeholder once)."""
    def run(**kw):
        pl.seed_everything(0, verbose=False)
        m = tiny_family(name, **kw)
        reads, calls = [], []
        run_region = m.run_region

        def spied(region_name, region, *xs):
            def watched(*a, backward):
                calls.append((region_name, backward))
                ops = DataDependentOps()
                with monkeypatch.context() as mp, ops:
                    for method in HOST_READS:
                        original = getattr(torch.Tensor, method)

                        def spy(self, *args, _name=method, _original=original, **k):
                            reads.append(_name)
                            return _original(self, *args, **k)

                        mp.setattr(torch.Tensor, method, spy)
                    out = region(*a, backward=backward)
                reads.extend(ops.found)
                return out

            return run_region(region_name, watched, *xs)

        m.run_region = spied
        tiny_trainer(max_steps=2).fit(m, capturable_data(name))
        return m, reads, calls

    with pytest.warns(UserWarning, match="capture_step needs a CUDA device"):
        captured, reads, calls = run(capture_step=True)
    eager, _, eager_calls = run()
    regions = REGIONS.get(name, ["step"])
    assert reads == [] and calls == [(r, torch.Tensor.backward) for r in regions] * 2
    assert [r for r, _ in eager_calls] == regions * 2 and eager_calls[0][1] == eager.manual_backward
    assert sorted(captured._step_graphs) == sorted(regions) and eager._step_graphs == {}
    assert captured.hparams.capture_step is True and "capture_step" in type(captured).resume_hparams
    for (k, a), b in zip(captured.state_dict().items(), eager.state_dict().values()):
        if name in DENSE:  # output-layer gradients summed in another order
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=f"{name}: {k}")
        else:
            assert torch.equal(a, b), f"{name}: {k}"
    if "compile_chains" in captured.hparams:
        with pytest.raises(ValueError, match="it cannot hold compiled chains"):
            tiny_family(name, capture_step=True, compile_chains=True)


def test_short_run_capture_step_refuses_the_persistent_buffer():
    with pytest.raises(ValueError, match="capture_step cannot hold init='persistent'"):
        tiny_family("ShortRunEBM", capture_step=True, init="persistent")
    assert tiny_family("ShortRunEBM", capture_step=True, init="data").hparams.init == "data"
    # why: the buffer's write has a data-dependent shape, which the detector of the test above sees
    m = tiny_family("ShortRunEBM", init="persistent")
    tiny_trainer(max_steps=1).fit(m, training_data("ShortRunEBM"))
    with DataDependentOps() as ops:
        m._forward_backward(next(iter(training_data("ShortRunEBM")))[0], torch.Tensor.backward)
    assert "aten::_unique2" in ops.found


def test_the_data_dependent_op_detector_sees_host_reads_and_masks():
    x = torch.arange(4.0)
    with DataDependentOps() as ops:
        x.sum().item()
        bool(x[0] > 1)
        x[x > 1]
        x.nonzero()
    assert ops.found == ["aten::_local_scalar_dense", "aten::_local_scalar_dense", "aten::index", "aten::nonzero"]


def test_capture_step_arguments_are_checked():
    with pytest.raises(ValueError, match="capture_step must be True or False"):
        tiny(capture_step="yes")
    # a compiled chain would compile again inside the capture (the autocast cache is off there), where dynamo cannot
    for mode in (True, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"):
        with pytest.raises(ValueError, match=r"it cannot hold compiled chains \(compile_chains="):
            tiny(capture_step=True, compile_chains=mode)
    assert tiny(capture_step=True, compile_chains=False).hparams.capture_step is True
    assert "capture_step" in LatentEBMPrior.resume_hparams  # a resumed run may switch it
    with pytest.raises(ValueError, match=r"this run has 2 processes: turn it off \(the families that have"):
        EBMModule._check_capture_step(2, torch.device("cuda"))
    with pytest.raises(ValueError, match="does not scale the loss as precision 16-mixed needs"):
        EBMModule._check_capture_step(1, torch.device("cuda"), "16-mixed")
    EBMModule._check_capture_step(1, torch.device("cuda"), "bf16-mixed")  # fine: no warning, no error
    with pytest.warns(UserWarning, match="on cpu the training step runs eagerly"):
        LatentEBMPrior._check_capture_step(1, torch.device("cpu"))


CALLS = []


def total(x):
    CALLS.append(x)
    return {"s": x.sum()}


def test_captured_step_wrapper_on_cpu_inputs_and_copies():
    CALLS.clear()
    fn, calls = total, CALLS
    with pytest.raises(ValueError, match="warmup must be >= 1"):
        CapturedStep(fn, [], warmup=0)
    step = CapturedStep(fn, [], warmup=2)
    x = torch.ones(3)
    assert step(x)["s"] == 3 and calls == [x] and step.calls == 0 and not step.captured
    # a copy (deepcopy, pickle: a module copied with its step) starts without a graph
    step.calls, step._warm, step.replays, step._names = 5, {"k": 2}, 4, ["s"]
    for clone in (copy.deepcopy(step), pickle.loads(pickle.dumps(step))):
        assert clone.graph is None and clone.calls == clone.replays == 0 and clone._warm == {} and clone._xs == []
        assert clone.warmup == 2
    step.reset()
    assert step.calls == 0 and step._warm == {} and step._key is None


def test_captured_step_captures_the_first_kind_of_input_warmed_up_and_runs_the_others_eagerly():
    """What each CUDA call does, by its inputs' kind (shapes, dtypes, autocast): warm-up calls are counted per kind,
    the first kind with ``warmup`` of them is captured at its next call and replayed from then on, and other kinds run
    eagerly. A run resumed at an epoch's smaller last batch (kind "last") still captures the regular batches' step."""
    step = CapturedStep(total, [], warmup=3)
    routes = [step._route(k) for k in ["last", "full", "full", "full", "full", "full", "last", "full"]]
    assert routes == ["warm", "warm", "warm", "warm", "capture", "replay", "eager", "replay"]
    assert step._key == "full"
    # epochs with a last batch of their own from the start: the full batches reach 3 warm-up calls first
    step.reset()
    routes = [step._route(k) for k in ["full", "last"] * 4 + ["full"]]
    assert routes == ["warm"] * 6 + ["capture", "eager", "replay"]
    # whichever kind has its warm-up calls first is the one captured
    step.reset()
    assert [step._route(k) for k in ["a", "b", "b", "a", "b", "b", "a"]] == ["warm"] * 5 + ["capture", "eager"]
    assert step._key == "b"


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_the_captured_step_trains_as_the_eager_step_on_cuda(precision):
    """3 warm-up steps, the capture, replays, and each epoch's batch of 2 eagerly: the eager run's weights and logs
    (the same seed: a replay draws its noise from torch's CUDA generator where the eager step would)."""
    captured, tc = fit("cuda", precision, capture_step=True)
    eager, te = fit("cuda", precision)
    graph = captured._step_graphs["step"]
    # epoch 1: calls 1-3 warm up, 4 captures and replays, 5 replays, 6 (2 images) is eager; epoch 2: 5 replays
    assert graph.captured and graph.calls == 12 and graph.replays == 7
    tol = dict(rtol=1e-4, atol=1e-5) if precision == "32-true" else dict(rtol=2e-2, atol=2e-3)
    # the same weights also say that each replay after an eager step (an epoch's batch of 2) put .grad back on the
    # graph's gradient buffers: Adam would otherwise have stepped with the eager step's gradients again
    assert_same_training(captured, eager, tc, te, **tol)
    captured.cuda().eval()  # (fit's teardown moved it to the CPU)
    x = captured.sample(3)
    assert x.shape == (3, 1, 28, 28) and x.is_cuda and torch.isfinite(x).all()


def test_the_benchmark_row_of_the_captured_step_runs(monkeypatch):
    """``benchmarks/run.py``'s ``fp32_step_captured`` row on a CPU, at batch 2: the model it builds has the option,
    and it times its iterations after at least 5 warm-up ones (3 eager, the capture, one replay)."""
    import sys
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    monkeypatch.delitem(sys.modules, "run", raising=False)
    import run

    built, timed = [], []
    real_model, real_timer = run.LatentEBMPrior, run._Timer
    small = dict(ngf=4, ndf=8, prior_steps=2, posterior_steps=2)  # the SVHN recipe's shapes, small networks
    monkeypatch.setattr(run, "LatentEBMPrior", lambda **kw: built.append(real_model(**kw, **small)) or built[-1])
    monkeypatch.setattr(run, "_Timer", lambda warmup, iters, span: timed.append((warmup, iters)) or real_timer(
        warmup, iters, span))
    with pytest.warns(UserWarning, match="capture_step needs a CUDA device"):
        s = run.ours(2, 1, 0, "32-true", "cpu", compile_chains="capture", sync_every=50)
    assert s > 0 and built[0].hparams.capture_step is True and built[0].hparams.compile_chains is None
    assert timed == [(5, 1)]


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("name", [n for n in CAPTURABLE if n != "LatentEBMPrior" and n not in NOT_ON_CUDA])
def test_every_capturable_family_replays_its_step_as_eager_on_cuda(name):
    """8 steps (2 a epoch): 3 warm-up, the capture and 5 replays of each region give the eager run's weights."""
    def run(**kw):
        pl.seed_everything(0, verbose=False)
        m = tiny_family(name, **kw)
        tiny_trainer(accelerator="cuda", max_epochs=4).fit(m, capturable_data(name))
        return m

    captured, eager = run(capture_step=True), run()
    for region in REGIONS.get(name, ["step"]):
        graph = captured._step_graphs[region]
        assert graph.captured and graph.calls == 8 and graph.replays == 5, region
    for (k, a), b in zip(captured.state_dict().items(), eager.state_dict().values()):
        # a parameter whose true gradient is zero moves by about +-lr a step, its sign set by rounding, which cuDNN's
        # non-deterministic kernels may change between two GPU runs: 8 steps, at most 16 lr apart
        atol = 2 * 8 * eager.hparams.lr_g if k in ZERO_GRADIENT.get(name, ()) else 1e-5
        torch.testing.assert_close(a, b, rtol=1e-4, atol=atol, msg=f"{name}: {k}")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("name", sorted(NOT_ON_CUDA))
def test_the_settings_not_compared_on_cuda_still_capture_and_train_there(name):
    """The settings of :data:`NOT_ON_CUDA` (cuDNN's LSTM dropout, whose state the graph replays) cannot be compared
    weight for weight with an eager run; here they capture, replay and train to finite weights that moved."""
    pl.seed_everything(0, verbose=False)
    m = tiny_family(name, capture_step=True)
    before = [p.detach().clone() for p in m.parameters()]
    tiny_trainer(accelerator="cuda", max_epochs=4).fit(m, capturable_data(name))
    graph = m._step_graphs["step"]
    assert graph.captured and graph.replays >= 1
    after = list(m.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a.detach().cpu(), b) for a, b in zip(after, before))


def test_the_sequence_decoders_dense_scores_equal_the_masked_ones_without_data_dependent_shapes():
    """``SequenceDecoder.token_log_probs(dense=True)`` (what ``capture_step`` uses in the training loop) gives the
    masked path's values and gradients to float rounding, with no operation whose shape depends on the mask (the
    masked path indexes by the mask: a CUDA graph cannot hold it); trailing padding changes neither."""
    from lebm_zoo.nets import SequenceDecoder
    from lebm_zoo.text import pad_batch

    torch.manual_seed(0)
    dec = SequenceDecoder(12, nz=3, emb_dim=5, hidden=6)
    rows = [[1, *torch.randint(4, 12, (n,)).tolist(), 2] for n in (1, 4, 2, 6)]
    results = {}
    for dense in (False, True):
        for length in (None, 12):
            x = pad_batch(rows, 0, length)
            z = torch.randn(4, 3, generator=torch.Generator().manual_seed(1), requires_grad=True)
            with DataDependentOps() as ops:
                lp = dec.token_log_probs(x["tokens"], x["mask"], z, dense=dense)
                grads = torch.autograd.grad(lp.sum(), [z, *dec.parameters()])  # z, and every decoder weight
            assert (lp[~x["mask"][:, 1:]] == 0).all() and (lp[x["mask"][:, 1:]] < 0).all()
            assert ("aten::index" in ops.found) is not dense, ops.found
            assert all(torch.isfinite(g).all() for g in grads) and grads[0].abs().sum() > 0
            results[dense, length] = (lp[:, :7], *grads,
                                      dec.log_likelihood(x["tokens"], x["mask"], z, dense=dense))
    ref = results[False, None]
    assert ref[0].shape == (4, 7) and len(ref) == 2 + len(list(dec.parameters())) + 1
    for key, got in results.items():
        for i, (a, b) in enumerate(zip(got, ref)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"{key}, item {i}")


def padded_token_fit(length, device="cpu", precision="32-true", **kw):
    """The tiny sequence model trained 4 steps (2 epochs of 2 batches) on token rows padded to ``length`` (None: each
    batch to its longest row)."""
    import functools

    from lebm_zoo.text import pad_batch

    pl.seed_everything(0, verbose=False)
    m = tiny_family("SequenceLatentEBMPrior", **kw)
    loader = torch.utils.data.DataLoader(training_data("SequenceLatentEBMPrior").dataset, batch_size=8,
                                         collate_fn=functools.partial(pad_batch, pad_index=0, length=length))
    shapes = [tuple(b["tokens"].shape) for b in loader]
    tiny_trainer(accelerator=device, precision=precision, max_steps=4, max_epochs=2).fit(m, loader)
    return m, shapes


def test_sequence_dense_step_on_padded_batches_equals_the_masked_step_on_unpadded_ones():
    """On a CPU (the region runs eagerly): the step ``capture_step`` runs, dense on batches padded to one length
    (``pad_to``: what lets one graph replay every batch), trains to the weights of the eager masked step on the unpadded
    batches (trailing padding and dense scoring change nothing but rounding)."""
    with pytest.warns(UserWarning, match="capture_step needs a CUDA device"):
        captured, padded = padded_token_fit(9, capture_step=True)
    eager, unpadded = padded_token_fit(None)
    assert padded == [(8, 9)] * 2 and unpadded == [(8, 5)] * 2
    for (k, a), b in zip(captured.state_dict().items(), eager.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_the_sequence_models_graph_replays_padded_batches_as_the_eager_step_on_cuda(precision):
    """Batches padded to one length: 3 warm-up steps, the capture and one replay give the eager run's weights on the
    unpadded batches (fp32 and bf16-mixed)."""
    captured, _ = padded_token_fit(9, "cuda", precision, capture_step=True)
    eager, _ = padded_token_fit(None, "cuda", precision)
    graph = captured._step_graphs["step"]
    assert graph.captured and graph.calls == 4 and graph.replays == 1
    tol = dict(rtol=1e-4, atol=1e-5) if precision == "32-true" else dict(rtol=2e-2, atol=2e-3)
    for (k, a), b in zip(captured.state_dict().items(), eager.state_dict().values()):
        torch.testing.assert_close(a, b, **tol, msg=k)
