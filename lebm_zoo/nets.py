"""Networks shared by the families: plain ``nn.Module`` s, no Lightning.

Architectures follow the reference code: the SVHN generator of bpucla/latent-space-EBM-prior (``train_svhn.py``) and
its latent energy MLP. A network that belongs to one family lives in that family's file (the divergence triangle's in
:mod:`lebm_zoo.models.triangle`, CoopNets' in :mod:`lebm_zoo.models.coopnets`, the short-run EBM's
``ShortRunNegEnergyNet`` in :mod:`lebm_zoo.models.short_run`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lebm_zoo.hardware import native_bf16

__all__ = ["ConvEnergy", "ConvGenerator", "EnergyMLP", "SequenceDecoder", "count_parameters", "down_trunk",
           "normal_init", "xavier_init_convs"]

# (kernel, stride, padding) of each transposed convolution after the first (k4 s1 p0: 1 -> 4 px), per image size
_UPSAMPLING = {
    28: [(3, 2, 1), (4, 2, 1), (4, 2, 1)],  # 4 -> 7 -> 14 -> 28
    32: [(4, 2, 1), (4, 2, 1), (4, 2, 1)],  # 4 -> 8 -> 16 -> 32 (the reference SVHN net)
    64: [(4, 2, 1), (4, 2, 1), (4, 2, 1), (4, 2, 1)],  # 4 -> 8 -> 16 -> 32 -> 64
}


def xavier_init_convs(module: nn.Module) -> None:
    """Xavier-normal weights for every layer whose class name contains "Conv"; biases keep PyTorch's default.

    This is the reference code's ``weights_init_xavier``.
    """
    for m in module.modules():
        if "Conv" in type(m).__name__ and getattr(m, "weight", None) is not None:
            nn.init.xavier_normal_(m.weight)


class _ConvTranspose2dSplitLayout(torch.autograd.Function):
    """``conv_transpose2d`` whose forward runs in channels_last and whose gradients run in ``grad_format``.

    oneDNN's fastest memory layout on CPU is not the same for a layer's forward and for its gradients, while eager
    PyTorch runs both in the layout of the saved tensors. Same function and same gradients as ``F.conv_transpose2d``
    (tested); only the layouts the kernels see differ. Inputs must share one dtype (the caller casts for autocast).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, output_padding, grad_format):
        x = x.contiguous(memory_format=torch.channels_last)
        ctx.save_for_backward(x, weight)
        ctx.conf = (stride, padding, output_padding, grad_format, bias is not None)
        return F.conv_transpose2d(x, weight.contiguous(memory_format=torch.channels_last), bias, stride, padding,
                                  output_padding)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        stride, padding, output_padding, fmt, has_bias = ctx.conf
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gx, gw, gb = torch.ops.aten.convolution_backward(
            grad_out.contiguous(memory_format=fmt), x.contiguous(memory_format=fmt),
            weight.contiguous(memory_format=fmt), [weight.shape[1]] if has_bias else None, list(stride), list(padding),
            [1, 1], True, list(output_padding), 1, [need_x, need_w, has_bias and need_b])
        return gx, gw, gb, None, None, None, None


def _conv_transpose_channels_last_cpu(layer: nn.ConvTranspose2d, h: Tensor) -> Tensor:
    """``layer(h)`` on CPU, forward in channels_last; the input gradient of a layer whose input is at most 4x4 px runs
    in NCHW under bf16 (there oneDNN's blocked kernel beats its channels_last one; docs/speed.md)."""
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else h.dtype
    small_bf16 = dtype == torch.bfloat16 and h.shape[-1] <= 4
    grad_format = torch.contiguous_format if small_bf16 else torch.channels_last
    bias = None if layer.bias is None else layer.bias.to(dtype)
    with torch.autocast("cpu", enabled=False):
        return _ConvTranspose2dSplitLayout.apply(h.to(dtype), layer.weight.to(dtype), bias, layer.stride,
                                                 layer.padding, layer.output_padding, grad_format)


