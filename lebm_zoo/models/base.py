"""``EBMModule``: the base class every family subclasses.

It is a ``pytorch_lightning.LightningModule`` with:

* the shared samplers (:class:`~lebm_zoo.samplers.SamplerMixin`: ``self.langevin`` / ``self.hmc``);
* manual optimisation (EBM training steps interleave chains and several optimisers);
* a divergence guard (:meth:`check_finite`) that skips a bad update, stops the trainer cleanly and keeps the last
  good weights, instead of a crash dump;
* checkpoints that record which class wrote them, so :func:`lebm_zoo.load_pretrained` can rebuild the model and
  refuse a checkpoint of another model with a clear error.

The thin helpers the families share (each family's ``training_step`` stays explicit, in its paper's order):
:meth:`~EBMModule.data_from_batch` (the shape-checked data of a batch), :meth:`~EBMModule.log_train` (a step's
logged values), :meth:`~EBMModule.adam` (Adam with the ``betas`` hyperparameter) and :meth:`~EBMModule.refine`
(Langevin refinement of samples on the module's energy).

To add a model, subclass it, call ``self.save_hyperparameters()`` in ``__init__`` (plain values only: checkpoints are
loaded weights-only), implement ``training_step`` and the public methods your callbacks use (``sample`` for
:class:`~lebm_zoo.callbacks.FIDCallback` and :class:`~lebm_zoo.callbacks.SampleGrid`, ``reconstruct`` for
:class:`~lebm_zoo.callbacks.ReconstructionMSE`). See docs/adding_a_model.md.
"""
from __future__ import annotations

import functools
import inspect
import math
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Checkpoint
from pytorch_lightning.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from pytorch_lightning.trainer.states import TrainerStatus
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor

from lebm_zoo.capture import CapturedStep
from lebm_zoo.checkpoint import check_model_class, write_record
from lebm_zoo.errors import DataShapeError, StoppedBySignal, TrainingDivergedError
from lebm_zoo.pretrained import PretrainedMixin
from lebm_zoo.samplers import LangevinSampler, SamplerMixin
from lebm_zoo.utils import images_from_batch, in_training_loop, set_rng_state

__all__ = ["DataShapeError", "EBMModule", "StopCheckpoint", "StoppedBySignal", "TrainingDivergedError"]


