import builtins
import errno
import gzip
import io
import os
import struct
import tempfile
import time
import tracemalloc
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxae import data as data_module
from jaxae.data import (
    NORMALIZATIONS,
    Dataset,
    dataset_image_shape,
    get_normalization,
    load_dataset,
    read_idx,
    write_idx,
    write_idx_folder,
)
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


def test_a_plain_idx_file_is_mapped_and_a_gzipped_one_decompressed_into_one_array(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (2000, 64, 64), dtype=np.uint8)  # 8 MiB
    write_idx(tmp_path / "a-idx3-ubyte", images)
    write_idx(tmp_path / "a-idx3-ubyte.gz", images)
    tracemalloc.start()
    try:
        plain = read_idx(tmp_path / "a-idx3-ubyte")
        plain_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        packed = read_idx(tmp_path / "a-idx3-ubyte.gz")
        packed_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert isinstance(plain, np.memmap) and not plain.flags.writeable
    assert not packed.flags.writeable  # read-only as the mapped one is: a split is never changed in place
    np.testing.assert_array_equal(plain, images)
    np.testing.assert_array_equal(packed, images)
    assert plain_peak < images.nbytes / 100, plain_peak  # nothing of the data's size was allocated
    # One array of the data's size and gzip's buffers (chunks joined into bytes peaked at twice it).
    assert packed_peak < images.nbytes + 2 * 2**20, packed_peak / images.nbytes
    loaded = load_dataset(str(_folder_of(tmp_path / "folder", images)), "train")
    assert isinstance(loaded.images.base, np.memmap) or isinstance(loaded.images, np.memmap)


def test_write_idx_replaces_a_file_so_a_run_that_mapped_it_keeps_the_old_contents(tmp_path):
    path = tmp_path / "a-idx3-ubyte"
    old, new = _images(50, 16, 16, seed=1), _images(50, 16, 16, seed=2)
    write_idx(path, old)
    mapped = read_idx(path)
    write_idx(path, new)  # before: written in place, so the mapped array changed under the run
    np.testing.assert_array_equal(mapped, old)
    np.testing.assert_array_equal(read_idx(path), new)
    assert [p.name for p in tmp_path.iterdir()] == ["a-idx3-ubyte"]  # no partial file left beside it


def test_the_file_whose_size_was_checked_is_the_file_mapped(tmp_path, monkeypatch):
    """A file replaced under its name while it is read: the map is of the open file, not a second
    open of the name (which mapped the replacement, whose size was never checked)."""
    path = tmp_path / "a-idx3-ubyte"
    old = _images(40, 16, 16, seed=3)
    write_idx(path, old)
    write_idx(tmp_path / "other", _images(80, 16, 16, seed=4))
    real = data_module._read_up_to
    calls = []

    def replace_after_the_header(stream, n):
        out = real(stream, n)
        calls.append(n)
        if len(calls) == 2:  # the dimensions are read: swap the file under its name
            os.replace(tmp_path / "other", path)
        return out

    monkeypatch.setattr(data_module, "_read_up_to", replace_after_the_header)
    np.testing.assert_array_equal(read_idx(path), old)


@pytest.mark.parametrize("complete", [False, True])
def test_a_gzip_header_too_large_to_allocate_says_truncated_or_too_large(tmp_path, monkeypatch, complete):
    """Where the allocation of a gzip's declared body fails, the stream is counted: a header the
    data does not fill is a corrupt or truncated file, not a lack of memory."""
    path = tmp_path / "a-idx3-ubyte.gz"
    images = _images(300, 16, 16)
    raw = _idx_header(300 if complete else 3000, 16, 16) + images.tobytes()
    path.write_bytes(gzip.compress(raw, mtime=0))
    real_empty = np.empty

    def refuse_large(shape, *args, **kwargs):
        if np.prod(shape) >= 300 * 16 * 16:
            raise MemoryError
        return real_empty(shape, *args, **kwargs)

    monkeypatch.setattr(data_module.np, "empty", refuse_large)
    message = "does not fit in memory: header shape" if complete else r"is truncated: header shape \(3000, 16, 16\)"
    with pytest.raises(DataError, match=message):
        read_idx(path)


