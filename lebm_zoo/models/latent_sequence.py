"""The latent EBM prior over token sequences: text (PTB) and SMILES molecules.

Pang, Han, Nijkamp, Zhu, Wu, "Learning Latent Space Energy-Based Prior Model" (NeurIPS 2020), text experiments, and
Pang, Han, Wu, "Learning Latent Space Energy-Based Prior Model for Molecule Generation" (2020)::

    z ~ p_a(z) = exp(-E_a(z)) N(z; 0, I) / Z(a)
    x = (x_1 .. x_n <eos>) ~ p_b(x | z) = prod_t p_b(x_t | x_<t, z)     an LSTM decoder (SequenceDecoder)

Learning is the image model's (:class:`~lebm_zoo.LatentEBMPrior`), with the decoder's log-likelihood in place of the
Gaussian one: posterior Langevin on log p(x, z) = log p(x | z) - E(z) - ||z||^2 / 2 (the gradient flows through the
decoder's token log-likelihood), prior Langevin on log p_a(z), the decoder's loss ``-mean log p(x | z+)`` and the
energy's ``mean E(z+) - mean E(z-)``.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from lebm_zoo.models.base import DataShapeError
from lebm_zoo.models.latent_prior import LatentPriorBase
from lebm_zoo.models.registry import register_family
from lebm_zoo.nets import SequenceDecoder
from lebm_zoo.samplers import as_normal_tensor
from lebm_zoo.text import VocabularyMixin
from lebm_zoo.utils import check_count, check_latents, check_tokens, in_training_loop

__all__ = ["SequenceLatentEBMPrior", "VocabularyMixin", "log_mean_exp"]


def log_mean_exp(a: Tensor, dim: int = 0) -> Tensor:
    """log(mean(exp(a))) along ``dim``, computed stably."""
    return torch.logsumexp(a, dim) - math.log(a.shape[dim])


@register_family(tiny={
    "SequenceLatentEBMPrior": dict(vocab=["<pad>", "<bos>", "<eos>", "<unk>", "a", "b", "c"], nz=2, ndf=8, emb_dim=8,
        hidden=8, prior_steps=2, posterior_steps=2, max_decode_length=5),
})
class SequenceLatentEBMPrior(VocabularyMixin, LatentPriorBase):
    """Latent EBM prior with an LSTM sequence decoder: the LEBM text model (PTB) and molecule model (SMILES).

    Data are token batches ``{"tokens": (B, T) int64, "mask": (B, T) bool}`` (:mod:`datamodules.text`); a list of
    strings (sentences, or SMILES when ``sep=""``) is also accepted by the public methods (see ``encode``). Latents are
    ``(B, nz)``.

    Defaults are our CPU-sized choice, in the range of the public LEBM-style text code (bpucla/sri_text: LSTM 256,
    latent 32, 20-step posterior Langevin, Adam lr 1e-3, gradient clipping 5): nz 32, LSTM 256 with 256-d embeddings,
    E an MLP nz-200-200-1 (GELU), K0 = 60 / s0 = 0.4 and K1 = 20 / s1 = 0.1 (the image recipe's chains), Adam lr 1e-3
    (decoder) and 2e-5 (energy), decoder gradients clipped to norm 5.

    The prior, both chains and the training step are :class:`~lebm_zoo.models.latent_prior.LatentPriorBase`'s, shared
    with the image model :class:`~lebm_zoo.LatentEBMPrior` (of which this class is not a subclass: check
    ``isinstance(m, LatentPriorBase)`` for the shared behaviour); this class adds the decoder and the token data hooks.

    Args:
        vocab: the token list (``Vocabulary.to_list()``); None takes the datamodule's at ``setup``.
        sep: joins tokens into text (``" "`` words, ``""`` SMILES).
        nz, ndf, e_activation, prior, prior_*, posterior_*, prior_sigma, lr_*, betas, lr_decay, grad_clip_*: as
            :class:`~lebm_zoo.LatentEBMPrior`.
        emb_dim, hidden, num_layers, dropout: the decoder (:class:`~lebm_zoo.nets.SequenceDecoder`).
        max_decode_length: most tokens decoded per sample (``<eos>`` included).
        temperature: decoding temperature of :meth:`sample` (0: greedy; 1: the model's distribution).
        capture_step: on a GPU, run each training step's two chains, both losses and the backward as one CUDA graph,
            as :class:`~lebm_zoo.LatentEBMPrior`'s option (same conditions and errors). A graph replays one batch
            shape: pad every batch to one length with the datamodule's ``pad_to`` (``--data.pad_to``), else only the
            batches of the first batch's length replay and the others run eagerly. In the training loop the decoder
            then scores every position and zeroes the padding (``SequenceDecoder.token_log_probs(dense=True)``), as a
            graph needs: the same likelihood to float rounding. Default False.

    Raises:
        ValueError: bad hyperparameters (as :class:`~lebm_zoo.LatentEBMPrior`, and ``max_decode_length < 1``,
            ``temperature < 0``).
    """

    #: layer sizes, each an integer >= 1 (checked when the hyperparameters are saved)
    size_hparams = ("nz", "ndf", "emb_dim", "hidden", "num_layers")
    #: hyperparameters a resumed run may change (the others come from the checkpoint)
    resume_hparams = (
        "prior_steps", "prior_step_size", "posterior_steps", "posterior_step_size", "lr_g", "lr_e", "betas", "lr_decay",
        "grad_clip_g", "grad_clip_e", "temperature", "capture_step")

    def __init__(
        self,
        vocab: list[str] | None = None,
        sep: str = " ",
        nz: int = 32,
        ndf: int = 200,
        e_activation: str = "gelu",
        prior: str = "ebm",
        emb_dim: int = 256,
        hidden: int = 256,
        num_layers: int = 1,
        dropout: float = 0.0,
        prior_steps: int = 60,
        prior_step_size: float = 0.4,
        posterior_steps: int = 20,
        posterior_step_size: float = 0.1,
        prior_sigma: float = 1.0,
        lr_g: float = 1e-3,
        lr_e: float = 2e-5,
        betas: tuple[float, float] = (0.9, 0.999),
        lr_decay: float = 1.0,
        grad_clip_g: float | None = 5.0,
        grad_clip_e: float | None = None,
        max_decode_length: int = 60,
        temperature: float = 1.0,
        capture_step: bool = False,
    ):
        super().__init__()
        self._check_prior_args(prior, prior_sigma)
        self.check_capture_args(capture_step, None)
        if max_decode_length < 1 or temperature < 0:
            raise ValueError(f"max_decode_length must be >= 1 and temperature >= 0, got {max_decode_length}, "
                             f"{temperature}")
        self.save_hyperparameters()
        self._build_prior()
        self.generator: SequenceDecoder | None = None
        self._init_vocab()

    def build_networks(self, vocab_size: int) -> None:
        hp = self.hparams
        self.generator = SequenceDecoder(vocab_size, hp.nz, hp.emb_dim, hp.hidden, hp.num_layers, hp.dropout)

    # ------------------------------------------------------------------------------------------------ data hooks
    def data_from_batch(self, batch) -> dict[str, Tensor]:
        if not (isinstance(batch, dict) and "tokens" in batch and "mask" in batch):
            raise DataShapeError(f"{type(self).__name__} trains on token batches {{'tokens': (B, T), 'mask': (B, T)}} "
                                 f"(datamodules.PTBDataModule, ZINCDataModule); got {type(batch).__name__}")
        if batch["tokens"].ndim != 2 or batch["tokens"].shape != batch["mask"].shape:
            raise DataShapeError(f"tokens and mask must both be (B, T); got {tuple(batch['tokens'].shape)} and "
                                 f"{tuple(batch['mask'].shape)}")
        return batch

    def prepare_data_input(self, x, where: str = "") -> dict[str, Tensor]:
        """Check data given to a public method (named ``where`` in the error) and move it to the model's device.

        Strings are encoded (their tokens are valid by construction). A token batch must be ``{"tokens": (B, T)
        integers in [0, vocabulary size), "mask": (B, T) bool}`` (:func:`~lebm_zoo.utils.check_tokens`; one host
        sync; its values are not checked in the training loop, whose batches :meth:`data_from_batch` has checked).

        Raises:
            DataShapeError: no vocabulary yet, no token batch, or tokens of another shape, dtype or vocabulary.
        """
        at = f"{where}: " if where else ""
        if self.vocab_obj is None:
            raise DataShapeError(f"{at}{type(self).__name__} has no vocabulary yet: build it with vocab=... or train "
                                 "it on a token-sequence datamodule first")
        if isinstance(x, (list, tuple)) and all(isinstance(t, str) for t in x):
            if not x:
                raise DataShapeError(f"{at}got an empty list of strings: give at least one")
            x = self.encode(list(x))
        else:
            x = self.data_from_batch(x)
            if not in_training_loop(self):
                check_tokens(x["tokens"], len(self.vocab_obj), x["mask"], where=where)
        return {k: as_normal_tensor(x[k].to(self.device)) for k in ("tokens", "mask")}

    @staticmethod
    def data_batch_size(x) -> int:
        return x["tokens"].shape[0]

    # ------------------------------------------------------------------------------------------------ densities
    def log_likelihood(self, x: dict[str, Tensor], z: Tensor) -> Tensor:
        """log p(x | z) = sum_t log p(x_t | x_<t, z) over the tokens after ``<bos>`` (``<eos>`` included): ``(B,)``
        nats, exact (a normalised categorical at every step).

        Args:
            x: ``{"tokens": (B, T), "mask": (B, T)}``.
            z: latents ``(B, nz)``.
        """
        dense = bool(self.hparams.get("capture_step")) and in_training_loop(self)  # no mask-shaped tensors then
        return self.generator.log_likelihood(x["tokens"], x["mask"], z, dense=dense)

    def generator_loss(self, x: dict[str, Tensor], z: Tensor) -> Tensor:
        """``-mean_b log p(x_b | z_b)``: the decoder's negative log-likelihood per sequence, nats."""
        return -self.log_likelihood(x, z).mean()

    # ------------------------------------------------------------------------------------------------ training
    def forward_backward(self, x: dict[str, Tensor]) -> dict[str, Tensor]:
        """The training step's region (``_forward_backward``) on a token batch, given to
        :meth:`~lebm_zoo.models.base.EBMModule.run_region` as its two tensors (a graph's inputs are tensors)."""
        return self.run_region("step", self._forward_backward_tokens, x["tokens"], x["mask"])

    def _forward_backward_tokens(self, tokens: Tensor, mask: Tensor, backward) -> dict[str, Tensor]:
        return self._forward_backward({"tokens": tokens, "mask": mask}, backward)

    # ------------------------------------------------------------------------------------------------ sampling
    @torch.no_grad()
    def generate(self, z: Tensor, temperature: float | None = None) -> dict[str, Tensor]:
        """Decode latents ``(B, nz)`` to token batches ``{"tokens": (B, L), "mask": (B, L)}`` (``<bos>`` first).

        Raises:
            DataShapeError: for latents that are not ``(B, nz)`` finite floats.
        """
        z = check_latents(z, self.hparams.nz, where=f"{type(self).__name__}.generate")
        return self._generate(z, temperature)

    def _generate(self, z: Tensor, temperature: float | None = None) -> dict[str, Tensor]:
        """:meth:`generate` of latents the model made (unchecked)."""
        t = self.hparams.temperature if temperature is None else temperature
        tokens, mask = self.generator.generate(z, z.shape[0], self.hparams.max_decode_length, temperature=t)
        return {"tokens": tokens, "mask": mask}

    @torch.no_grad()
    def sample_tokens(self, n: int, temperature: float | None = None, n_steps: int | None = None) -> dict[str, Tensor]:
        """``n`` token sequences: prior Langevin for z (K0 steps), then decoding (see :meth:`generate`).

        Raises:
            ValueError: for ``n`` < 1 or not an integer.
        """
        n = check_count(n, where=f"{type(self).__name__}.sample_tokens")
        return self._generate(self.sample_latent(n, n_steps=n_steps), temperature)

    @torch.no_grad()
    def sample(self, n: int, temperature: float | None = None, n_steps: int | None = None) -> list[str]:
        """Draw ``n`` texts: z by prior Langevin, then decoding at ``temperature`` (default: the hyperparameter;
        0 = greedy). Returns a list of ``n`` strings (tokens joined with ``sep``, without ``<bos>``/``<eos>``).

        Raises:
            ValueError: for ``n`` < 1 or not an integer.
        """
        n = check_count(n, where=f"{type(self).__name__}.sample")
        return self.vocab_obj.decode_batch(self.sample_tokens(n, temperature, n_steps)["tokens"])

    def decode(self, tokens: Tensor) -> list[str]:
        """Strings of a ``(B, T)`` token tensor (stops at ``<eos>``).

        Raises:
            DataShapeError: for tokens that are not ``(B, T)`` integers in [0, vocabulary size).
        """
        if self.vocab_obj is None:
            raise DataShapeError(f"{type(self).__name__} has no vocabulary yet")
        check_tokens(tokens, len(self.vocab_obj), where=f"{type(self).__name__}.decode")
        return self.vocab_obj.decode_batch(tokens)

    @torch.no_grad()
    def reconstruct(self, x, n_steps: int | None = None, temperature: float = 0.0) -> list[str]:
        """Greedy decoding (by default) of z inferred by posterior Langevin: texts in, texts out.

        Raises:
            DataShapeError: for a bad token batch (see :meth:`prepare_data_input`).
        """
        x = self.prepare_data_input(x, f"{type(self).__name__}.reconstruct")
        z = self._infer_latent(x, n_steps=n_steps)
        return self.vocab_obj.decode_batch(self._generate(z, temperature)["tokens"])

    # ------------------------------------------------------------------------------------------------ likelihood
    @torch.no_grad()
    def log_normalizer(self, n_samples: int = 10_000, batch_size: int = 10_000) -> Tensor:
        """Monte Carlo estimate of log Z(a) = log E_{z ~ N(0, sigma_p^2 I)}[exp(-E(z))] (0 for a Gaussian prior).

        Consistent (and biased low by Jensen's inequality, by about Var / 2 of the weights; negligible when
        ``n_samples`` is large against that variance).

        Raises:
            ValueError: for ``n_samples`` or ``batch_size`` < 1 or not an integer.
        """
        where = f"{type(self).__name__}.log_normalizer"
        n_samples = check_count(n_samples, "n_samples", where=where)
        batch_size = check_count(batch_size, "batch_size", where=where)
        if not self.is_ebm:
            return torch.zeros((), device=self.device)
        vals = []
        for i in range(0, n_samples, batch_size):
            z = torch.randn(min(batch_size, n_samples - i), self.hparams.nz, device=self.device)
            z = z * self.hparams.prior_sigma
            vals.append(-self.energy(z))
        return log_mean_exp(torch.cat(vals))

    @torch.no_grad()
    def log_marginal(self, x, n_samples: int = 100, n_chains: int = 4, proposal_std: float = 0.5,
                     log_z: Tensor | None = None) -> Tensor:
        """Importance-sampling estimate of log p(x) = log int p(x | z) p_a(z) dz, ``(B,)`` nats per sequence.

        Estimator (defensive importance sampling, Hesterberg 1995): the proposal is the mixture
        ``q(z) = 1/2 N(0, sigma_p^2 I) + 1/2 (1/C) sum_c N(z; z_c, proposal_std^2 I)`` of the prior's Gaussian reference
        and Gaussians around ``C = n_chains`` posterior Langevin samples z_c of x; with K = ``n_samples`` draws z_k::

            log p(x) ~ logmeanexp_k [log p(x | z_k) - E(z_k) + log N(z_k; 0, sigma_p^2 I) - log q(z_k)] - log Z(a)

        where log Z(a) is :meth:`log_normalizer` (computed once if not given). The reference component bounds the
        weights by ``2 p(x | z) exp(-E(z))``, so the estimate never explodes; it is unbiased in p(x) / Z, and its log is
        biased low (Jensen), less so with more samples.

        Args:
            x: a token batch ``{"tokens", "mask"}`` (or strings).
            n_samples: K proposals per sequence.
            n_chains: C posterior chains per sequence (K1 steps each).
            proposal_std: std of the Gaussians around the chains' samples.
            log_z: a precomputed log Z(a).

        Raises:
            DataShapeError: for a bad token batch (see :meth:`prepare_data_input`). ValueError: for ``n_samples`` or
                ``n_chains`` < 1 or not an integer.
        """
        where = f"{type(self).__name__}.log_marginal"
        n_samples = check_count(n_samples, "n_samples", where=where)
        n_chains = check_count(n_chains, "n_chains", where=where)
        x = self.prepare_data_input(x, where)
        hp = self.hparams
        b, nz, sp = self.data_batch_size(x), hp.nz, hp.prior_sigma
        log_z = self.log_normalizer() if log_z is None else log_z
        rep = {k: as_normal_tensor(v.repeat_interleave(n_chains, 0)) for k, v in x.items()}  # not inference-mode
        centers = self._infer_latent(rep).view(b, n_chains, nz)  # (B, C, nz)
        from_ref = torch.rand(b, n_samples, device=self.device) < 0.5
        comp = torch.randint(n_chains, (b, n_samples), device=self.device)
        around = torch.gather(centers, 1, comp[..., None].expand(b, n_samples, nz)) \
            + proposal_std * torch.randn(b, n_samples, nz, device=self.device)
        z = torch.where(from_ref[..., None], sp * torch.randn(b, n_samples, nz, device=self.device), around)  # (B,K,nz)

        def log_normal(v: Tensor, mean: Tensor, std: float) -> Tensor:
            return (-(v - mean).pow(2).sum(-1) / (2 * std ** 2) - nz * math.log(std * math.sqrt(2 * math.pi)))

        log_ref = log_normal(z, torch.zeros(()), sp)  # (B, K)
        log_mix = torch.logsumexp(log_normal(z[:, :, None], centers[:, None], proposal_std), 2) - math.log(n_chains)
        log_q = torch.logaddexp(log_ref, log_mix) - math.log(2)
        zf = z.reshape(b * n_samples, nz)
        rep = {k: v.repeat_interleave(n_samples, 0) for k, v in x.items()}
        chunk = max(1, int(2e7 // (x["tokens"].shape[1] * len(self.vocab_obj))))  # rows per pass: ~80 MB of logits
        log_lik = torch.cat([self.log_likelihood({k: v[i:i + chunk] for k, v in rep.items()}, zf[i:i + chunk])
                             for i in range(0, b * n_samples, chunk)]).view(b, n_samples)
        log_w = log_lik - self.energy(zf).view(b, n_samples) + log_ref - log_q
        return log_mean_exp(log_w, 1) - log_z

    def predict_step(self, batch, batch_idx: int) -> dict:
        """Posterior latents and greedy reconstructions of a batch: ``{"z": (B, nz), "text": list of B strings}``."""
        z = self.infer_latent(batch)
        return {"z": z, "text": self.decode(self.generate(z, 0.0)["tokens"])}
