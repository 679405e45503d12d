"""The exception types jaxae raises.

The CLI turns a :class:`JaxaeError` (bad input) into a one-line message on stderr and exit
status 2, and a :class:`CheckpointSaveError` (failed storage) into one line and exit status 1;
anything else is a bug and keeps its traceback.
"""


class JaxaeError(Exception):
    """Bad input from the user: a missing file, a wrong shape, an impossible setting."""


class DataError(JaxaeError):
    """A dataset that cannot be found, read or used as asked."""


class TrainingInterrupted(Exception):
    """Training stopped cleanly on SIGINT or SIGTERM, after saving a checkpoint.

    Not a :class:`JaxaeError`: nothing was wrong with the input. The CLI exits with
    :attr:`exit_status` (130 for SIGINT, 143 for SIGTERM, as a shell reports them).

    Attributes:
        signum: the signal received.
        epoch: epochs completed when training stopped.
        step: the step of the latest complete checkpoint (None if there is none).
        checkpoint: that checkpoint's folder (None if there is none).
    """

    def __init__(self, message: str, *, signum: int, epoch: int, step: int | None, checkpoint: str | None):
        super().__init__(message)
        self.signum = signum
        self.epoch = epoch
        self.step = step
        self.checkpoint = checkpoint

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


class CheckpointSaveError(Exception):
    """A checkpoint could not be written (disk full, I/O error, permission denied, ...).

    Not a :class:`JaxaeError`: the input was fine, the storage failed. Training stops at the
    first failed save; the CLI prints the message as one line and exits with status 1.

    Attributes:
        step: the step whose save failed.
        last_complete_step: the latest checkpoint complete on disk (None if there is none).
    """

    def __init__(self, message: str, *, step: int, last_complete_step: int | None):
        super().__init__(message)
        self.step = step
        self.last_complete_step = last_complete_step