def test_dataset_from_arrays_keeps_a_mapped_split_mapped(tmp_path):
    write_idx(tmp_path / "a-idx3-ubyte", _images(100, 16, 16))
    mapped = read_idx(tmp_path / "a-idx3-ubyte")
    dataset = Dataset.from_arrays(mapped)
    assert np.shares_memory(dataset.images, mapped)  # before: astype(uint8) copied it whole


def _folder_of(folder: Path, images: np.ndarray) -> Path:
    labels = np.zeros(len(images), np.uint8)
    return write_idx_folder(folder, train=(images, labels), test=(images[:10], labels[:10]), compress=False)


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


# ---------------------------------------------------------------------------------------------
# Hostile or malformed IDX files: always a DataError naming the file, never another exception.


def _idx_header(*dims):
    return bytes([0, 0, 0x08, len(dims)]) + struct.pack(f">{len(dims)}I", *dims)


@pytest.mark.parametrize(
    "dims",
    [
        (65536, 65536, 65536, 65536),  # 2**64 elements: wraps to 0 in int64, matching an empty body
        (0, 2**32 - 1, 2**32 - 1),  # zero elements, but a shape numpy cannot index
        (2**32 - 1,) * 8,
    ],
)
@pytest.mark.parametrize("compress", [False, True])
def test_idx_header_whose_size_overflows_int64(tmp_path, dims, compress):
    raw = _idx_header(*dims)
    path = tmp_path / "f"
    path.write_bytes(gzip.compress(raw) if compress else raw)
    with pytest.raises(DataError, match=str(path)):
        read_idx(path)


def test_idx_gzip_with_an_invalid_deflate_block(tmp_path):
    raw = bytearray(gzip.compress(_idx_header(4, 28, 28) + bytes(range(256)) * 12 + bytes(64), mtime=0))
    raw[10] = 0xFF  # first deflate block header: BTYPE 11, which deflate reserves as invalid
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=f"cannot read IDX file {path}: corrupt or truncated gzip data"):
        read_idx(path)


