"""TensorFlow Datasets as a source: a real prepared dataset read without TensorFlow, and names.

The fixture under ``tests/data/tfds`` is Fashion-MNIST cut to its first 2,000 train / 2,000 test images,
prepared by TFDS's own registered ``fashion_mnist`` builder in array_record format; how it was
made, and the checksums of the images it was made from, are in
``tests/data/prepare_tfds_fixture.py`` and ``tests/data/fashion_mnist_fixture.json``.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import jaxae
from jaxae import cli
from jaxae.data import load_dataset
from jaxae.errors import DataError


@pytest.mark.parametrize(
    "typed, suggested",
    [("fashion-mnist", "'fashion_mnist'"), ("fashion_mnsit", "'fashion_mnist'"), ("Fashion_MNIST", "'fashion_mnist'")],
)
def test_mistyped_tfds_name_gets_the_nearest_real_name(tmp_path, capsys, typed, suggested):
    code = cli.main(["train", "--dataset", typed, "--tfds-data-dir", str(tmp_path), "--workdir", str(tmp_path / "out")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"jaxae: error: unknown dataset {typed!r}")
    assert lines[0].endswith(f"did you mean {suggested}?")
    assert "tfds build" not in lines[0]  # never advice to build a dataset that does not exist
    assert not (tmp_path / "out").exists()


def test_unknown_name_without_a_near_one_points_at_the_catalog(tmp_path, capsys):
    code = cli.main(["train", "--dataset", "no_such_dataset_xyz", "--workdir", str(tmp_path / "out")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert "unknown dataset 'no_such_dataset_xyz'" in lines[0] and "did you mean" not in lines[0]
    assert "tensorflow.org/datasets/catalog" in lines[0]


def test_registered_but_unprepared_name_still_gets_the_build_command(tmp_path, capsys):
    code = cli.main(["train", "--dataset", "fashion_mnist:3.0.1", "--tfds-data-dir", str(tmp_path), "--no-progress"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert "tfds build fashion_mnist:3.0.1 --file_format=array_record" in lines[0]


FIXTURE = Path(__file__).resolve().parent / "data"
TFDS_DIR = FIXTURE / "tfds"
MANIFEST = json.loads((FIXTURE / "fashion_mnist_fixture.json").read_text())

# Python code that makes TensorFlow absent even where it is installed: every import finder is
# wrapped so that it finds no `tensorflow`, so `import tensorflow` fails and
# importlib.util.find_spec("tensorflow") is None, exactly as for a missing package. (A None entry
# in sys.modules would not do: TFDS takes "tensorflow" in sys.modules to mean TF is loaded.)
WITHOUT_TENSORFLOW = """
import sys

class HideTensorFlow:
    def __init__(self, finder):
        self.finder = finder

    def __getattr__(self, name):
        return getattr(self.finder, name)

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "tensorflow":
            return None
        return self.finder.find_spec(name, path, target)

