"""The data loaders every datamodule returns: resumable ones.

``torchdata``'s ``StatefulDataLoader`` is a drop-in ``DataLoader`` with ``state_dict()`` / ``load_state_dict()``:
Lightning stores its position (and its shuffling sampler's generator) in checkpoints and restores it on resume, so a
run resumed mid-epoch continues with the batches it had not seen yet, in the order the uninterrupted run would have
used, instead of starting the epoch again.
"""
from __future__ import annotations

import torch
from torch.utils.data import Dataset
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import RandomSampler

__all__ = ["ShuffleStateMixin", "SplitLoadersMixin", "make_loader"]


class ShuffleStateMixin:
    """For a LightningDataModule: keeps its training loaders' shuffling generators in checkpoints, so that a run
    resumed where an epoch ended shuffles the next epoch as the uninterrupted run does.

    Lightning restores a loader's own state only when a run resumes inside an epoch or trains by steps; an epoch-based
    run resumed at an epoch's end gets new loaders, whose samplers would shuffle from their initial seed (repeating
    the first epoch's order) instead of where the uninterrupted run's generators were. The datamodule's
    ``state_dict`` (which Lightning saves in every checkpoint and restores before it makes the loaders) holds those
    generators' states; :meth:`track_train_loaders` puts them into the new loaders. Where Lightning also restores the
    loaders' own states, theirs are applied after and win.
    """

    _tracked_loaders: list = []
    _pending_generators: list | None = None

    @staticmethod
    def _generator(loader) -> torch.Generator | None:
        sampler = getattr(loader, "sampler", None)
        return None if getattr(sampler, "replacement", True) else getattr(sampler, "generator", None)

    def track_train_loaders(self, loaders):
        """Register the training loader (or list of loaders) just made, restoring saved generators; returns it."""
        many = isinstance(loaders, (list, tuple))
        self._tracked_loaders = list(loaders) if many else [loaders]
        for loader, state in zip(self._tracked_loaders, self._pending_generators or []):
            generator = self._generator(loader)
            if generator is not None and state is not None:
                generator.set_state(state)
        self._pending_generators = None
        return loaders

    def state_dict(self) -> dict:
        states = [(g.get_state() if (g := self._generator(loader)) is not None else None)
                  for loader in self._tracked_loaders]
        return {"shuffle_generators": states} if any(s is not None for s in states) else {}

    def load_state_dict(self, state_dict: dict) -> None:
        self._pending_generators = state_dict.get("shuffle_generators")


class SplitLoadersMixin(ShuffleStateMixin):
    """For a LightningDataModule with ``train_set``, ``val_set`` and ``test_set`` and a method ``_loader(dataset,
    train: bool)``: the three dataloaders, the training one tracked for resume (:class:`ShuffleStateMixin`)."""

    def train_dataloader(self):
        return self.track_train_loaders(self._loader(self.train_set, True))

    def val_dataloader(self):
        return self._loader(self.val_set, False)

    def test_dataloader(self):
        return self._loader(self.test_set, False)


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