def _gzip_bomb(path, header, expanded_mib):
    """A valid gzip stream: ``header`` then ``expanded_mib`` MiB of zeros, in a file of a few hundred KB.

    Built from concatenated gzip members (a gzip file may hold several), so it costs no time to make.
    """
    zeros = gzip.compress(bytes(1 << 24), compresslevel=9, mtime=0)  # 16 MiB -> ~16 KB
    with open(path, "wb") as f:
        f.write(gzip.compress(header, mtime=0))
        for _ in range(expanded_mib // 16):
            f.write(zeros)


def test_idx_gzip_bomb_is_refused_without_decompressing_it(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    _gzip_bomb(path, _idx_header(10, 28, 28), expanded_mib=2048)  # 2 GiB behind a 7840-byte header
    assert path.stat().st_size < 4 << 20
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(DataError, match="longer than its header says"):
            read_idx(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # Reading stops one byte past the declared payload: nothing near the 2 GiB is decompressed or held.
    assert time.perf_counter() - t0 < 2.0
    assert peak < 8 << 20, peak


def test_idx_gzip_header_claiming_more_than_the_file_can_hold(tmp_path):
    path = tmp_path / "f.gz"
    path.write_bytes(gzip.compress(_idx_header(60000, 28, 28), mtime=0))  # 47 MB promised by ~40 bytes
    with pytest.raises(DataError, match="more than a gzip file of its size can hold"):
        read_idx(path)


def _write_split(folder, split, images, labels):
    prefix = "train" if split == "train" else "t10k"
    write_idx(folder / f"{prefix}-images-idx3-ubyte", images)
    write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels)


def test_train_and_test_images_of_different_sizes(tmp_path):
    _write_split(tmp_path, "train", np.zeros((8, 28, 28), np.uint8), np.arange(8, dtype=np.uint8) % 2)
    _write_split(tmp_path, "test", np.zeros((4, 20, 20), np.uint8), np.arange(4, dtype=np.uint8) % 2)
    for split in ("train", "test"):
        with pytest.raises(
            DataError, match="are 28x28x1 but the .* images are 20x20x1|are 20x20x1 but the .* are 28x28x1"
        ):
            load_dataset(str(tmp_path), split)


@pytest.mark.parametrize("side", [1, 4, 7])
def test_images_smaller_than_8x8_are_refused(tmp_path, side):
    _write_split(tmp_path, "train", np.zeros((8, side, side), np.uint8), np.arange(8, dtype=np.uint8) % 2)
    _write_split(tmp_path, "test", np.zeros((4, side, side), np.uint8), np.arange(4, dtype=np.uint8) % 2)
    with pytest.raises(DataError, match=f"images are {side}x{side}; jaxae needs images of at least 8x8"):
        load_dataset(str(tmp_path), "train")


def test_non_square_images_at_the_minimum_load(tmp_path):
    _write_split(tmp_path, "train", np.zeros((8, 8, 12), np.uint8), np.arange(8, dtype=np.uint8) % 2)
    _write_split(tmp_path, "test", np.zeros((4, 8, 12), np.uint8), np.arange(4, dtype=np.uint8) % 2)
    assert load_dataset(str(tmp_path), "test").images.shape == (4, 8, 12, 1)


def _deny(monkeypatch, target, method):
    """Makes ``Path.method`` raise PermissionError for ``target`` (as root, chmod stops no read)."""
    original = getattr(Path, method)

    def denied(self, *args, **kwargs):
        if Path(self) == target or target in Path(self).parents:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Path, method, denied)


@pytest.mark.parametrize("method", ["is_dir", "is_file"])
def test_unreadable_folder_names_it(idx_folder, monkeypatch, method):
    _deny(monkeypatch, idx_folder, method)
    with pytest.raises(DataError, match=f"cannot read dataset folder {idx_folder}: Permission denied"):
        load_dataset(str(idx_folder), "train")


def test_unreadable_file_names_it(idx_folder, monkeypatch):
    target = idx_folder / "train-images-idx3-ubyte"
    real_open = builtins.open

    def denied(file, *args, **kwargs):
        if str(file) == str(target):
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", denied)
    monkeypatch.setattr(io, "open", denied)  # what pathlib's read_bytes calls
    with pytest.raises(DataError, match=f"cannot read IDX file {target}: Permission denied"):
        load_dataset(str(idx_folder), "train")


# ---------------------------------------------------------------------------------------------
# Property-based: whatever the bytes, the IDX reader returns an array or raises DataError.

_FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _read_or_data_error(path):
    try:
        array = read_idx(path)
    except DataError as e:
        assert str(path) in str(e) and "\n" not in str(e)
        return None
    assert array.dtype == np.uint8
    return array


@_FAST
@given(data=st.binary(max_size=300), wrap=st.sampled_from(["raw", "gzip", "gzip-magic"]))
def test_idx_any_bytes_give_an_array_or_a_data_error(tmp_path, data, wrap):
    if wrap == "gzip":
        data = gzip.compress(data, mtime=0)
    elif wrap == "gzip-magic":  # a gzip header over arbitrary bytes: corrupt deflate streams
        data = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff" + data
    path = tmp_path / "f"
    path.write_bytes(data)
    _read_or_data_error(path)


@_FAST
@given(
    dims=st.lists(st.sampled_from([0, 0, 1, 2, 3, 5, 28, 255, 65536, 2**31, 2**32 - 1]), min_size=0, max_size=6),
    ndim_lie=st.sampled_from([0, 0, 0, -1, 1]),
    type_code=st.sampled_from([0x08, 0x08, 0x08, 0x09, 0x0D]),
    payload=st.binary(max_size=200),
    cut=st.one_of(st.none(), st.none(), st.integers(0, 240)),
    compress=st.booleans(),
    gzip_damage=st.one_of(st.none(), st.integers(0, 80), st.tuples(st.integers(0, 80), st.integers(1, 255))),
)
def test_idx_near_valid_files_give_an_array_or_a_data_error(
    tmp_path, dims, ndim_lie, type_code, payload, cut, compress, gzip_damage
):
    ndim = max(0, min(255, len(dims) + ndim_lie))
    raw = bytes([0, 0, type_code, ndim]) + struct.pack(f">{len(dims)}I", *dims) + payload
    if cut is not None:
        raw = raw[:cut]
    if compress:
        raw = gzip.compress(raw, mtime=0)
        if isinstance(gzip_damage, int):  # truncated
            raw = raw[:gzip_damage]
        elif gzip_damage is not None and gzip_damage[0] < len(raw):  # one byte flipped
            at, xor = gzip_damage
            raw = raw[:at] + bytes([raw[at] ^ xor]) + raw[at + 1 :]
    path = tmp_path / "f"
    path.write_bytes(raw)
    array = _read_or_data_error(path)
    if array is not None:
        assert array.size == len(raw if not compress else gzip.decompress(raw)) - 4 - 4 * array.ndim


@_FAST
@given(n=st.integers(1, 4), h=st.integers(1, 12), w=st.integers(1, 12), compress=st.booleans())
def test_idx_valid_files_round_trip(tmp_path, n, h, w, compress):
    array = np.random.default_rng(n * 1000 + h * 13 + w).integers(0, 256, (n, h, w), dtype=np.uint8)
    path = tmp_path / ("f.gz" if compress else "f")
    write_idx(path, array)
    np.testing.assert_array_equal(read_idx(path), array)


# ---------------------------------------------------------------------------------------------
# Image shapes H x W x C: grayscale idx3 and colour idx4 folders, one check where images enter.


def _images(n, *shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


def _labels(n):
    return (np.arange(n) % 10).astype(np.uint8)


def _write_split_as(folder, split, images, labels, images_name):
    """One split with the images under an explicit file name (any dimension count)."""
    prefix = "train" if split == "train" else "t10k"
    write_idx(folder / images_name.format(prefix=prefix), images)
    write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels)


@pytest.mark.parametrize("compress", [False, True])
def test_colour_idx_folder_round_trip(tmp_path, compress):
    train, test = (_images(6, 32, 32, 3, seed=1), _labels(6)), (_images(4, 32, 32, 3, seed=2), _labels(4))
    write_idx_folder(tmp_path, train=train, test=test, compress=compress)
    suffix = ".gz" if compress else ""
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"{prefix}-{kind}-idx{n}-ubyte{suffix}"
        for prefix in ("train", "t10k")
        for kind, n in (("images", 4), ("labels", 1))
    )
    assert read_idx(tmp_path / f"train-images-idx4-ubyte{suffix}").shape == (6, 32, 32, 3)
    for split, (images, labels) in (("train", train), ("test", test)):
        ds = load_dataset(str(tmp_path), split)
        assert ds.images.dtype == np.uint8 and ds.image_shape == (32, 32, 3)
        np.testing.assert_array_equal(ds.images, images)
        np.testing.assert_array_equal(ds.labels, labels.astype(np.int32))


