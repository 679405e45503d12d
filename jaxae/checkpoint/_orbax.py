"""Orbax's aftermath: what its background threads print after a failed save or read, which jaxae
reports itself in one line, and the test hook that holds a save open."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import warnings
from typing import Any

from orbax.checkpoint._src.path import atomicity

from jaxae.checkpoint.integrity import CHECKPOINT_DIR


class _SlowCommit(atomicity.AtomicRenameTemporaryPath):
    """Holds a step's commit (the rename out of its temporary folder) for a while: tests only."""

    seconds = 0.0

    async def finalize(self, *args, **kwargs):
        if self.get_final().parent.name == CHECKPOINT_DIR:  # the step folder, not its items
            await asyncio.sleep(self.seconds)
        await super().finalize(*args, **kwargs)


def _is_orbax_aftermath(unraisable: Any) -> bool:
    """An exception Orbax's abandoned background work raises where nobody can catch it.

    After a failed save or read, Orbax's remaining writes and reads still complete on threads
    whose event loop is closed, or are finalised at exit; each prints a traceback. The failure
    itself reaches the caller as one exception, so these are noise.
    """
    exc = unraisable.exc_value
    if isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc):
        return True
    code = getattr(unraisable.object, "cr_code", None)  # an abandoned coroutine
    if code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename:
        return True
    return _through_orbax(unraisable.exc_traceback)


class _DropOrbaxErrors(logging.Filter):
    # Orbax logs each background failure (with its traceback) before the caller sees it; jaxae
    # raises it as one exception naming the checkpoint. Orbax's warnings and info still pass.
    # A missing metadata file is reported by jaxae itself where it matters (the file lists); Orbax
    # also warns of one while it lists a checkpoint a running training is deleting.
    def filter(self, record: logging.LogRecord) -> bool:
        if f"{os.sep}orbax{os.sep}" not in record.pathname:
            return True
        missing = record.levelno == logging.WARNING and str(record.msg).startswith("Metadata file does not exist")
        return not (record.levelno >= logging.ERROR or missing)


def _through_orbax(tb: Any) -> bool:
    while tb is not None:
        if f"{os.sep}orbax{os.sep}" in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False


class _DropOrbaxUnretrievedTasks(logging.Filter):
    # When Orbax's write tasks fail after the save has already been reported, asyncio finds
    # their exceptions unretrieved when the tasks and futures are collected (often at exit) and
    # logs each with a traceback ("Task/Future exception was never retrieved"). Only those whose
    # exception was raised through Orbax's code, or while writing an Orbax temporary folder, are dropped.
    def filter(self, record: logging.LogRecord) -> bool:
        if "exception was never retrieved" not in record.getMessage() or not record.exc_info:
            return True
        _, exc, tb = record.exc_info
        # TensorStore's futures carry no Python frames; their error names the Orbax temporary folder.
        return not (_through_orbax(tb) or atomicity.TMP_DIR_SUFFIX in str(exc))


_quiet_installed = False


def _quiet_orbax_aftermath() -> None:
    """Installs (once) the filters that keep Orbax's background failures off stderr."""
    global _quiet_installed
    # The same abandoned coroutines, when collected, warn that they were never awaited; the
    # warning names only the coroutine, so this silences that warning for every coroutine. Added
    # each time (filterwarnings keeps one copy): a catch_warnings block may have dropped it.
    warnings.filterwarnings("ignore", message=r"coroutine '.*' was never awaited", category=RuntimeWarning)
    if _quiet_installed:
        return
    _quiet_installed = True
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        if not _is_orbax_aftermath(unraisable):
            previous(unraisable)

    sys.unraisablehook = hook
    logging.getLogger("absl").addFilter(_DropOrbaxErrors())
    logging.getLogger("asyncio").addFilter(_DropOrbaxUnretrievedTasks())
