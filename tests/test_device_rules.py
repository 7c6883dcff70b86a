"""What a CPU can catch of the CUDA failures of issue 29 (the rules of ``docs/architecture.md``, Devices).

* cuDNN differentiates an RNN only in training mode, and the Langevin chains differentiate the sequence decoder in
  eval mode: every RNN call made with autograd on runs in training mode (where that is the same function) or with
  cuDNN off. Checked on the CPU through the same code path a GPU takes.
* CUDA's batch-norm backward needs a weight whenever it has a bias: no network of the zoo calls batch norm with a
  bias and no weight.
* Metrics that are state of a model are registered children of it, so ``model.to(device)`` moves them.
"""
import pytest
import torch
import torch.nn.functional as F
import torchmetrics
from _data import TINY_MODELS, tiny_trainer
from test_devices import training_data
from torch import nn
from torch.overrides import TorchFunctionMode

from lebm_zoo.nets import SequenceDecoder
from lebm_zoo.text import pad_batch


def _rnn_calls(module: nn.Module) -> list[tuple[bool, bool, bool]]:
    """Record (grad enabled, module in training mode, cuDNN enabled) of every call of an RNN below ``module``."""
    calls = []

    def hook(m, args):
        calls.append((torch.is_grad_enabled(), m.training, torch.backends.cudnn.enabled))

    for m in module.modules():
        if isinstance(m, nn.RNNBase):
            m.register_forward_pre_hook(hook)
    return calls


def _cudnn_can_differentiate(calls) -> bool:
    return all(training or not cudnn for grad, training, cudnn in calls if grad)


def test_posterior_chains_run_the_lstm_in_a_mode_cudnn_can_differentiate(tmp_path):
    torch.manual_seed(0)
    model = TINY_MODELS["SequenceLatentEBMPrior"]()
    calls = _rnn_calls(model)
    trainer = tiny_trainer(tmp_path, max_steps=2)
    trainer.fit(model, training_data("SequenceLatentEBMPrior"))  # posterior chains in eval mode, inside training
    chain_calls = [c for c in calls if c[0]]
    assert chain_calls, "no LSTM call with autograd on: the chains did not differentiate the decoder"
    assert _cudnn_can_differentiate(calls), calls
    model.eval()
    batch = pad_batch([[1, 4, 5, 2], [1, 6, 2]])
    calls.clear()
    z = model.infer_latent(batch)  # a user's posterior chain, model in eval mode
    assert z.shape == (2, model.hparams.nz) and torch.isfinite(z).all()
    assert calls and _cudnn_can_differentiate(calls), calls
    assert not model.generator.lstm.training  # the decoder's mode is restored


@pytest.mark.parametrize("num_layers,dropout", [(1, 0.0), (2, 0.0), (2, 0.3)])
def test_decoder_gradients_in_eval_mode_are_those_of_the_eval_network(num_layers, dropout):
    torch.manual_seed(0)
    dec = SequenceDecoder(vocab_size=7, nz=3, emb_dim=4, hidden=5, num_layers=num_layers, dropout=dropout).eval()
    calls = _rnn_calls(dec)
    tokens = torch.tensor([[1, 4, 5, 2], [1, 6, 3, 2]])
    mask = torch.ones_like(tokens, dtype=torch.bool)
    z = torch.randn(2, 3, requires_grad=True)
    ll = dec.log_likelihood(tokens, mask, z)
    (grad,) = torch.autograd.grad(ll.sum(), z)
    with torch.no_grad():
        ll_eval = dec.log_likelihood(tokens, mask, z)  # the plain eval-mode network
    # the same function up to the kernels' round-off: no dropout was switched on (it would change it by far more)
    assert torch.allclose(ll.detach(), ll_eval, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert _cudnn_can_differentiate(calls) and not dec.lstm.training
    if dropout > 0 and num_layers > 1:  # training mode would drop out: cuDNN is switched off instead
        assert any(grad and not training and not cudnn for grad, training, cudnn in calls)


def _bias_without_weight_calls():
    """A TorchFunctionMode recording each batch-norm call that passes a bias but no weight."""

    class Mode(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.bad, self.seen = [], 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func in (F.batch_norm, torch.batch_norm, torch.ops.aten.batch_norm.default):
                self.seen += 1
                names = ["input", "running_mean", "running_var", "weight", "bias"]
                given = dict(zip(names, args)) | kwargs
                if given.get("weight") is None and given.get("bias") is not None:
                    self.bad.append(func)
            return func(*args, **kwargs)

    return Mode()


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_no_network_calls_batch_norm_with_a_bias_and_no_weight(name, tmp_path):
    torch.manual_seed(0)
    model = TINY_MODELS[name]()
    mode = _bias_without_weight_calls()
    with mode:
        tiny_trainer(tmp_path, max_steps=1).fit(model, training_data(name))
        model.eval()
        model.sample(4)
    assert not mode.bad, f"{name}: batch norm with a bias but no weight ({len(mode.bad)} calls): CUDA cannot " \
                         "differentiate it"
    if name == "CoopNets":  # the family whose offset-only batch norm failed on CUDA
        assert mode.seen > 0


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_metrics_held_by_a_model_are_registered_children(name):
    model = TINY_MODELS[name]()
    unregistered = [k for k, v in vars(model).items() if isinstance(v, torchmetrics.Metric)]
    assert not unregistered, f"{name}: metrics {unregistered} do not move with model.to(device)"
    metrics = [m for m in model.modules() if isinstance(m, torchmetrics.Metric)]
    model.to("meta")  # what .to("cuda") does to the children, on a device every machine has
    assert all(m.device.type == "meta" for m in metrics)