def test_grayscale_folders_are_written_as_standard_idx3_files(tmp_path):
    images = _images(5, 12, 10)
    write_idx_folder(tmp_path, train=(images[..., None], _labels(5)), test=(images, _labels(5)), compress=False)
    assert read_idx(tmp_path / "train-images-idx3-ubyte").shape == (5, 12, 10)  # 3-D, as MNIST's are
    assert read_idx(tmp_path / "t10k-images-idx3-ubyte").shape == (5, 12, 10)
    np.testing.assert_array_equal(load_dataset(str(tmp_path), "test").images, images[..., None])


@pytest.mark.parametrize(
    "name", ["{prefix}-images-idx4-ubyte.gz", "{prefix}-images.idx4-ubyte", "{prefix}-images-idx3-ubyte"]
)
def test_idx4_images_load_under_any_accepted_name(tmp_path, name):
    # The name only finds the file; the header's dimension count decides the shape, so an
    # idx3-named file holding (N, H, W, C) is read as what it holds.
    images = _images(4, 9, 11, 3)
    for split in ("train", "test"):
        _write_split_as(tmp_path, split, images, _labels(4), name)
    np.testing.assert_array_equal(load_dataset(str(tmp_path), "train").images, images)


def test_a_folder_mixing_idx3_and_idx4_names_across_splits_loads(tmp_path):
    # train as an MNIST-standard idx3 file (N, H, W), test as a dotted idx4 file (N, H, W, 1): one shape
    _write_split_as(tmp_path, "train", _images(4, 10, 10), _labels(4), "{prefix}-images-idx3-ubyte.gz")
    _write_split_as(tmp_path, "test", _images(3, 10, 10, 1), _labels(3), "{prefix}-images.idx4-ubyte")
    assert load_dataset(str(tmp_path), "train").images.shape == (4, 10, 10, 1)
    assert load_dataset(str(tmp_path), "test").images.shape == (3, 10, 10, 1)
    assert dataset_image_shape(str(tmp_path)) == (10, 10, 1)


