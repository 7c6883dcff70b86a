"""Writing checkpoints safely: :class:`AtomicCheckpointIO`, the checkpoint I/O of ``lebm-zoo`` runs."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from lightning_fabric.utilities.cloud_io import get_filesystem
from pytorch_lightning.plugins.io import TorchCheckpointIO

__all__ = ["AtomicCheckpointIO", "TMP_PREFIX"]

#: name prefix of a checkpoint being written (``.<name>.tmp-<pid>`` beside the target file)
TMP_PREFIX = "."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoint I/O that writes a local checkpoint beside its target and renames it into place.

    Lightning's default writes through an fsspec transaction, whose temporary file lives in the system's temp folder:
    a run killed while saving (``kill -9``, out of memory, a preempted job) leaves a file of the checkpoint's size
    there (tens of MB for the image recipes) that nothing removes. Here the file is written as
    ``.<name>.tmp-<pid>`` in the checkpoint's own folder, flushed, and renamed onto ``<name>`` (atomic on POSIX: a
    reader sees the old checkpoint or the new one, never half of one); the temporary files of dead processes are
    removed from that folder at the next save. Remote paths (``s3://``, ...) keep Lightning's behaviour.
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        protocol = get_filesystem(path).protocol
        if storage_options is not None or "file" not in (protocol if isinstance(protocol, tuple) else (protocol,)):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.remove_stale_temporaries(path.parent)
        tmp = path.with_name(f"{TMP_PREFIX}{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    @staticmethod
    def remove_stale_temporaries(folder: Path) -> list[Path]:
        """Delete ``.*.tmp-<pid>`` files of processes that no longer run in ``folder``; returns what was removed."""
        removed = []
        for p in folder.glob(f"{TMP_PREFIX}*.tmp-*"):
            pid = p.name.rsplit("-", 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                p.unlink(missing_ok=True)
                removed.append(p)
        return removed
