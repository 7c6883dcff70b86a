""":class:`BestCheckpoint`: the checkpoint of a run's best validation score, kept across resumes."""
from __future__ import annotations

from pathlib import Path

from pytorch_lightning.callbacks import ModelCheckpoint

__all__ = ["BestCheckpoint"]


class BestCheckpoint(ModelCheckpoint):
    """Keep one checkpoint: the one of the best value of a validation metric so far (``lebm-zoo test --ckpt_path
    best`` finds it through the run's ``last.ckpt``, see :func:`lebm_zoo.checkpoint.find_best_checkpoint`).

    It is Lightning's ``ModelCheckpoint(monitor=..., save_top_k=1, save_last=False)``, with one difference: a run
    resumed into another folder (``--ckpt_path last`` starts a new ``lightning_logs/version_N``) goes on comparing
    with the best score so far, as long as that checkpoint's file still exists; Lightning's own forgets the score then
    and keeps the first validation after the resume, however bad. A better score later is saved in the new folder
    (Lightning deletes no checkpoint outside its own folder, so the earlier one stays).

    Use it beside a ``ModelCheckpoint(save_last=True)``, which writes ``last.ckpt`` at every validation (a monitored
    ``ModelCheckpoint`` writes it only when the score improves), and list it before that one: callbacks save in
    their order, and ``last.ckpt`` records this one's state as it was when ``last.ckpt`` was written.

    Args:
        monitor: the logged metric, e.g. ``"val/ade"``. Validation must log it each time it runs (Lightning raises
            ``MisconfigurationException`` otherwise); with validation off nothing is saved.
        mode: ``"min"`` (lower is better) or ``"max"``.
        filename: the file name pattern (``{epoch:03d}`` becomes ``epoch=009``).
        dirpath: the folder (default: the run's ``checkpoints/`` folder).
    """

    def __init__(self, monitor: str, mode: str = "min", filename: str = "best-{epoch:03d}",
                 dirpath: str | None = None) -> None:
        super().__init__(dirpath=dirpath, filename=filename, monitor=monitor, mode=mode, save_top_k=1,
                         save_last=False)

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        best, score = state_dict.get("best_model_path"), state_dict.get("best_model_score")
        if self.best_model_score is None and best and score is not None and Path(best).is_file():
            self.best_model_score = score  # the folder changed: Lightning kept only the path
            self.best_k_models = {best: score}
            self.kth_best_model_path, self.kth_value = best, score