def test_a_folder_with_both_idx3_and_idx4_images_for_one_split_is_refused(tmp_path):
    _write_split_as(tmp_path, "train", _images(4, 28, 28), _labels(4), "{prefix}-images-idx3-ubyte.gz")
    write_idx(tmp_path / "train-images-idx4-ubyte", _images(4, 28, 28, 3))
    _write_split_as(tmp_path, "test", _images(4, 28, 28), _labels(4), "{prefix}-images-idx3-ubyte")
    with pytest.raises(DataError) as info:
        load_dataset(str(tmp_path), "train")
    message = str(info.value)
    assert "train-images-idx3-ubyte.gz and train-images-idx4-ubyte" in message and "\n" not in message
    # the test split alone is unambiguous and loads; the broken train split is its own error
    assert load_dataset(str(tmp_path), "test").image_shape == (28, 28, 1)


def test_a_folder_without_images_names_both_idx3_and_idx4(tmp_path):
    write_idx(tmp_path / "train-labels-idx1-ubyte", _labels(4))
    with pytest.raises(DataError, match="looked for train-images-idx3-ubyte or train-images-idx4-ubyte"):
        load_dataset(str(tmp_path), "train")


@pytest.mark.parametrize("shape", [(4, 784), (4, 8, 8, 3, 2), (4, 8, 8, 1, 1, 1)])
def test_image_files_of_another_dimension_count_are_refused(tmp_path, shape):
    for split in ("train", "test"):
        _write_split_as(tmp_path, split, np.zeros(shape, np.uint8), _labels(4), "{prefix}-images-idx3-ubyte")
    path = tmp_path / "train-images-idx3-ubyte"
    with pytest.raises(DataError) as info:
        load_dataset(str(tmp_path), "train")
    assert str(info.value) == (
        f"image IDX file {path} has {len(shape)} dimensions {shape}, expected (N, H, W) or (N, H, W, C)"
    )


