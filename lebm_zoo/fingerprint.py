"""A model's fingerprint: summary numbers of its weights and of what it samples at a fixed seed, to tell a changed
weight file (or a changed sampler) from the published one (``tests/fixtures/pretrained_fingerprints.json``, written
by ``benchmarks/publish_pretrained.py``)."""
from __future__ import annotations

import torch

from lebm_zoo.text import VocabularyMixin

__all__ = ["EXACT_FINGERPRINT_KEYS", "fingerprint"]


def _stats(prefix: str, t) -> dict[str, float]:
    if isinstance(t, (list, tuple)):  # the hierarchical model's latents: one tensor per layer
        t = torch.cat([v.flatten(1) for v in t], 1)
    t = t.detach().double()
    return {f"{prefix}_mean": float(t.mean()), f"{prefix}_std": float(t.std()),
            f"{prefix}_abs_mean": float(t.abs().mean())}


@torch.no_grad()
def _fixed_texts(model, n: int) -> dict[str, torch.Tensor]:
    """``n`` token sequences made of the vocabulary's own tokens (the same for every run of one vocabulary)."""
    itos = model.vocab_obj.itos[4:] or ["x"]
    sep = model.hparams.get("sep", " ")
    texts = [sep.join(itos[(i * 7 + j) % len(itos)] for j in range(3 + i % 5)) for i in range(n)]
    return model.encode(texts)


#: fingerprint entries computed from the weights alone (deterministic: compare them tightly); the others come from
#: sampling chains, whose float rounding differs between CPUs' vector units and can grow along a chain (loosely)
EXACT_FINGERPRINT_KEYS = ("weights_projection", "weights_sq_norm")


@torch.no_grad()
def _weights_fingerprint(model, seed: int) -> dict[str, float]:
    """A fixed random projection and the squared norm of every floating tensor of the state dict, in float64."""
    g = torch.Generator().manual_seed(seed)
    proj, sq = 0.0, 0.0
    for _, v in sorted(model.state_dict().items()):
        if not (isinstance(v, torch.Tensor) and v.is_floating_point()):
            continue
        v = v.detach().to("cpu", torch.float64)
        proj += float((v * torch.randn(v.shape, generator=g, dtype=torch.float64)).sum())
        sq += float(v.pow(2).sum())
    return {"weights_projection": proj, "weights_sq_norm": sq}


def fingerprint(model, seed: int = 0, n: int = 16) -> dict[str, float]:
    """Summary numbers of a model's weights and of what it samples at a fixed seed, to tell a changed weight file
    (or a changed sampler) from the published one: ``{name: float}``.

    * ``weights_projection``, ``weights_sq_norm`` (:data:`EXACT_FINGERPRINT_KEYS`): a fixed random projection and
      the squared norm of all floating weights, in float64: the same on every machine to about 1e-9 relative;
    * image and 2-D models: mean, standard deviation and mean absolute value of ``model.sample(n)`` (and of
      ``model.log_prob`` of those samples where the model has one: FCE's EBM, CoopNets' descriptor);
    * latent models also of the prior latents ``sample_latent(n)`` (drawn first, at the same seed);
    * sequence models (whose sampled tokens are discrete): the prior latents' numbers and the decoder's
      log-likelihood of ``n`` fixed token sequences at those latents; the language model: its log-likelihood of them.

    The model is put in eval mode; chains and sampling run on the model's device in fp32 under
    ``torch.manual_seed(seed)``. The sampled numbers agree across CPUs only approximately: float rounding differs
    between vector units and a chain can amplify it (a 60-step data-space chain turns a 1e-6 relative change of the
    weights into about 0.5%), so compare them with a loose tolerance and the weight numbers with a tight one.
    """
    model.eval()
    out: dict[str, float] = _weights_fingerprint(model, seed)
    if isinstance(model, VocabularyMixin) and not hasattr(model, "sample_latent"):  # the language model
        with torch.no_grad():
            out.update(_stats("loglik", model.log_prob(_fixed_texts(model, n))))
        return out
    torch.manual_seed(seed)
    if hasattr(model, "sample_latent"):
        z = model.sample_latent(n)
        out.update(_stats("latent", z))
        if isinstance(model, VocabularyMixin):
            with torch.no_grad():
                out.update(_stats("loglik", model.log_likelihood(_fixed_texts(model, n), z)))
            return out
    torch.manual_seed(seed)
    x = model.sample(n)
    out.update(_stats("sample", x))
    if callable(getattr(model, "log_prob", None)):  # the energy's view of them (FCE's EBM, CoopNets' descriptor)
        with torch.no_grad():
            out.update(_stats("log_prob", model.log_prob(x.detach())))
    return out
