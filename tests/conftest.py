import os
import shutil
import signal
import tempfile

import numpy as np
import pytest

# One compilation cache for the whole session, this process and the real processes tests start:
# many tests compile the same small programs (the document's model on the sample), and XLA's
# compile is most of their time on a CPU (the suite takes 8 minutes with it, 9.5 without, on the
# project's 2-core machine). Fresh per session, so no run depends on an earlier one.
_XLA_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _XLA_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxae-test-xla-cache-")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def pytest_sessionfinish(session, exitstatus):
    if _XLA_CACHE is not None:
        shutil.rmtree(_XLA_CACHE, ignore_errors=True)


from jaxae.data import load_dataset, write_idx  # noqa: E402 (after the cache settings: it imports JAX)


@pytest.fixture
def handled_sigint():
    """SIGINT handled as in an interactive Python while the test runs: a runner started in the
    background of a shell (``make test &``, nohup) ignores it, and a run then keeps it ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture(scope="session")
def sample_train():
    return load_dataset("mnist-sample", "train")


@pytest.fixture(scope="session")
def sample_test():
    return load_dataset("mnist-sample", "test")


@pytest.fixture
def idx_folder(tmp_path, sample_train, sample_test):
    """A small MNIST-format dataset folder: 512 train / 128 test real digits, uncompressed train."""
    rng = np.random.default_rng(0)
    tr = rng.choice(len(sample_train), 512, replace=False)
    te = rng.choice(len(sample_test), 128, replace=False)
    write_idx(tmp_path / "train-images-idx3-ubyte", sample_train.images[tr, :, :, 0])
    write_idx(tmp_path / "train-labels-idx1-ubyte", sample_train.labels[tr])
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", sample_test.images[te, :, :, 0])
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", sample_test.labels[te])
    return tmp_path