@pytest.mark.parametrize(
    "channels, advice",
    [
        (2, "keep the first channel: images[..., :1]"),
        (4, "drop the alpha channel: images[..., :3]"),
        (5, "jaxae takes grayscale (C=1) or RGB (C=3) images"),
    ],
)
def test_images_with_other_than_1_or_3_channels_are_refused(tmp_path, channels, advice):
    for split in ("train", "test"):
        _write_split_as(tmp_path, split, _images(4, 16, 16, channels), _labels(4), "{prefix}-images-idx4-ubyte")
    with pytest.raises(DataError) as info:
        load_dataset(str(tmp_path), "train")
    message = str(info.value)
    assert f"images are 16x16x{channels}, with {channels} channels; jaxae takes grayscale (C=1) or RGB (C=3)" in message
    assert advice in message and str(tmp_path / "train-images-idx4-ubyte") in message


def test_channels_first_images_get_told_to_transpose(tmp_path):
    for split in ("train", "test"):
        _write_split_as(tmp_path, split, _images(4, 3, 32, 32), _labels(4), "{prefix}-images-idx4-ubyte")
    with pytest.raises(DataError, match=r"channels-first: jaxae wants \(H, W, C\)"):
        load_dataset(str(tmp_path), "test")


def test_colour_images_smaller_than_8x8_are_refused(tmp_path):
    for split in ("train", "test"):
        _write_split_as(tmp_path, split, _images(4, 7, 7, 3), _labels(4), "{prefix}-images-idx4-ubyte")
    with pytest.raises(DataError, match="images are 7x7; jaxae needs images of at least 8x8"):
        load_dataset(str(tmp_path), "train")


@pytest.mark.parametrize("test_shape", [(32, 32, 1), (28, 28, 3), (32, 32)])
def test_train_and_test_images_of_different_shapes(tmp_path, test_shape):
    _write_split_as(tmp_path, "train", _images(4, 32, 32, 3), _labels(4), "{prefix}-images-idx4-ubyte")
    _write_split_as(
        tmp_path, "test", _images(4, *test_shape), _labels(4), f"{{prefix}}-images-idx{len(test_shape) + 1}-ubyte"
    )
    other = "x".join(str(v) for v in (*test_shape, 1)[:3])
    with pytest.raises(DataError, match=f"the train images are 32x32x3 but the test images are {other} "):
        load_dataset(str(tmp_path), "train")
    with pytest.raises(DataError, match=f"the test images are {other} but the train images are 32x32x3 "):
        load_dataset(str(tmp_path), "test")
    with pytest.raises(DataError, match=f"the train images are 32x32x3 but the test images are {other} "):
        dataset_image_shape(str(tmp_path))  # train first, as a run reads them


def test_dataset_image_shape_of_the_sample_and_of_idx_folders(tmp_path, idx_folder, monkeypatch):
    import jaxae.data

    def no_body_reads(path):
        raise AssertionError(f"dataset_image_shape read the body of {path}")

    monkeypatch.setattr(jaxae.data, "read_idx", no_body_reads)  # headers only
    assert dataset_image_shape() == (28, 28, 1)
    assert dataset_image_shape(str(idx_folder)) == (28, 28, 1)
    colour = tmp_path / "colour"
    write_idx_folder(colour, train=(_images(3, 24, 16, 3), _labels(3)), test=(_images(2, 24, 16, 3), _labels(2)))
    assert dataset_image_shape(str(colour)) == (24, 16, 3)


def test_dataset_image_shape_refuses_what_load_dataset_refuses(tmp_path):
    for split in ("train", "test"):
        _write_split_as(tmp_path, split, _images(4, 16, 16, 4), _labels(4), "{prefix}-images-idx4-ubyte")
    with pytest.raises(DataError, match="with 4 channels; jaxae takes grayscale"):
        dataset_image_shape(str(tmp_path))
    with pytest.raises(DataError, match="does not exist"):
        dataset_image_shape(str(tmp_path / "nope"))