class EBMModule(PretrainedMixin, SamplerMixin, pl.LightningModule):
    """Base LightningModule of the zoo (manual optimisation, shared samplers, divergence guard, tagged checkpoints).

    Attributes:
        samplers: dict name -> sampler, filled by the subclass (used by ``self.langevin`` / ``self.hmc``).
        divergence: ``None`` while training is healthy; the message of the divergence that stopped training.
        explode_threshold: a loss whose magnitude exceeds this is treated as diverged (default 1e8).
    """

    explode_threshold: float = 1e8

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.samplers = {}
        self.divergence: str | None = None
        self._pending_checks: list[_PendingCheck] = []  # the divergence guard's unread checks (see sync_every)
        self.recipe: str | None = None  # set by `lebm-zoo` to the recipe name; stored in checkpoints
        self.register_state_dict_post_hook(_divergence_to_main_process)
        self.register_load_state_dict_pre_hook(_divergence_from_worker)

    #: the family's hyperparameters that are layer sizes: each must be an integer >= 1 (or None where the family
    #: allows it), checked by :meth:`save_hyperparameters`; each family declares its own
    size_hparams: tuple[str, ...] = ()
    #: the family's hyperparameters that a run resumed with ``lebm-zoo fit --ckpt_path`` may change (chains, step
    #: sizes, learning rates and schedules, clipping, loss weights); every other one comes from the checkpoint
    resume_hparams: tuple[str, ...] = ()

    def save_hyperparameters(self, *args, **kwargs) -> None:
        """Lightning's ``save_hyperparameters``, then a check that the layer sizes are integers >= 1, so that a bad
        size is a clear ``ValueError`` before any network is built (not a ``ZeroDivisionError`` from inside one).

        Raises:
            ValueError: naming the hyperparameter and its value.
        """
        kwargs.setdefault("frame", inspect.currentframe().f_back)
        super().save_hyperparameters(*args, **kwargs)
        for key in self.size_hparams:
            value = self.hparams.get(key)
            for v in value if isinstance(value, (list, tuple)) else [value]:
                if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                    raise ValueError(f"{key} must be >= 1 (a layer size), got {value!r}")

    # ----------------------------------------------------------------------------------------------- public API
    def sample(self, n: int) -> Tensor:  # pragma: no cover - abstract
        """Draw ``n`` samples from the model. Subclasses implement it."""
        raise NotImplementedError(f"{type(self).__name__} does not implement sample(n)")

    def validation_step(self, batch, batch_idx: int) -> None:
        """No model-side validation loss by default: the metric callbacks (FID, ReconstructionMSE, SampleGrid, ...)
        evaluate through the public methods. Override it to log a validation loss."""

    def test_step(self, batch, batch_idx: int) -> None:
        """No model-side test loss by default: the recipe's metric callbacks compute the paper's test metrics."""

    # ----------------------------------------------------------------------------------------- divergence guard
    #: how many training batches the divergence guard lets pass between two reads of the losses on the host (see
    #: :meth:`check_finite`); 1 (the default) reads them at every check. Set it with the
    #: :class:`~lebm_zoo.callbacks.SyncEvery` callback (``--trainer.callbacks+=lebm_zoo.callbacks.SyncEvery``).
    sync_every: int = 1

    def chain_compile_kwargs(self) -> dict:
        """``compile`` and ``compile_scope`` for the family's :class:`~lebm_zoo.samplers.LangevinSampler` chains, from
        its ``compile_chains`` / ``compile_scope`` hyperparameters (absent: eager chains, ``"step"``)."""
        hp = self.hparams
        return {"compile": hp.get("compile_chains"), "compile_scope": hp.get("compile_scope", "step")}

    def check_finite(self, losses: dict[str, Tensor], limits: dict[str, float] | None = None) -> bool:
        """Return True if every loss is finite and within bounds; otherwise stop training cleanly.

        On failure the caller must skip its optimiser steps. This sets :attr:`divergence` to a message naming the
        losses, step and epoch, asks the trainer to stop after this batch (the checkpoint callbacks then save the last
        good weights) and warns; ``lebm-zoo fit`` turns it into an error message and a non-zero exit.
        One host-device synchronisation per call (with the default :attr:`sync_every` of 1).

        With :attr:`sync_every` ``= N > 1`` (training loop only) the losses stay on the device and are read in one
        synchronisation every ``N`` training batches, at each epoch's last batch, before every checkpoint is written
        and when training ends. A failure in the batch being trained is handled as above. One found later (up to
        ``N - 1`` batches, or at a checkpoint or the end) means the weights already hold the updates made since,
        which are not undone: :attr:`divergence` is set and :class:`TrainingDivergedError` is raised at once, so that
        ``fit`` ends there and no checkpoint is written from the bad step on (``lebm-zoo fit`` exits with 1).

        Under DDP (``world_size > 1``) the decision is collective: the ranks' losses are all-gathered (one collective
        per read, so every rank must call it at the same point of its step, as the families do), and if any rank's
        losses fail, every rank returns False, skips the update and stops after this batch, with a message naming
        the rank(s) that diverged and their losses. With ``ddp_spawn`` the message also comes back to the module of
        the main process (see :func:`_divergence_to_main_process`).

        Args:
            losses: scalar tensors by name.
            limits: optional bound on some losses' magnitude, by name; every loss is also bounded by
                :attr:`explode_threshold`.

        Raises:
            TrainingDivergedError: with ``sync_every > 1``, for a failure found after its batch's update.
        """
        limits = limits or {}
        names = list(losses)
        values = torch.stack([v.detach().float().reshape(()) for v in losses.values()])
        bounds = [min(limits.get(k, math.inf), self.explode_threshold) for k in names]
        check = _PendingCheck(names, bounds, values, self.current_epoch, self.global_step, _batch_index(self))
        if self.sync_every > 1 and in_training_loop(self):
            self._pending_checks.append(check)
            if not self._check_due():
                return True
            checks, self._pending_checks = self._pending_checks, []
        else:
            checks = [check]
        return self._read_checks(checks)

    def _check_due(self) -> bool:
        """Whether the deferred checks are read now: ``sync_every`` batches since the first unread one, or an
        epoch's last batch (the rest are read before a checkpoint is written and when training ends)."""
        first = self._pending_checks[0].batch
        return _batch_index(self) - first + 1 >= self.sync_every or bool(self.trainer.is_last_batch)

    def flush_checks(self, when: str = "") -> bool:
        """Read the divergence guard's deferred checks now (see :attr:`sync_every`); True if none failed (one host
        synchronisation, none if nothing is pending).

        Args:
            when: where the read happens, for the message (e.g. ``"before a checkpoint was written"``).

        Raises:
            TrainingDivergedError: a check failed (the weights hold updates made after it; see :meth:`check_finite`).
        """
        if not self._pending_checks:
            return True
        checks, self._pending_checks = self._pending_checks, []
        return self._read_checks(checks, when)

    def _read_checks(self, checks: list, when: str = "") -> bool:
        """Read ``checks`` on the host (one synchronisation, one collective under DDP) and stop at the first that
        fails."""
        values = torch.cat([c.values for c in checks])
        world = self.trainer.world_size if self._trainer is not None else 1
        if world > 1:  # one collective: every rank sees every rank's losses and takes the same decision
            values = _all_gather(self.trainer, values)
        values = values.reshape(world, -1).cpu()  # (ranks, all the checks' losses); the one host-device sync
        start = 0
        for c in checks:
            part = values[:, start:start + len(c.names)]
            start += len(c.names)
            bad = ~(part.isfinite() & (part.abs() <= torch.tensor(c.bounds))).all(dim=1)  # (ranks,)
            if bad.any():
                late = checks[-1].batch - c.batch
                message = self._divergence_message(c, part, bad, world, late, when)
                if late or when:  # updates were applied after it: stop here, before anything is saved
                    self.divergence = message
                    raise TrainingDivergedError(message)
                self.stop_training(message)
                return False
        return True

    def _divergence_message(self, c, values: Tensor, bad: Tensor, world: int, late: int, when: str) -> str:
        names = c.names
        bound_txt = ", ".join(f"|{k}| <= {b:.3g}" for k, b in zip(names, c.bounds))

        def vals(row: Tensor) -> str:
            return ", ".join(f"{k}={v:.4g}" for k, v in zip(names, row.tolist()))

        where = f"epoch {c.epoch}, step {c.step}"
        if world > 1:
            ranks = bad.nonzero().flatten().tolist()
            which = f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"
            head = (f"{type(self).__name__} training diverged on {which} (of {world}) at {where}: "
                    f"{'; '.join(f'rank {r}: {vals(values[r])}' for r in ranks)}")
            skipped = "Every rank skipped the update and stopped"
        else:
            head = f"{type(self).__name__} training diverged at {where}: {vals(values[0])}"
            skipped = "The update was skipped and training stopped"
        if late or when:
            return (f"{head} (expected finite values with {bound_txt}). The losses are read every {self.sync_every} "
                    f"batches (sync_every): this was found {when or f'{late} batch(es) later'}, after the updates "
                    "made since, and training stopped there with nothing saved from that step on: resume from the "
                    "last checkpoint written before it. Try smaller learning rates or Langevin step sizes, gradient "
                    "clipping, or fp32 precision.")
        return (
            f"{head} (expected finite values with {bound_txt}). {skipped}; no checkpoint was written at the stop (the "
            "weights may already be those of the update that led here): resume from the last one written before it. "
            "Try smaller learning rates or Langevin step sizes, gradient clipping, or fp32 precision.")

    def raise_if_diverged(self) -> None:
        """For Python training loops that want an exception: after ``trainer.fit``, raise if training was stopped by
        the divergence guard or an early stop (``lebm-zoo fit`` exits with code 1 instead).

        Raises:
            TrainingDivergedError: with the message of the stop (:attr:`divergence`).
        """
        if self.divergence:
            raise TrainingDivergedError(self.divergence)

    def stop_training(self, message: str) -> None:
        """Stop training cleanly after this batch: record ``message`` as :attr:`divergence` and warn.

        The checkpoint callbacks then save the last weights; ``lebm-zoo fit`` prints the message and exits with 1.
        """
        self.divergence = message
        rank_zero_warn(message)
        if self._trainer is not None:
            self.trainer.should_stop = True

    # ---------------------------------------------------------------------------------------------- plumbing
    def called_by_user(self) -> bool:
        """Whether a public method runs for a caller outside the model's own chains and training steps: then it checks
        its inputs (shapes, dtypes, finite values), as :meth:`infer_latent` does. Inside a chain (its target runs at
        every step) and in the training loop (the batches were checked once) the checks, and their host
        synchronisations, are skipped."""
        return not self.in_chain and not in_training_loop(self)

    def configure_callbacks(self):
        """The zoo's stop checkpoint (see :class:`StopCheckpoint`), added to the trainer's callbacks."""
        return [StopCheckpoint()]

    def on_train_epoch_start(self) -> None:
        """After a resume from a checkpoint written at an epoch's end, put back its RNG states before this epoch's
        data iterator is created (the uninterrupted run created it from that state too)."""
        state = getattr(self, "_resume_rng", None)
        if state is not None and state.get("at") == "epoch_end":
            self._resume_rng = None
            set_rng_state(state)
            if self.trainer.max_steps == -1:
                # an epoch-based run resumed at an epoch's end: Lightning made this epoch's data iterators before this
                # hook, the uninterrupted run makes them after it. Take the draw each one's creation takes from the
                # global generator (its base seed; torch's DataLoader iterator), so the chains' noise is the same
                loaders = self.trainer.train_dataloader
                loaders = list(loaders.values()) if isinstance(loaders, dict) else (
                    list(loaders) if isinstance(loaders, (list, tuple)) else [loaders])
                for loader in loaders:
                    if getattr(loader, "generator", None) is None:
                        torch.empty((), dtype=torch.int64).random_()
            self._decorrelate_rank_rng()

    @property
    def replaying_epoch_end(self) -> bool:
        """True in ``on_train_epoch_end`` when Lightning replays the end of the epoch a checkpoint was written at
        (a resume from an epoch-end checkpoint runs that hook again before any batch): its work is in the checkpoint."""
        return self._trainer is not None and self.trainer.fit_loop.restarting and not getattr(self, "_fit_batches", 0)

    def on_train_start(self) -> None:
        self._fit_batches = 0  # training batches run by this fit call
        self._pending_checks = []  # none left from a fit that ended by an exception
        self._decorrelate_rank_rng()
        self._step_graphs = {}  # a new fit: new optimisers, maybe another device
        if self.hparams.get("capture_step"):
            self._check_capture_step(self.trainer.world_size, self.device, str(self.trainer.precision))

    # ------------------------------------------------------------------------------------------------ capture_step
    #: the CUDA graphs of the training step's regions by name (``capture_step``; each made on first use, all
    #: forgotten at each fit's start)
    _step_graphs: dict[str, CapturedStep] = {}

    @staticmethod
    def check_capture_args(capture_step, compile_chains) -> None:
        """Check a family's ``capture_step`` hyperparameter against its ``compile_chains``.

        Raises:
            ValueError: a ``capture_step`` that is not a bool, or True with ``compile_chains`` on (the graph holds the
                eager chains; a compiled chain would compile again inside the capture, where dynamo cannot run).
        """
        if not isinstance(capture_step, bool):
            raise ValueError(f"capture_step must be True or False, got {capture_step!r}")
        if capture_step and compile_chains not in (None, False):
            raise ValueError(f"capture_step captures the whole step, eager chains included, in one CUDA graph; it "
                             f"cannot hold compiled chains (compile_chains={compile_chains!r}): use one or the other")

    @staticmethod
    def _check_capture_step(world_size: int, device: torch.device, precision: str = "32-true") -> None:
        """``capture_step``'s conditions: one process and no loss scaling (else ValueError); a CUDA device (else a
        warning: the step runs eagerly)."""
        if world_size > 1:
            raise ValueError(f"capture_step captures one process's step on one GPU; this run has {world_size} "
                             "processes: turn it off (the families that have compile_chains can use that instead)")
        if precision == "16-mixed":  # the region's backward does not scale the loss; the plugin would unscale it
            raise ValueError("capture_step does not scale the loss as precision 16-mixed needs: use bf16-mixed or "
                             "32-true")
        if device.type != "cuda":
            rank_zero_warn(f"capture_step needs a CUDA device; on {device.type} the training step runs eagerly "
                           "(the same computation)")

    def _forward_backward(self, x: Tensor, backward) -> dict[str, Tensor]:  # pragma: no cover - per family
        """A family's training step but its parameter updates (chains, losses, one backward into ``.grad``):
        ``x -> {name: detached 0-d tensor}``, no host reads; ``backward(loss)`` back-propagates."""
        raise NotImplementedError(f"{type(self).__name__} has no capturable training region")

    def forward_backward(self, x: Tensor) -> dict[str, Tensor]:
        """Run the family's :meth:`_forward_backward` on a training batch (``x``: its data, checked), as the region
        ``"step"`` of :meth:`run_region`."""
        return self.run_region("step", self._forward_backward, x)

    def run_region(self, name: str, region: Callable[..., dict[str, Tensor]], *xs: Tensor) -> dict[str, Tensor]:
        """Run a region of a training step, ``region(*xs, backward=...)`` (chains, losses and a backward into
        ``.grad``, no parameter update, no host read): eagerly with ``backward=self.manual_backward``, or, with the
        ``capture_step`` hyperparameter, through the :class:`~lebm_zoo.capture.CapturedStep` named ``name`` (one CUDA
        graph replay per step on a GPU, after 3 eager warm-up steps; eager elsewhere) with ``backward=
        Tensor.backward``: Lightning's ``on_before_backward`` / ``on_after_backward`` hooks would run only when the
        graph is captured, so they are not called. A step with several regions (updates between them) names each.

        Returns:
            the region's statistics by name, 0-d tensors (copies, when replayed).
        """
        if not self.hparams.get("capture_step"):
            return region(*xs, backward=self.manual_backward)
        graph = self._step_graphs.get(name)
        if graph is None:
            graph = CapturedStep(functools.partial(region, backward=Tensor.backward), self.parameters())
            self._step_graphs = {**self._step_graphs, name: graph}  # never the class's shared dict
        return graph(*xs)

    def _decorrelate_rank_rng(self) -> None:
        """Give every DDP rank its own Langevin noise: ranks > 0 reseed torch's generators (CPU and CUDA).

        ``seed_everything`` seeds every rank alike, so without this each rank's chains would draw the same noise and,
        from the same initial states, produce the same negative samples: a global batch whose negative half is
        ``world_size`` copies of one rank's. Rank ``r > 0`` reseeds with a number drawn from its current stream plus
        ``1_000_003 * r`` (reproducible for a given seed); rank 0 keeps its stream, so it draws what a one-device
        run draws. Called at the start of training and after a resume has put back the checkpoint's RNG states
        (which are rank 0's). No-op on one device.
        """
        if self._trainer is None or self.trainer.world_size <= 1 or self.trainer.global_rank == 0:
            return
        torch.manual_seed(int(torch.randint(0, 2**62, (1,))) + 1_000_003 * self.trainer.global_rank)

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        """After a resume from a checkpoint written inside an epoch, put back the RNG states the chains drew from when
        it was written: here, at the first training batch, after the sanity-check validation and the data iterator's
        creation, which the uninterrupted run did not do at this point."""
        self._fit_batches = getattr(self, "_fit_batches", 0) + 1
        state = getattr(self, "_resume_rng", None)
        if state is not None:
            self._resume_rng = None
            set_rng_state(state)
            self._decorrelate_rank_rng()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Read the divergence guard's deferred checks first (see :attr:`sync_every`), then record the model class,
        the RNG states and the versions in ``checkpoint``.

        Raises:
            TrainingDivergedError: a deferred check failed: the weights may be those of updates made after the
                divergence, so this checkpoint is not written.
        """
        self.flush_checks("before a checkpoint was written")
        write_record(checkpoint, self)

    def on_train_end(self) -> None:
        """Read the divergence guard's deferred checks that are left (see :attr:`sync_every`)."""
        self.flush_checks("when training ended")

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Keep the checkpoint's RNG states, to put back when training resumes (see :meth:`on_train_batch_start`),
        and, when this module's learning rates differ from the checkpoint's (``--model.lr_* ...`` on resume), put
        them into the stored optimiser and scheduler states, which Lightning restores after this hook.

        Raises:
            CheckpointError: the checkpoint's record names another model class.
        """
        check_model_class(checkpoint, self)
        self._resume_rng = checkpoint.get("lebm_zoo", {}).get("rng")
        if self._trainer is not None:
            self._apply_new_learning_rates(checkpoint)

    def _apply_new_learning_rates(self, checkpoint: dict) -> None:
        stored = checkpoint.get("hyper_parameters", {})
        keys = [k for k in self.hparams if (k == "lr" or k.startswith("lr_")) and k not in ("lr_decay", "lr_schedule")]
        if not any(k in stored and stored[k] != self.hparams[k] for k in keys) or "optimizer_states" not in checkpoint:
            return
        fresh = self.configure_optimizers()
        opts = fresh[0] if isinstance(fresh, tuple) else fresh
        opts = opts if isinstance(opts, (list, tuple)) else [opts]
        states, scheds = checkpoint["optimizer_states"], checkpoint.get("lr_schedulers", [])
        for i, (opt, state) in enumerate(zip(opts, states)):
            new_lrs = []
            for group, saved in zip(opt.param_groups, state["param_groups"]):
                factor = saved["lr"] / saved["initial_lr"] if saved.get("initial_lr") else 1.0  # schedule so far
                saved["initial_lr"], saved["lr"] = group["lr"], group["lr"] * factor
                new_lrs.append(saved["lr"])
            if i < len(scheds) and "base_lrs" in scheds[i]:
                scheds[i]["base_lrs"] = [g["lr"] for g in opt.param_groups]
                scheds[i]["_last_lr"] = new_lrs

    def setup(self, stage: str) -> None:
        """Refuse a datamodule whose ``channels`` / ``img_size`` differ from the model's hyperparameters of that name.

        Raises:
            DataShapeError: naming the attribute, both values and the ``--model.*`` flag that fixes it.
            ValueError: a learning rate ``lr`` / ``lr_*`` that is not > 0.
        """
        for key, value in self.hparams.items():  # the optimisers would refuse them later, without naming the flag
            if ((key == "lr" or key.startswith("lr_")) and key not in ("lr_decay", "lr_schedule")
                    and isinstance(value, (int, float)) and not value > 0):
                raise ValueError(f"{key} must be a learning rate > 0, got {value} (--model.{key})")
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        for attr in ("channels", "img_size"):
            have, want = getattr(dm, attr, None), self.hparams.get(attr)
            if have is not None and want is not None and have != want:
                raise DataShapeError(f"the datamodule yields {attr}={have} but the model has {attr}={want}: set "
                                     f"--model.{attr} {have} (or change the data's {attr}).")

    def teardown(self, stage: str) -> None:
        """In a worker process that ``ddp_spawn`` / ``ddp_fork`` started for this one run: leave the process group
        together with the other ranks (see :func:`leave_process_group`); the worker exits right after."""
        super().teardown(stage)
        trainer = self._trainer
        if trainer is not None and isinstance(trainer.strategy.launcher, _MultiProcessingLauncher):
            leave_process_group()

    def check_data_shape(self, x: Tensor, expected: tuple[int, ...], hint: str = "") -> None:
        """Raise a clear :class:`DataShapeError` if a batch's per-item shape differs from ``expected``."""
        if tuple(x.shape[1:]) != tuple(expected):
            raise DataShapeError(f"{type(self).__name__} expects items of shape {tuple(expected)} but the data has "
                             f"{tuple(x.shape[1:])}. {hint}".strip())

    # --------------------------------------------------------------------------------- helpers of the families
    def data_from_batch(self, batch, expected_shape: tuple[int, ...] | None = None, hint: str | None = None) -> Tensor:
        """The data tensor of a training batch, its per-item shape checked (no copy, no cast).

        Args:
            batch: a tensor ``(B, ...)``, an ``(x, y, ...)`` tuple or list, or a dict with ``"x"``
                (:func:`~lebm_zoo.utils.images_from_batch`).
            expected_shape: the per-item shape, e.g. ``(C, H, W)``; default: images of the ``channels`` and
                ``img_size`` hyperparameters, ``(channels, img_size, img_size)``.
            hint: how to fix a mismatch, appended to the error; default: ``"Set --model.channels/--model.img_size."``
                for the default shape, none for a given one.

        Returns:
            ``x``, ``(B, *expected_shape)``: the batch's tensor itself.

        Raises:
            TypeError: if the batch holds no tensor (see :func:`~lebm_zoo.utils.images_from_batch`).
            DataShapeError: if the per-item shape differs from ``expected_shape`` (the message names both and ends
                with ``hint``; see :meth:`check_data_shape`).
        """
        x = images_from_batch(batch)
        if expected_shape is None:
            hp = self.hparams
            expected_shape = (hp.channels, hp.img_size, hp.img_size)
            hint = "Set --model.channels/--model.img_size." if hint is None else hint
        self.check_data_shape(x, expected_shape, hint or "")
        return x

    def log_train(self, logs: dict, prog_bar: dict | None = None, batch_size: int | None = None) -> None:
        """Log a training step's values: every ``logs[k]`` as ``train/k`` to the loggers (at this step only, not
        aggregated over the epoch), every ``prog_bar[k]`` as ``k`` on the progress bar only (not to the loggers).

        Tensors are detached first; every value must be a scalar (a 0-d or one-element tensor, or a number). Numbers
        are logged as host tensors, so that logging them does not synchronise with a GPU.

        Args:
            logs: the logged values by name (without the ``train/`` prefix).
            prog_bar: the progress-bar values by name (None or empty: none).
            batch_size: the batch size Lightning records with the values (None: Lightning infers it from the batch).
        """
        self.log_dict({f"train/{k}": _detached(v) for k, v in logs.items()}, on_step=True, on_epoch=False,
                      batch_size=batch_size)
        if prog_bar:
            self.log_dict({k: _detached(v) for k, v in prog_bar.items()}, prog_bar=True, logger=False,
                          batch_size=batch_size)

    def adam(self, params, lr: float, optimizer: type[torch.optim.Optimizer] | None = None,
             **kwargs) -> torch.optim.Optimizer:
        """An Adam optimiser with the ``betas`` hyperparameter: ``optimizer(params, lr=lr, betas=tuple(betas),
        **kwargs)``.

        Args:
            params: parameters, or parameter groups (dicts; their own ``lr`` overrides ``lr``).
            lr: the learning rate.
            optimizer: the Adam class (default ``torch.optim.Adam``; e.g. :class:`~lebm_zoo.optim.AdamTF`).
            kwargs: further arguments of the optimiser (e.g. ``weight_decay``).

        Returns:
            the optimiser.

        Raises:
            AttributeError: if the module has no ``betas`` hyperparameter.
        """
        optimizer = torch.optim.Adam if optimizer is None else optimizer
        return optimizer(params, lr=lr, betas=tuple(self.hparams.betas), **kwargs)

    @torch.no_grad()
    def refine(self, x: Tensor, n_steps: int | None = None, step_size: float | None = None) -> Tensor:
        """Langevin refinement of samples on the module's energy: textbook Langevin (:class:`LangevinSampler`,
        noise on, no clamping) on ``log p(x) = -self.energy(x)``, run with the parameters frozen and in eval mode.

        Args:
            x: samples ``(B, ...)`` in the shape :meth:`energy` takes (e.g. images ``(B, C, H, W)``).
            n_steps: Langevin steps (default: the ``refine_steps`` hyperparameter, 0 when there is none); 0 returns
                ``x`` itself.
            step_size: the step size (default: the ``refine_step_size`` hyperparameter).

        Returns:
            the refined samples, same shape, dtype and device as ``x`` (detached, not clamped), or ``x`` for 0 steps.

        Raises:
            ValueError: for a negative ``n_steps``, a non-positive ``step_size``, or none given when the module has no
                ``refine_step_size`` hyperparameter.
        """
        hp = self.hparams
        k = hp.get("refine_steps", 0) if n_steps is None else int(n_steps)
        if k == 0:
            return x
        step_size = hp.get("refine_step_size") if step_size is None else step_size
        if step_size is None:
            raise ValueError(f"{type(self).__name__} has no refine_step_size hyperparameter: pass step_size")
        return self.langevin(lambda xx: -self.energy(xx), x, LangevinSampler(k, step_size))

    @staticmethod
    def grad_norm_and_clip(params, max_norm: float | None) -> Tensor:
        """Total L2 norm of the gradients of ``params``; clips them to ``max_norm`` when it is set."""
        return torch.nn.utils.clip_grad_norm_(list(params), math.inf if max_norm is None else max_norm)

    def step_uncounted(self, optimizer) -> None:
        """Step a secondary optimiser without advancing ``trainer.global_step``.

        Lightning counts every optimiser step of a manual-optimisation module in ``global_step``; a family with
        several optimisers steps all but the first one through this, so that ``global_step`` and ``max_steps`` count
        training iterations. The step still goes through the strategy and precision plugin.
        """
        opt = getattr(optimizer, "optimizer", optimizer)  # unwrap LightningOptimizer
        self.trainer.strategy.optimizer_step(opt, closure=lambda: None)

    def step_schedulers(self) -> None:
        """Step every LR scheduler once (manual optimisation: call at epoch end). Nothing happens when the run stopped
        inside the epoch (as Lightning does for its own epoch schedulers), diverged, or replays the end of the epoch
        a checkpoint was written at (resume)."""
        scheds = self.lr_schedulers()
        if scheds is None or self.divergence or not epoch_completed(self.trainer) or self.replaying_epoch_end:
            return
        for s in scheds if isinstance(scheds, list) else [scheds]:
            s.step()


