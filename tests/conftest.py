import numpy as np
import pytest

from jaxae.data import load_dataset, write_idx


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