@pytest.mark.parametrize("name", ["train-images-idx4-ubyte", "train-images-idx4-ubyte.gz"])
def test_a_header_larger_than_its_file_is_refused_before_any_model_is_built(tmp_path, name):
    # 20 bytes claiming one 1024x1024x3 image: a model would be built (gigabytes) from this header
    # before the body is read, so the header's sizes are checked against the file's even then.
    header = bytes([0, 0, 0x08, 4]) + struct.pack(">4I", 1, 1024, 1024, 3)
    (tmp_path / name).write_bytes(gzip.compress(header) if name.endswith(".gz") else header)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(1, np.uint8))
    with pytest.raises(DataError, match="is truncated"):
        dataset_image_shape(str(tmp_path))


@pytest.mark.parametrize(
    "train, test, pattern",
    [
        ((np.zeros((4, 16, 16, 3)), _labels(4)), None, "train images must be uint8 pixels 0..255, got dtype float64"),
        ((_images(4, 16, 16, 4), _labels(4)), None, "with 4 channels; jaxae takes grayscale (C=1) or RGB (C=3)"),
        ((_images(4, 7, 16, 1), _labels(4)), None, "images are 7x16; jaxae needs images of at least 8x8"),
        ((_images(4, 16), _labels(4)), None, "train images have shape (4, 16); expected (N, H, W, C) or (N, H, W)"),
        ((_images(4, 16, 16, 3), _labels(3)), None, "train labels have shape (3,); expected one label per image: (4,)"),
        ((_images(4, 16, 16, 3), np.array([0, 1, 2, 300])), None, "labels must be integers 0..255"),
        ((_images(4, 16, 16, 3), np.array([0.0, 1, 2, 3])), None, "labels must be integers 0..255"),
        ((_images(0, 16, 16, 3), _labels(0)), None, "the train split is empty"),
        (([_images(1, 16, 16, 3)[0], _images(1, 8, 8, 3)[0]], _labels(2)), None, "train images are not one array"),
        ((_images(2, 16, 16, 3), [[0], [1, 2]]), None, "the train labels are not one array"),
        ((np.full((4, 16, 16), 300, np.int64), _labels(4)), None, "int64 values from 300 to 300; rescale them"),
        ((np.full((4, 16, 16), -1, np.int16), _labels(4)), None, "int16 values from -1 to -1; rescale them"),
        (None, (_images(4, 16, 16, 1), _labels(4)), "train images are 16x16x3 but the test images are 16x16x1"),
    ],
)
def test_write_idx_folder_refuses_what_jaxae_would_not_read(tmp_path, train, test, pattern):
    train = train or (_images(4, 16, 16, 3), _labels(4))
    test = test or (_images(4, 16, 16, 3), _labels(4))
    with pytest.raises(DataError) as info:
        write_idx_folder(tmp_path / "out", train=train, test=test)
    assert pattern in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()  # nothing written


def test_write_idx_folder_never_overwrites_a_dataset(idx_folder):
    before = {p.name: p.read_bytes() for p in idx_folder.iterdir()}
    with pytest.raises(DataError, match="already exists; write_idx_folder writes into a folder without IDX"):
        write_idx_folder(
            idx_folder, train=(_images(4, 32, 32, 3), _labels(4)), test=(_images(4, 32, 32, 3), _labels(4))
        )
    assert {p.name: p.read_bytes() for p in idx_folder.iterdir()} == before