class ConvGenerator(nn.Module):
    """Generator G(z): transposed-convolution stack, LeakyReLU, Tanh output, no normalisation, all layers biased.

    For ``img_size=32, channels=3, nz=100, ngf=64`` it is exactly the SVHN generator of Pang et al. (2020):
    ConvT(100->512, k4 s1 p0) -> ConvT(512->256) -> ConvT(256->128) -> ConvT(128->3), 3,447,683 parameters.
    ``img_size=28`` swaps the first upsampling kernel to k3 (4 -> 7 px); ``img_size=64`` adds one layer and starts
    from ``16 * ngf`` channels (the CelebA-64 net of the LEBM-style reimplementations).

    Args:
        nz: latent size.
        ngf: width; channel counts are ``ngf * (8, 4, 2)`` (``ngf * (16, 8, 4, 2)`` at 64 px).
        img_size: 28, 32 or 64.
        channels: output channels, 1 or 3.
        leak: LeakyReLU slope (the reference uses 0.2).
        channels_last: keep the weights in channels_last memory format; on CPU the transposed convolutions then run
            their forward in channels_last and, under bf16, the input gradient of the 4x4-input layer in NCHW, the
            fastest layouts measured (docs/speed.md). Same function either way.

    Shapes:
        ``z`` ``(B, nz)`` or ``(B, nz, 1, 1)`` -> images ``(B, channels, img_size, img_size)`` in [-1, 1].

    Raises:
        ValueError: for an unsupported ``img_size``.
    """

    def __init__(self, nz: int = 100, ngf: int = 64, img_size: int = 32, channels: int = 3, leak: float = 0.2,
                 channels_last: bool = False):
        super().__init__()
        if img_size not in _UPSAMPLING:
            raise ValueError(f"img_size must be one of {sorted(_UPSAMPLING)}, got {img_size}")
        ups = _UPSAMPLING[img_size]
        widths = [ngf * 2 ** (len(ups) - i) for i in range(len(ups))]  # e.g. [512, 256, 128]
        layers: list[nn.Module] = [nn.ConvTranspose2d(nz, widths[0], 4, 1, 0), nn.LeakyReLU(leak)]
        for (k, s, p), cin, cout in zip(ups, widths, widths[1:] + [channels]):
            layers += [nn.ConvTranspose2d(cin, cout, k, s, p), nn.LeakyReLU(leak)]
        layers[-1] = nn.Tanh()
        self.net = nn.Sequential(*layers)
        self.nz = nz
        self.channels_last = channels_last
        xavier_init_convs(self)
        if channels_last:
            self.to(memory_format=torch.channels_last)

    def forward(self, z: Tensor) -> Tensor:
        # The first layer maps the 1x1 latent to a k x k map: there a ConvTranspose2d is exactly one matrix product,
        # (B, nz) @ (nz, C k k), which oneDNN runs faster as a GEMM than as a convolution (same weights, same
        # function; docs/speed.md). The other layers are the transposed convolutions themselves.
        first = self.net[0]
        k = first.kernel_size[0] * first.kernel_size[1]
        h = F.linear(z.reshape(z.shape[0], -1), first.weight.flatten(1).t(), first.bias.repeat_interleave(k))
        h = h.view(z.shape[0], first.out_channels, *first.kernel_size)
        split_layout = self.channels_last and h.device.type == "cpu"
        for layer in self.net[1:]:
            if split_layout and isinstance(layer, nn.ConvTranspose2d):
                h = _conv_transpose_channels_last_cpu(layer, h)
            else:
                h = layer(h)
        return h


class EnergyMLP(nn.Module):
    """Latent energy E(z): MLP ``nz -> ndf -> ndf -> 1`` with GELU (the reference netE), outputs the energy.

    Lower energy = more likely. Spectral norm is off, as in the reference; PyTorch's default Linear init.

    Args:
        nz: latent size.
        ndf: hidden width (reference: 200).
        activation: ``"gelu"`` (reference default) or ``"lrelu"`` (LeakyReLU 0.2).

    Shapes:
        ``z`` ``(B, nz)`` (or ``(B, nz, 1, 1)``) -> energy ``(B,)``.
    """

    def __init__(self, nz: int = 100, ndf: int = 200, activation: str = "gelu"):
        super().__init__()
        acts = {"gelu": nn.GELU, "lrelu": lambda: nn.LeakyReLU(0.2)}
        if activation not in acts:
            raise ValueError(f"activation must be one of {sorted(acts)}, got {activation!r}")
        act = acts[activation]
        self.net = nn.Sequential(nn.Linear(nz, ndf), act(), nn.Linear(ndf, ndf), act(), nn.Linear(ndf, 1))

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z.flatten(1)).squeeze(-1)