def _detached(v):
    """``v.detach()`` for a tensor; a number as a host tensor (Lightning would copy it to the model's device, a host
    synchronisation on a GPU)."""
    return v.detach() if isinstance(v, Tensor) else torch.tensor(v, dtype=torch.get_default_dtype())


@dataclass
class _PendingCheck:
    """One call of :meth:`EBMModule.check_finite`: the losses (on their device) and where they were computed."""
    names: list[str]
    bounds: list[float]
    values: Tensor  # (len(names),) float
    epoch: int
    step: int
    batch: int  # the fit loop's batch index, across epochs


def _batch_index(module) -> int:
    trainer = getattr(module, "_trainer", None)
    return int(trainer.fit_loop.total_batch_idx) if trainer is not None else 0


def _all_gather(trainer: pl.Trainer, t: Tensor) -> Tensor:
    """``(world_size, *t.shape)``: ``t`` of every rank, in one collective. ``torch.distributed.all_gather`` directly
    when a process group is up (the strategy's ``all_gather`` goes through a deprecated autograd wrapper that warns
    on every run), the strategy's otherwise."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        parts = [torch.empty_like(t) for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather(parts, t.contiguous())
        return torch.stack(parts)
    return trainer.strategy.all_gather(t)


def leave_process_group() -> None:
    """After a multi-process run that every rank finished: leave the process group together (a barrier, then
    ``destroy_process_group``). Torn down one rank at a time at interpreter exit (Lightning's ``atexit`` handler), a
    rank whose peer has already gone can abort ("terminate called without an active exception", SIGABRT) after a
    successful run. Does nothing without a process group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


_DIVERGENCE_KEY = "_lebm_zoo_divergence"


def _divergence_to_main_process(module: EBMModule, state_dict: dict, prefix: str, local_metadata) -> None:
    """State-dict hook: under ``ddp_spawn`` (and ``ddp_fork`` / ``ddp_notebook``) the main process gets back only the
    weights (the state dict a worker saves at the end of ``fit``, which Lightning loads there with ``strict=False``),
    not the module's attributes, so its :attr:`~EBMModule.divergence` would stay None and ``lebm-zoo fit`` would exit
    0. This adds the message to that one state dict: a spawned worker's, after ``fit`` has finished. Checkpoints,
    written while the trainer runs, and every other state dict never hold it."""
    trainer = module._trainer
    if not module.divergence or trainer is None or trainer.state.status != TrainerStatus.FINISHED:
        return
    if isinstance(trainer.strategy.launcher, _MultiProcessingLauncher):
        state_dict[prefix + _DIVERGENCE_KEY] = module.divergence


def _divergence_from_worker(module: EBMModule, state_dict: dict, prefix: str, *args) -> None:
    """Load-state-dict pre-hook: take the message :func:`_divergence_to_main_process` added out of the state dict
    (so that no loading sees an unexpected key) into :attr:`~EBMModule.divergence`."""
    message = state_dict.pop(prefix + _DIVERGENCE_KEY, None)
    if message is not None:
        module.divergence = message


def epoch_completed(trainer: pl.Trainer) -> bool:
    """Whether the current training epoch ran all its batches (False when the run stopped inside it)."""
    loop = trainer.fit_loop.epoch_loop
    return bool(loop._num_ready_batches_reached()) if hasattr(loop, "_num_ready_batches_reached") else bool(
        loop.batch_progress.is_last_batch)


class StopCheckpoint(Checkpoint):
    """Writes ``last.ckpt`` (of every ``ModelCheckpoint(save_last=True)``) where a run stops, so that resuming from it
    continues exactly where the run stopped: the true epoch and batch position, the data loader's position, the
    schedulers and the RNG states (Lightning itself saves ``last.ckpt`` only when a checkpoint is due, and once
    ``fit`` has ended it has closed the epoch, which a resume would count again).

    * a stop inside an epoch (``max_steps``, ``max_time``, a divergence): after that batch;
    * a stop at an epoch's end (its last batch, ``max_epochs``, an early stop decided at the epoch's end): after the
      module's ``on_train_epoch_end`` (schedulers stepped), before Lightning closes the epoch;
    * SIGTERM (a preempted or cancelled cluster job) or SIGINT (Ctrl+C) while training, in a one-process run: the
      batch being trained finishes, ``last.ckpt`` is written as for a stop at that point, and :class:`StoppedBySignal`
      ends the run with exit code 143 or 130. A second SIGINT stops at once (nothing saved). Multi-process runs keep
      Lightning's own SIGTERM handling.

    :meth:`EBMModule.configure_callbacks` adds it; being a ``Checkpoint``, Lightning runs it after the other callbacks
    (the ``Timer`` of ``max_time`` decides first) and its epoch-end hook after the module's.
    """

    @staticmethod
    def _stopping(trainer: pl.Trainer) -> bool:
        max_steps = trainer.max_steps
        return bool(trainer.should_stop) or (max_steps is not None and 0 < max_steps <= trainer.global_step)

    def __init__(self):
        self._held: list = []  # ModelCheckpoints whose save_last is off until fit ends (see save_last)
        self._signal: int | None = None  # the signal received while training
        self._handlers: dict = {}  # the handlers ours replaced, put back when fit ends
        self._paths: list[str] = []

    def save_last(self, trainer: pl.Trainer) -> None:
        """Write ``last.ckpt`` of every ``ModelCheckpoint(save_last=...)`` now, and turn their ``save_last`` off
        until ``fit`` ends: ModelCheckpoint saves ``last.ckpt`` again in its ``on_train_end``, once the epoch has
        closed, which would replace this file by one whose resume skips the rest of the epoch."""
        from pytorch_lightning.callbacks import ModelCheckpoint

        diverged = bool(getattr(trainer.lightning_module, "divergence", None))
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.save_last and cb.dirpath:
                path = Path(cb.dirpath) / f"{cb.CHECKPOINT_NAME_LAST}{cb.FILE_EXTENSION}"
                # a divergence: the weights may already be those of the update that made the losses non-finite, so
                # none is written (and ModelCheckpoint's end-of-fit save is held too): `--ckpt_path last` then
                # resumes from the last checkpoint before it
                if not diverged:
                    trainer.save_checkpoint(path)
                    if str(path) not in self._paths:
                        self._paths.append(str(path))
                cb.last_model_path = str(path)  # its own file: a later save replaces it instead of writing last-v1
                self._held.append((cb, cb.save_last))
                cb.save_last = False
        trainer.lightning_module._saved_at_step = trainer.global_step

    def _release(self) -> None:
        for cb, save_last in self._held:
            cb.save_last = save_last
        self._held = []

    # ------------------------------------------------------------------------------------------------ signals
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._in_step = True

    def on_train_start(self, trainer, pl_module) -> None:
        self._signal, self._paths, self._in_step = None, [], False
        if trainer.world_size == 1 and threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._handlers[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        if self._signal is not None and signum == signal.SIGINT:  # the second Ctrl+C: now, unsaved
            raise KeyboardInterrupt
        self._signal = signum
        print(f"lebm-zoo: {signal.Signals(signum).name} received: stopping after this batch and writing last.ckpt"
              + (" (Ctrl+C again to stop at once, unsaved)" if signum == signal.SIGINT else ""), file=sys.stderr)

    def _restore_handlers(self) -> None:
        for signum, handler in self._handlers.items():
            signal.signal(signum, handler)
        self._handlers = {}

    def _stop_for_signal(self, trainer) -> None:
        if self._signal is not None:
            raise StoppedBySignal(self._signal, trainer.global_step, self._paths)

    # ------------------------------------------------------------------------------------------------ stops
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._in_step = False
        if (self._stopping(trainer) or self._signal is not None) and not epoch_completed(trainer):
            self.save_last(trainer)
            self._stop_for_signal(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        last_epoch = trainer.max_epochs is not None and 0 < trainer.max_epochs <= trainer.current_epoch + 1
        if epoch_completed(trainer) and (self._stopping(trainer) or last_epoch or self._signal is not None):
            pl_module._saving_at_epoch_end = True
            try:
                self.save_last(trainer)
            finally:
                pl_module._saving_at_epoch_end = False
            self._stop_for_signal(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        if getattr(pl_module, "_saved_at_step", None) != trainer.global_step:  # a stop neither hook saw
            self.save_last(trainer)

    def on_fit_end(self, trainer, pl_module) -> None:
        self._release()  # after every callback's on_train_end
        self._restore_handlers()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        """An error between training steps (a corrupt image while fetching the next batch): the weights are those of
        the last finished step, so ``last.ckpt`` is written before the run ends (one-process runs)."""
        between_steps = trainer.training and not getattr(self, "_in_step", True) and trainer.world_size == 1
        if between_steps and not isinstance(exception, (StoppedBySignal, KeyboardInterrupt)) and not self._held:
            try:
                self.save_last(trainer)
            except Exception as e:  # noqa: BLE001 - the original error is what the user must see
                print(f"lebm-zoo: could not write last.ckpt after the error: {type(e).__name__}: {e}", file=sys.stderr)
            else:
                if self._paths:
                    print(f"lebm-zoo: last.ckpt written at step {trainer.global_step} before the error: "
                          f"{', '.join(self._paths)}", file=sys.stderr)
        self._release()
        self._restore_handlers()
