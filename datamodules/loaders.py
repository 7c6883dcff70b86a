"""The data loaders every datamodule returns: resumable ones.

``torchdata``'s ``StatefulDataLoader`` is a drop-in ``DataLoader`` with ``state_dict()`` / ``load_state_dict()``:
Lightning stores its position (and its shuffling sampler's generator) in checkpoints and restores it on resume, so a
run resumed mid-epoch continues with the batches it had not seen yet, in the order the uninterrupted run would have
used, instead of starting the epoch again.
"""
from __future__ import annotations

from torch.utils.data import Dataset
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import RandomSampler

__all__ = ["make_loader"]


def make_loader(dataset: Dataset, **kwargs) -> StatefulDataLoader:
    """A resumable loader over ``dataset``; ``kwargs`` are ``torch.utils.data.DataLoader``'s (batch_size, shuffle,
    generator, num_workers, collate_fn, ...). ``persistent_workers`` is dropped when ``num_workers`` is 0; a seeded
    shuffle (``shuffle=True`` with a ``generator``) becomes a stateful ``RandomSampler`` with that generator."""
    if not kwargs.get("num_workers"):
        kwargs.pop("persistent_workers", None)
    if kwargs.get("shuffle") and kwargs.get("generator") is not None:
        # a seeded shuffle gets a sampler of its own: the loader's generator also seeds each epoch's iterator, and
        # sharing one generator between the two is not restored exactly on resume
        kwargs["sampler"] = RandomSampler(dataset, generator=kwargs.pop("generator"))
        kwargs.pop("shuffle")
    return StatefulDataLoader(dataset, **kwargs)