def down_trunk(channels: int, img_size: int, widths: list[int], leak: float = 0.2,
               bias: bool = True) -> tuple[nn.Sequential, int]:
    """The data-space ConvNet trunk of the short-run EBM and the divergence triangle's E and I.

    Conv(channels -> widths[0], k3 s1 p1), then Conv k4 s2 p1 to each further width, LeakyReLU after every conv;
    ``bias=False`` builds the convs without bias (the triangle's). Returns the trunk and its output's spatial size
    (32 px with four widths: 32 -> 16 -> 8 -> 4).
    """
    layers: list[nn.Module] = [nn.Conv2d(channels, widths[0], 3, 1, 1, bias=bias), nn.LeakyReLU(leak)]
    size = img_size
    for cin, cout in zip(widths, widths[1:]):
        layers += [nn.Conv2d(cin, cout, 4, 2, 1, bias=bias), nn.LeakyReLU(leak)]
        size //= 2
    return nn.Sequential(*layers), size


def _check_size(img_size: int) -> None:
    if img_size not in (28, 32, 64):
        raise ValueError(f"img_size must be 28, 32 or 64, got {img_size}")


def normal_init(module: nn.Module, std: float = 0.02) -> None:
    """The divergence triangle's init (``enijkamp/triangle`` ``train_cifar10.py`` lines 122-128): every conv and
    transposed-conv weight N(0, std), BatchNorm weights N(1, std) and biases 0. Conv biases (only the final layers
    have one) keep PyTorch's default init."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, std)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, std)
            nn.init.zeros_(m.bias)


class ConvEnergy(nn.Module):
    """ConvNet energy E(x) on images (lower = more likely): the divergence triangle's E (``enijkamp/triangle``
    ``train_cifar10.py`` lines 161-177), also the image energy of flow contrastive estimation.

    Conv(channels -> nf, k3 s1 p1), Conv k4 s2 p1 to 2nf, 4nf, 4nf (32 -> 16 -> 8 -> 4 px), all without bias and
    each followed by LeakyReLU(0.2), no normalisation, then Conv(4nf -> 1, with bias) whose kernel covers the
    remaining map (k4 at 32 px). Init: see :func:`normal_init`. Extensions: at 28 px the maps are 28 -> 14 -> 7 -> 3
    and the last kernel is 3; at 64 px one more Conv k4 s2 p1 (4nf -> 4nf).

    Shapes: ``x`` ``(B, channels, img_size, img_size)`` -> ``(B,)``.
    """

    def __init__(self, channels: int = 3, img_size: int = 32, nf: int = 64):
        super().__init__()
        _check_size(img_size)
        widths = [nf, 2 * nf, 4 * nf, 4 * nf] + ([4 * nf] if img_size == 64 else [])
        trunk, size = down_trunk(channels, img_size, widths, bias=False)
        self.net = nn.Sequential(*trunk, nn.Conv2d(widths[-1], 1, size, 1, 0))
        normal_init(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).flatten()


class SequenceDecoder(nn.Module):
    """Autoregressive LSTM decoder p(x | z) = prod_t p(x_t | x_<t, z) over token indices (words, SMILES tokens).

    z enters twice (as in the LEBM text and molecule models): a linear map of z gives every layer's initial (h, c)
    (through tanh), and z is concatenated to the token embedding at every step. With ``nz=0`` it is a plain LSTM
    language model p(x) (no latent), which :class:`~lebm_zoo.models.LSTMLanguageModel` uses.

    Args:
        vocab_size: number of tokens V (index 0 is ``<pad>``).
        nz: latent size (0: no latent).
        emb_dim: token embedding size.
        hidden: LSTM hidden size.
        num_layers: stacked LSTM layers.
        dropout: dropout on embeddings and LSTM outputs (training mode only).

    Token rows are ``<bos> x_1 .. x_n <eos> <pad> ..`` with a mask True on ``<bos>`` .. ``<eos>`` (the layout of
    :mod:`datamodules.text`); the likelihood scores ``x_1 .. <eos>`` given the tokens before each.
    """

    def __init__(self, vocab_size: int, nz: int = 32, emb_dim: int = 256, hidden: int = 256, num_layers: int = 1,
                 dropout: float = 0.0):
        super().__init__()
        if vocab_size < 5:
            raise ValueError(f"vocab_size must hold the 4 special tokens and at least one more, got {vocab_size}")
        self.nz, self.hidden, self.num_layers = nz, hidden, num_layers
        self.embedding = nn.Embedding(vocab_size, emb_dim, padding_idx=0)
        self.init_state = nn.Linear(nz, 2 * num_layers * hidden) if nz > 0 else None
        self.lstm = nn.LSTM(emb_dim + nz, hidden, num_layers, batch_first=True,
                            dropout=dropout if num_layers > 1 else 0.0)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, vocab_size)

    def initial_state(self, z: Tensor | None, batch: int) -> tuple[Tensor, Tensor] | None:
        """(h0, c0), each ``(num_layers, B, hidden)``, from z ``(B, nz)``; None (zeros) without a latent."""
        if self.init_state is None:
            return None
        h, c = torch.tanh(self.init_state(z)).view(batch, 2, self.num_layers, self.hidden).permute(1, 2, 0, 3)
        return h.contiguous(), c.contiguous()

    def hidden_states(self, tokens: Tensor, z: Tensor | None = None, state=None) -> tuple[Tensor, tuple]:
        """LSTM outputs ``(B, T, hidden)`` (after dropout) of input tokens ``(B, T)`` and the final state.

        Under bf16 autocast on CUDA the LSTM runs in fp32 (its outputs are fp32): autocast would run cuDNN's LSTM in
        fp16, which bf16-mixed does not scale its loss for.
        """
        b, t = tokens.shape
        emb = self.drop(self.embedding(tokens))  # (B, T, E)
        if self.nz > 0:
            emb = torch.cat([emb, z.to(emb.dtype)[:, None, :].expand(b, t, self.nz)], dim=2)  # (B, T, E + nz)
            state = self.initial_state(z, b) if state is None else state
        if emb.device.type == "cpu" and torch.is_autocast_enabled("cpu") and not native_bf16():
            # oneDNN has no bf16 LSTM where the CPU lacks bf16 units and fails to build one; ATen's LSTM runs it
            with torch.backends.mkldnn.flags(enabled=False):
                out, state = self._lstm(emb, state)
        elif emb.device.type == "cuda" and torch.is_autocast_enabled("cuda") \
                and torch.get_autocast_dtype("cuda") == torch.bfloat16:
            # autocast runs cuDNN's RNNs in fp16 whatever its dtype (PyTorch's rule for _cudnn_rnn), and bf16-mixed
            # scales no loss: under bf16-mixed the LSTM runs in fp32 instead
            with torch.autocast("cuda", enabled=False):
                out, state = self._lstm(emb.float(), None if state is None else tuple(s.float() for s in state))
        else:
            out, state = self._lstm(emb, state)
        return self.drop(out), state

    def _lstm(self, emb: Tensor, state):
        """The LSTM, differentiable in eval mode too.

        cuDNN can only differentiate an RNN run in training mode, and the Langevin chains differentiate the decoder
        in eval mode (with respect to z). So when autograd is on in eval mode, the LSTM runs in training mode if
        that changes nothing (no dropout between its layers: it is then the same function), else without cuDNN.
        On every device, so that CPU tests see the path a GPU takes.
        """
        if self.lstm.training or not torch.is_grad_enabled():
            return self.lstm(emb, state)
        if self.lstm.dropout == 0:
            self.lstm.train()
            try:
                return self.lstm(emb, state)
            finally:
                self.lstm.eval()
        with torch.backends.cudnn.flags(enabled=False):
            return self.lstm(emb, state)

    def forward(self, tokens: Tensor, z: Tensor | None = None, state=None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Next-token logits.

        Args:
            tokens: input indices ``(B, T)``.
            z: latents ``(B, nz)`` (None when ``nz=0``).
            state: LSTM state to continue from (default: :meth:`initial_state` of z).

        Returns:
            logits ``(B, T, V)`` (position t predicts token t+1) and the final LSTM state.
        """
        out, state = self.hidden_states(tokens, z, state)
        return self.out(out), state

    def token_log_probs(self, tokens: Tensor, mask: Tensor, z: Tensor | None = None, dense: bool = False) -> Tensor:
        """log p(x_t | x_<t, z) of every target token, ``(B, T-1)`` float32, 0 at padding (positions 1..T-1).

        The output layer and softmax (most of the cost for a large vocabulary) run on the real tokens only; with
        ``dense`` they run on every position and the padding is zeroed afterwards: the same values to float rounding,
        more arithmetic, but no operation whose output shape depends on the mask (what a CUDA graph can hold).
        """
        out, _ = self.hidden_states(tokens[:, :-1], z)  # (B, T-1, H)
        sel = mask[:, 1:]  # (B, T-1) bool: targets x_1 .. <eos>
        if dense:
            logp = torch.gather(F.log_softmax(self.out(out).float(), dim=-1), 2, tokens[:, 1:, None]).squeeze(2)
            return torch.where(sel, logp, torch.zeros((), dtype=logp.dtype, device=logp.device))  # (B, T-1)
        logits = self.out(out[sel]).float()  # (N, V), N = number of target tokens
        logp = torch.gather(F.log_softmax(logits, dim=-1), 1, tokens[:, 1:][sel][:, None]).squeeze(1)  # (N,)
        return torch.zeros(sel.shape, dtype=logp.dtype, device=logp.device).masked_scatter(sel, logp)

    def log_likelihood(self, tokens: Tensor, mask: Tensor, z: Tensor | None = None, dense: bool = False) -> Tensor:
        """log p(x | z) of each sequence, ``(B,)`` in nats: the sum over ``x_1 .. <eos>`` (``<bos>`` is given);
        ``dense`` as :meth:`token_log_probs`."""
        return self.token_log_probs(tokens, mask, z, dense).sum(1)

    @torch.no_grad()
    def generate(self, z: Tensor | None, n: int, max_length: int, bos: int = 1, eos: int = 2,
                 temperature: float = 1.0) -> tuple[Tensor, Tensor]:
        """Decode ``n`` sequences token by token.

        Args:
            z: latents ``(n, nz)`` (None when ``nz=0``).
            n: number of sequences.
            max_length: most tokens generated per sequence (``<eos>`` included); a row without ``<eos>`` by then is cut.
            bos, eos: the begin and end token indices.
            temperature: 0 decodes greedily (argmax); > 0 samples from softmax(logits / temperature); 1 is the model.

        Returns:
            ``{"tokens", "mask"}``-style pair: tokens ``(n, L)`` int64 starting with ``<bos>`` (L <= max_length + 1,
            padded with 0 after ``<eos>``) and mask ``(n, L)`` bool.
        """
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        device = self.out.weight.device
        tok = torch.full((n, 1), bos, dtype=torch.long, device=device)
        rows, state = [tok], None
        if self.nz > 0:
            state = self.initial_state(z, n)
        done = torch.zeros(n, dtype=torch.bool, device=device)
        alive = [torch.ones(n, dtype=torch.bool, device=device)]
        for _ in range(max_length):
            logits, state = self(tok, z, state)
            logits = logits[:, -1].float()
            logits[:, 0] = -math.inf  # never <pad>
            logits[:, bos] = -math.inf  # never <bos>
            if temperature == 0:
                tok = logits.argmax(-1, keepdim=True)
            else:
                tok = torch.multinomial(F.softmax(logits / temperature, dim=-1), 1)
            alive.append(~done)
            rows.append(torch.where(done[:, None], torch.zeros_like(tok), tok))
            done = done | (tok.squeeze(1) == eos)
            if bool(done.all()):
                break
        return torch.cat(rows, 1), torch.stack(alive, 1)


def count_parameters(module: nn.Module) -> int:
    """Number of parameters of ``module``."""
    return sum(p.numel() for p in module.parameters())