def test_write_idx_folder_leaves_no_half_file_when_a_write_fails(tmp_path, monkeypatch):
    real_write_bytes = Path.write_bytes

    def disk_full_on_the_third_file(self, data):
        if self.name.startswith(".t10k-images"):
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real_write_bytes(self, data)

    monkeypatch.setattr(Path, "write_bytes", disk_full_on_the_third_file)
    with pytest.raises(DataError, match=f"cannot write IDX dataset folder {tmp_path}: No space left on device"):
        write_idx_folder(tmp_path, train=(_images(4, 16, 16, 3), _labels(4)), test=(_images(4, 16, 16, 3), _labels(4)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train-images-idx4-ubyte.gz", "train-labels-idx1-ubyte.gz"]


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 5),
    h=st.integers(8, 13),
    w=st.integers(8, 13),
    channels=st.sampled_from([None, 1, 3]),
    compress=st.booleans(),
)
def test_idx_folders_of_any_shape_round_trip(n, h, w, channels, compress):
    shape = (h, w) if channels is None else (h, w, channels)
    train = (_images(n, *shape, seed=n * 31 + h), _labels(n))
    test = (_images(n + 1, *shape, seed=w), _labels(n + 1))
    with tempfile.TemporaryDirectory() as folder:
        write_idx_folder(folder, train=train, test=test, compress=compress)
        expected_shape = (h, w, channels or 1)
        assert dataset_image_shape(folder) == expected_shape
        for split, (images, labels) in (("train", train), ("test", test)):
            ds = load_dataset(folder, split)
            np.testing.assert_array_equal(ds.images, images.reshape(len(images), *expected_shape))
            np.testing.assert_array_equal(ds.labels, labels)


def test_write_idx_folder_takes_integer_pixels_0_to_255_exactly(tmp_path):
    images = np.arange(4 * 16 * 16).reshape(4, 16, 16) % 256  # int64
    write_idx_folder(tmp_path, train=(images, _labels(4)), test=(images[:2].astype(np.int32), _labels(2)))
    np.testing.assert_array_equal(load_dataset(str(tmp_path), "train").images[..., 0], images)


def test_write_idx_folder_given_images_without_labels_is_one_line(tmp_path):
    images = np.zeros((4, 8, 8, 3), np.uint8)
    with pytest.raises(DataError, match=r"train must be a pair \(images, labels\), got ndarray"):
        write_idx_folder(tmp_path, train=images, test=(images, np.zeros(4, np.int32)))


# -- arrays in memory and .npz files ----------------------------------------------------------


def test_dataset_from_arrays_checks_as_every_reader_does(sample_train):
    from jaxae.data import Dataset

    d = Dataset.from_arrays(sample_train.images[:20, ..., 0].astype(np.int64), sample_train.labels[:20])
    assert d.images.shape == (20, 28, 28, 1) and d.images.dtype == np.uint8 and d.labels.dtype == np.int32
    assert Dataset.from_arrays(sample_train.images[:5]).labels is None
    with pytest.raises(DataError, match=r"images must be uint8 pixels 0\.\.255, got dtype float64; convert floats"):
        Dataset.from_arrays(sample_train.images[:5] / 255.0)
    # Classes in memory are any non-negative integers (1000 ImageNet classes); only IDX files hold bytes.
    many = np.arange(5) * 300
    np.testing.assert_array_equal(Dataset.from_arrays(sample_train.images[:5], many).labels, many)
    with pytest.raises(DataError, match=r"labels must be non-negative integer classes, got int64 values from -1"):
        Dataset.from_arrays(sample_train.images[:5], many - 1)


def test_an_npz_of_the_keras_layout_reads_and_a_npy_is_refused_with_how(tmp_path, sample_train, sample_test):
    path = tmp_path / "digits.npz"
    np.savez(
        path,
        x_train=sample_train.images[:64, ..., 0],
        y_train=sample_train.labels[:64],
        x_test=sample_test.images[:32, ..., 0],
    )
    assert dataset_image_shape(str(path)) == (28, 28, 1)
    train = load_dataset(str(path), "train")
    np.testing.assert_array_equal(train.images, sample_train.images[:64])
    np.testing.assert_array_equal(train.labels, sample_train.labels[:64])
    assert load_dataset(str(path), "test").labels is None
    np.save(tmp_path / "x.npy", sample_train.images[:4])
    with pytest.raises(DataError, match=r"one \.npy array, without a train and a test split; .*write_idx_folder"):
        load_dataset(str(tmp_path / "x.npy"))
    np.savez(tmp_path / "bad.npz", images=sample_train.images[:4])
    with pytest.raises(DataError, match="has no x_train"):
        dataset_image_shape(str(tmp_path / "bad.npz"))
