"""A checkpoint's integrity: every file's digest, the state's and the metadata's, and how a read
tells damage from a live run's rotation (its newest checkpoint mid-commit, an old one deleted).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from orbax.checkpoint._src.path import atomicity

from jaxae.errors import JaxaeError

CHECKPOINT_DIR = "checkpoints"
# Written into each step folder once its save is complete: every file's size and SHA-256, so a
# deleted, truncated or overwritten file is found before Orbax reads it (a read failing halfway
# leaves Orbax's background reads behind, which print pages of errors when the process exits).
FILE_LIST = "jaxae_files.json"


class _ListingError(JaxaeError):
    """The checkpoints folder could not be listed (Orbax read a step's files as they went)."""


class DamagedCheckpointError(JaxaeError):
    """A checkpoint that exists but cannot be read back as it was saved.

    Attributes:
        step: the damaged checkpoint's step.
        older_steps: complete checkpoints before it, oldest first.
    """

    def __init__(self, message: str, step: int, older_steps: list[int]):
        super().__init__(message)
        self.step = step
        self.older_steps = older_steps


def checkpoint_dir(workdir: str | Path) -> Path:
    """``WORKDIR/checkpoints``, absolute (Orbax wants absolute paths)."""
    return Path(workdir).absolute() / CHECKPOINT_DIR


def step_dir(workdir: str | Path, step: int) -> Path:
    """The folder of one complete checkpoint."""
    return checkpoint_dir(workdir) / str(step)


def unfinished_saves(workdir: str | Path) -> list[Path]:
    """Temporary folders of saves that never completed (e.g. the process was killed)."""
    root = checkpoint_dir(workdir)
    return sorted(root.glob(f"*{atomicity.TMP_DIR_SUFFIX}*")) if root.is_dir() else []


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _file_listing(folder: Path) -> dict[str, Any]:
    """``{"files": {name: size}, "sha256": {name: hex}}`` (today's readers use only the sizes)."""
    paths = [p for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.startswith(FILE_LIST)]
    names = [p.relative_to(folder).as_posix() for p in paths]
    return {
        "files": {name: p.stat().st_size for name, p in zip(names, paths, strict=True)},
        "sha256": {name: _file_sha256(p) for name, p in zip(names, paths, strict=True)},
    }


def _check_files(workdir: str | Path, step: int, steps: list[int]) -> None:
    """Raises :class:`DamagedCheckpointError` if a file of the step's file list is gone or resized."""
    folder = step_dir(workdir, step)
    listing = folder / FILE_LIST
    if not listing.is_file():
        return  # a save from before file lists, or one killed right after its commit
    try:
        listed = json.loads(listing.read_bytes())
        files, digests = listed["files"], listed.get("sha256", {})
        if not all(isinstance(n, str) and type(z) is int for n, z in files.items()) or not isinstance(digests, dict):
            raise TypeError("not a file list")
    except (ValueError, KeyError, TypeError, AttributeError, OSError) as e:
        raise _damaged(workdir, step, steps, f"its file list {FILE_LIST} is unreadable") from e
    name = ""
    try:
        for name, size in files.items():
            path = folder / name
            if not path.is_file():
                raise _damaged(workdir, step, steps, f"{name} is missing")
            if path.stat().st_size != size:
                raise _damaged(workdir, step, steps, f"{name} has {path.stat().st_size} bytes, {size} when saved")
        for name in files:
            # Lists written before format 2 hold sizes only; then the digests in the metadata decide.
            if name in digests and _file_sha256(folder / name) != digests[name]:
                raise _damaged(workdir, step, steps, f"{name} does not match the SHA-256 saved with it")
    except OSError as e:  # a file that vanished (a rotated checkpoint) or cannot be read
        raise _damaged(workdir, step, steps, f"{name} cannot be read ({e.strerror or e})") from None


def _host_array(x: Any) -> np.ndarray | None:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        # A global array of a multi-process run: only a replicated one has its whole value here.
        return np.asarray(x.addressable_data(0)) if x.is_fully_replicated else None
    return np.asarray(x)


def state_digest(state: Any) -> str | None:
    """SHA-256 over every leaf's path, dtype, shape and bytes (None if not all on this host)."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        a = _host_array(leaf)
        if a is None:
            return None
        h.update(f"{jax.tree_util.keystr(path)}:{a.dtype}:{a.shape};".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _canonical_json(value: Any) -> bytes:
    # Sorted keys, no spaces, ASCII: the same bytes for the same JSON value, however it was
    # written (Python's float repr round-trips, so a value read back serialises identically).
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def meta_digest(meta: dict[str, Any]) -> str:
    """SHA-256 of a checkpoint's metadata as canonical JSON, without its own ``meta_sha256``.

    The metadata holds ``state_sha256``, so this one digest covers everything a checkpoint holds.
    """
    return hashlib.sha256(_canonical_json({k: v for k, v in meta.items() if k != "meta_sha256"})).hexdigest()


_ROTATION_RETRIES = 20


def _latest_of_a_live_run(workdir: str | Path, step: int | None, read: Any) -> Any:
    """``read(step)``; for the latest checkpoint (``step`` None), read again while the one picked
    was deleted under the read by a training that keeps ``--keep`` checkpoints and saved a newer one.

    A checkpoint deleted that way is no damage: its files go while a newer complete one exists.
    """
    for _ in range(_ROTATION_RETRIES):
        try:
            return read(step)
        except DamagedCheckpointError as e:
            if step is not None or not (_rotated_away(workdir, e.step) or _run_is_live(workdir)):
                raise
        except _ListingError:
            if step is not None:
                raise
        time.sleep(0.1)  # let the deletion, or the commit, finish
    return read(step)


# A run's lock in its workdir (jaxae.loop.WorkdirLock); its holder writes "PID HOST" beside it.
LOCK_FILE = ".jaxae.lock"


def lock_holder_path(lock_path: str | Path) -> Path:
    """The file beside a workdir lock where its holder writes ``"PID HOST"``."""
    lock_path = Path(lock_path)
    return lock_path.with_name(lock_path.name + ".holder")


def read_lock_holder(lock_path: str | Path) -> tuple[str, str] | None:
    """``(pid, host)`` of the process holding the lock at ``lock_path``, or None if unknown."""
    try:
        pid, host = lock_holder_path(lock_path).read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return pid, host


def _run_is_live(workdir: str | Path) -> bool:
    """Whether a run is training in ``workdir`` now (its lock's holder is a live process): its
    latest checkpoint may be mid-commit or mid-deletion, so a failed read of it is worth another."""
    holder = read_lock_holder(Path(workdir) / LOCK_FILE)
    if holder is None:
        return False
    pid, host = holder
    if host != socket.gethostname():
        return True
    try:
        os.kill(int(pid), 0)
    except PermissionError:
        return True  # alive, another user's
    except (OSError, ValueError):
        return False
    return int(pid) != os.getpid()


def _rotated_away(workdir: str | Path, step: int) -> bool:
    """Whether checkpoint ``step`` may have been read as a running training deleted it: it is gone,
    a newer checkpoint exists, or a save is in flight (the folder is listed, not opened with Orbax,
    whose reads of a damaged checkpoint are still settling)."""
    if not step_dir(workdir, step).is_dir():
        return True
    try:
        names = os.listdir(checkpoint_dir(workdir))
    except OSError:
        return True
    return any(n.isdigit() and int(n) > step for n in names) or any(atomicity.TMP_DIR_SUFFIX in n for n in names)


def _damaged(workdir: str | Path, step: int, steps: list[int], why: str) -> DamagedCheckpointError:
    older = [s for s in steps if s < step]
    path = step_dir(workdir, step)
    if older:
        offer = (
            f"older complete checkpoints: steps {', '.join(map(str, older))}; read one with --step {older[-1]}, "
            f"or delete {path} and --resume continues from step {older[-1]}"
        )
    else:
        offer = "there is no older checkpoint to fall back on"
    return DamagedCheckpointError(f"checkpoint {path} is damaged ({why}); {offer}", step, older)
