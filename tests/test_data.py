import gzip

import jax.numpy as jnp
import numpy as np
import pytest

from jaxae.data import NORMALIZATIONS, get_normalization, load_dataset, read_idx, write_idx
from jaxae.errors import DataError


def test_embedded_sample_is_real_balanced_mnist(sample_train, sample_test):
    assert sample_train.images.shape == (4000, 28, 28, 1)
    assert sample_test.images.shape == (1000, 28, 28, 1)
    assert sample_train.images.dtype == np.uint8 and sample_train.labels.dtype == np.int32
    assert np.bincount(sample_train.labels).tolist() == [400] * 10
    assert np.bincount(sample_test.labels).tolist() == [100] * 10
    # digits on a black background: mostly zeros, with full-intensity strokes
    assert (sample_train.images == 0).mean() > 0.7 and sample_train.images.max() == 255


@pytest.mark.parametrize("name", ["x-idx1-ubyte", "x-idx1-ubyte.gz"])
def test_idx_round_trip(tmp_path, name):
    arr = np.arange(60, dtype=np.uint8).reshape(3, 4, 5)
    write_idx(tmp_path / name, arr)
    np.testing.assert_array_equal(read_idx(tmp_path / name), arr)


def test_idx_folder_loads_both_splits(idx_folder):
    train = load_dataset(str(idx_folder), "train")
    test = load_dataset(str(idx_folder), "test")
    assert train.images.shape == (512, 28, 28, 1) and test.images.shape == (128, 28, 28, 1)
    assert len(train.labels) == 512


def test_idx_wrong_magic(tmp_path):
    (tmp_path / "f").write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(DataError, match="bad magic number"):
        read_idx(tmp_path / "f")


def test_idx_unsupported_type(tmp_path):
    (tmp_path / "f").write_bytes(b"\x00\x00\x0d\x01\x00\x00\x00\x01abcd")
    with pytest.raises(DataError, match="element type 0x0d"):
        read_idx(tmp_path / "f")


def test_idx_truncated_body(tmp_path):
    write_idx(tmp_path / "f", np.zeros((10, 28, 28), np.uint8))
    raw = (tmp_path / "f").read_bytes()
    (tmp_path / "f").write_bytes(raw[:-100])
    with pytest.raises(DataError, match=r"truncated: header shape \(10, 28, 28\) needs 7840 bytes"):
        read_idx(tmp_path / "f")


def test_idx_truncated_gzip(tmp_path):
    write_idx(tmp_path / "f.gz", np.random.default_rng(0).integers(0, 255, (50, 28, 28), dtype=np.uint8))
    raw = (tmp_path / "f.gz").read_bytes()
    (tmp_path / "f.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="cannot read IDX file"):
        read_idx(tmp_path / "f.gz")


def test_idx_empty_file(tmp_path):
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(tmp_path / "f")


def test_gzip_detected_by_content_not_name(tmp_path):
    arr = np.ones((2, 3), np.uint8)
    raw = bytes([0, 0, 8, 2]) + (2).to_bytes(4, "big") + (3).to_bytes(4, "big") + arr.tobytes()
    (tmp_path / "plain-name").write_bytes(gzip.compress(raw))
    np.testing.assert_array_equal(read_idx(tmp_path / "plain-name"), arr)


def test_folder_without_idx_files(tmp_path):
    (tmp_path / "readme.txt").write_text("nothing here")
    with pytest.raises(DataError, match="no train images IDX file"):
        load_dataset(str(tmp_path), "train")


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(str(tmp_path / "nope"), "train")


def test_image_label_count_mismatch(idx_folder):
    write_idx(idx_folder / "train-labels-idx1-ubyte", np.zeros(10, np.uint8))
    with pytest.raises(DataError, match="512 train images but 10 labels"):
        load_dataset(str(idx_folder), "train")


def test_unknown_split():
    with pytest.raises(DataError, match="unknown split"):
        load_dataset("mnist-sample", "validation")


def test_unknown_dataset_name():
    with pytest.raises(DataError, match="unknown dataset 'no_such_dataset_xyz'"):
        load_dataset("no_such_dataset_xyz", "train")


def test_tfds_not_prepared_says_how_to_fix(tmp_path):
    with pytest.raises(DataError, match="not prepared") as info:
        load_dataset("mnist", "train", data_dir=str(tmp_path))
    assert "tfds build mnist --file_format=array_record" in str(info.value)
    assert list(tmp_path.iterdir()) == []  # nothing downloaded or written


def test_tfds_data_source_path_under_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=12):
        ds = load_dataset("mnist", "train")
    assert ds.images.shape == (12, 28, 28, 1) and ds.images.dtype == np.uint8
    assert ds.labels.shape == (12,) and ds.labels.dtype == np.int32
    assert ds.labels.min() >= 0 and ds.labels.max() <= 9


def test_normalization_presets_match_torchvision_formula():
    u8 = jnp.array([0, 1, 127, 128, 255], jnp.uint8)
    unit = np.asarray(NORMALIZATIONS["unit"](u8))
    seed = np.asarray(NORMALIZATIONS["seed"](u8))
    np.testing.assert_array_equal(unit, np.array([0, 1, 127, 128, 255], np.float32) / np.float32(255))
    expected = (np.array([0, 1, 127, 128, 255], np.float32) / np.float32(255) - np.float32(0.5)) / np.float32(0.5)
    np.testing.assert_array_equal(seed, expected)
    assert seed[0] == -1 and seed[-1] == 1
    assert NORMALIZATIONS["seed"].low == -1 and NORMALIZATIONS["seed"].high == 1
    np.testing.assert_allclose(NORMALIZATIONS["seed"].to_pixels(seed), unit, atol=1e-7)
    with pytest.raises(DataError, match="unknown normalisation"):
        get_normalization("zscore")