sys.meta_path[:] = [HideTensorFlow(finder) for finder in sys.meta_path]
"""


def examples_sha256(images, labels) -> str:
    """The order-free digest of (image, label) pairs that tests/data/prepare_tfds_fixture.py
    recorded from the IDX files (TFDS shuffles examples when it writes them)."""
    digests = sorted(
        hashlib.sha256(bytes([int(y)]) + x.tobytes()).digest() for x, y in zip(images, labels, strict=True)
    )
    return hashlib.sha256(b"".join(digests)).hexdigest()


def _loaded_tensorflow_modules() -> list[str]:
    return [m for m in sys.modules if m.partition(".")[0] == "tensorflow"]


@pytest.mark.parametrize("split", ["train", "test"])
def test_tfds_fixture_reads_as_the_idx_images_it_was_made_from(split):
    ds = jaxae.load_dataset("fashion_mnist", split, data_dir=str(TFDS_DIR))
    expected = MANIFEST["splits"][split]
    assert ds.images.shape == (expected["num_examples"], 28, 28, 1) and ds.images.dtype == np.uint8
    assert ds.labels.shape == (expected["num_examples"],) and ds.labels.dtype == np.int32
    counts = dict(zip(*np.unique(ds.labels, return_counts=True), strict=True))
    assert {str(k): int(v) for k, v in counts.items()} == expected["label_counts"]
    assert examples_sha256(ds.images[..., 0], ds.labels) == expected["examples_sha256"]
    assert _loaded_tensorflow_modules() == []


def test_tfds_fixture_reads_without_tensorflow_and_without_the_opencv_warning():
    code = WITHOUT_TENSORFLOW + (
        "import importlib.util, json, jaxae\n"
        "assert importlib.util.find_spec('tensorflow') is None\n"
        f"ds = jaxae.load_dataset('fashion_mnist', 'test', data_dir={str(TFDS_DIR)!r})\n"
        "print(json.dumps([list(ds.images.shape), [m for m in sys.modules if m.partition('.')[0] == 'tensorflow']]))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    shape, tensorflow_modules = json.loads(proc.stdout.strip().splitlines()[-1])
    assert shape == [MANIFEST["splits"]["test"]["num_examples"], 28, 28, 1]
    assert tensorflow_modules == []
    assert "OpenCV" not in proc.stderr, proc.stderr


@pytest.mark.slow
def test_train_on_the_tfds_fixture_in_a_real_process_without_tensorflow(tmp_path):
    workdir = tmp_path / "run"
    args = ["train", "--dataset", "fashion_mnist", "--tfds-data-dir", str(TFDS_DIR), "--epochs", "1"]
    args += ["--batch-size", "128", "--workdir", str(workdir), "--no-progress"]
    code = WITHOUT_TENSORFLOW + "from jaxae.cli import main\nsys.exit(main())"
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "OpenCV" not in proc.stderr, proc.stderr
    (record,) = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert record["epoch"] == 1 and np.isfinite(record["test_mse"]) and record["test_mse"] < 0.2
    config = json.loads((workdir / "config.json").read_text())
    assert config["dataset"] == "fashion_mnist"


# ---------------------------------------------------------------------------------------------
# Image shapes from TFDS: colour and grayscale come out as (N, H, W, C); the rest is one line.


@pytest.mark.parametrize("name", ["cifar10", "svhn_cropped"])
def test_colour_tfds_datasets_load_as_n_32_32_3(name):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=6):  # random examples from the registered builder's features
        ds = jaxae.load_dataset(name, "train")
        shape = jaxae.dataset_image_shape(name)
    assert ds.images.shape == (6, 32, 32, 3) and ds.images.dtype == np.uint8
    assert ds.labels.shape == (6,) and ds.labels.dtype == np.int32 and 0 <= ds.labels.min() <= ds.labels.max() <= 9
    assert shape == (32, 32, 3)


def test_dataset_image_shape_of_the_tfds_fixture():
    assert jaxae.dataset_image_shape("fashion_mnist", data_dir=str(TFDS_DIR)) == (28, 28, 1)


def test_a_tfds_dataset_without_images_is_one_line():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=3), pytest.raises(jaxae.DataError) as info:
        jaxae.load_dataset("imdb_reviews", "train")
    assert str(info.value) == (
        "TFDS dataset 'imdb_reviews' has no 'image' feature (its features: 'label', 'text'); jaxae reads image "
        "datasets with an 'image' feature and an integer 'label' feature"
    )


def _fake_tfds_source(monkeypatch, examples):
    """``tfds.data_source`` returning ``examples`` (a list is what jaxae needs: len and indexing)."""
    tfds = pytest.importorskip("tensorflow_datasets")
    monkeypatch.setattr(tfds, "data_source", lambda *args, **kwargs: examples)


def _examples(*shapes, dtype=np.uint8, label=3):
    return [{"image": np.full(shape, 7, dtype), "label": label} for shape in shapes]


@pytest.mark.parametrize(
    "examples, pattern",
    [
        (_examples((32, 32, 4)), "images are 32x32x4, with 4 channels; jaxae takes grayscale (C=1) or RGB (C=3)"),
        (_examples((32, 32, 2)), "images are 32x32x2, with 2 channels; jaxae takes grayscale (C=1) or RGB (C=3)"),
        (_examples((6, 6, 3)), "images are 6x6; jaxae needs images of at least 8x8 pixels"),
        (_examples((16, 16, 3), dtype=np.float32), "images are float32; jaxae reads uint8 images"),
        (_examples((16, 16, 3), label=np.array([1, 0])), "'label' feature is int64 of shape (2,)"),
        (_examples((16, 16, 3), (16, 16, 3), (20, 16, 3)), "example 2 has a 20x16x3 image but example 0 a 16x16x3 one"),
        ([{"image": np.zeros((16, 16, 3), np.uint8)}], "has no 'label' feature (its features: 'image')"),
    ],
)
def test_tfds_images_jaxae_does_not_take_are_one_line(monkeypatch, examples, pattern):
    _fake_tfds_source(monkeypatch, examples)
    with pytest.raises(jaxae.DataError) as info:
        jaxae.load_dataset("cifar10", "train")
    assert pattern in str(info.value) and "\n" not in str(info.value)
    assert str(info.value).startswith("TFDS dataset 'cifar10'")


def test_tfds_grayscale_images_without_a_channel_axis_get_one(monkeypatch):
    _fake_tfds_source(monkeypatch, _examples((12, 10), (12, 10)))
    ds = jaxae.load_dataset("mnist", "test")
    assert ds.images.shape == (2, 12, 10, 1) and ds.labels.tolist() == [3, 3]
    assert jaxae.dataset_image_shape("mnist") == (12, 10, 1)


def test_a_tfds_name_with_a_config_is_not_taken_for_a_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"TFDS dataset 'emnist/letters' \(train\) is not prepared"):
        load_dataset("emnist/letters", "train", data_dir=str(tmp_path))
    with pytest.raises(DataError, match=r"dataset folder data/mine does not exist"):
        load_dataset("data/mine", "train")
