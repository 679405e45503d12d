"""Dataset sources -> uint8 arrays, and the normalisation presets.

``load_dataset(name, split)`` returns images ``uint8[N, H, W, C]`` and labels ``int32[N]`` from

* ``"mnist-sample"``: 4,000 train / 1,000 test real MNIST digits shipped inside the package;
* a path to a folder of four IDX files (``.gz`` or not): the MNIST-format ``idx3`` image files
  ``(N, H, W)`` for grayscale, or ``idx4`` image files ``(N, H, W, C)`` for colour, plus the ``idx1``
  label files (:func:`write_idx_folder` writes such a folder from numpy arrays);
* any other name: a prepared TensorFlow Datasets dataset with an ``image`` and a ``label`` feature,
  read with ``tfds.data_source`` (random access, no TensorFlow needed to *read*).

Every source goes through one check where its images enter (:func:`check_image_shape`): ``C`` is 1
(grayscale) or 3 (RGB), ``H`` and ``W`` are at least :data:`MIN_IMAGE_SIDE`, and both splits have one
shape. :func:`dataset_image_shape` tells a dataset's ``(H, W, C)`` from headers alone.

Normalisation happens on the device inside the jitted step (see :class:`Normalization`), so
the host only ever holds uint8.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import importlib.resources
import importlib.util
import logging
import math
import os
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from jaxae.errors import DataError

SAMPLE_NAME = "mnist-sample"
#: The dataset a run records when its splits were given as arrays in memory.
IN_MEMORY_NAME = "arrays"
SPLITS = ("train", "test")
_IDX_PREFIX = {"train": "train", "test": "t10k"}
_IDX_DTYPES = {0x08: np.uint8}
# The smallest image side jaxae accepts: the conv model halves a side twice, and the figures
# need a picture to draw.
MIN_IMAGE_SIDE = 8
_CHANNELS = (1, 3)  # grayscale or RGB: what the models, figures and the PyTorch twins take
_IMAGE_FILE_NDIMS = (3, 4)  # idx3 (N, H, W) grayscale, idx4 (N, H, W, C)
_MAX_DEFLATE_RATIO = 1032  # zlib's documented worst-case expansion of deflate
_CHUNK = 1 << 20


@dataclasses.dataclass(frozen=True)
class Dataset:
    """One split of a dataset, as it sits in host memory."""

    images: np.ndarray  # uint8 [N, H, W, C]
    labels: np.ndarray | None  # int32 [N]; None for images without labels (nothing to probe)
    name: str
    split: str

    @classmethod
    def from_arrays(
        cls, images: Any, labels: Any = None, *, name: str = IN_MEMORY_NAME, split: str = "train"
    ) -> Dataset:
        """A split of images in memory, checked as jaxae checks every dataset it reads.

        Example::

            train = jaxae.Dataset.from_arrays(x_train, y_train)  # uint8 (N, H, W, C) or (N, H, W)
            jaxae.fit(config, train=train, test=jaxae.Dataset.from_arrays(x_test, split="test"))

        Args:
            images: uint8 pixels 0..255, ``(N, H, W, C)`` with ``C`` 1 or 3, or ``(N, H, W)``
                (integers of another dtype are taken where every value is 0..255).
            labels: one integer class per image, or None.
            name: what the run records as its dataset.
            split: ``"train"`` or ``"test"``, for messages.

        Raises:
            DataError: arrays jaxae cannot train on; the message says how to convert them.
        """
        images, labels = _checked_split_arrays(split, images, labels)
        return cls(images=images, labels=None if labels is None else labels.astype(np.int32), name=name, split=split)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True)
class Normalization:
    """``x = (u8 / 255 - mean) / std``, computed in that order exactly as torchvision's
    ``ToTensor`` + ``Normalize`` do, so converted PyTorch models see identical inputs."""

    name: str
    mean: float
    std: float

    @property
    def table(self) -> np.ndarray:
        """float32 ``[256]``: the normalised value of every byte, computed on the host in
        torchvision's order (XLA may turn ``/ 255`` into ``* (1/255)``, one ulp off)."""
        values = np.arange(256, dtype=np.float32) / np.float32(255)
        return (values - np.float32(self.mean)) / np.float32(self.std)

    def __call__(self, images_u8):
        """Normalised float32 values of uint8 pixels (any shape).

        Every entry point that takes images (the train steps, evaluation, ``encode``) comes
        through here, so this is where other dtypes are refused: floats cast to int would index
        the table as nearly black pixels and give plausible-looking nonsense. The dtype is static
        under ``jit``, so the check costs nothing and fails at trace time.

        Raises:
            DataError: ``images_u8`` is not uint8.
        """
        import jax.numpy as jnp

        dtype = np.dtype(images_u8.dtype) if hasattr(images_u8, "dtype") else np.asarray(images_u8).dtype
        if dtype != np.uint8:
            raise DataError(
                f"images must be uint8 pixels 0..255, got dtype {dtype}; convert floats in [0, 1] with "
                "(x * 255).round().astype(np.uint8)"
            )
        return jnp.asarray(self.table)[images_u8.astype(jnp.int32)]

    def to_pixels(self, x):
        """Back to [0, 1] pixel units (for figures and pixel-space metrics)."""
        return x * self.std + self.mean

    def from_unit(self, s):
        """A value in (0, 1), e.g. a Sigmoid output, spread over the data range [low, high]."""
        return self.low + (self.high - self.low) * s

    @property
    def low(self) -> float:
        return (0.0 - self.mean) / self.std

    @property
    def high(self) -> float:
        return (1.0 - self.mean) / self.std


NORMALIZATIONS = {
    # [0, 1]: the range a Sigmoid decoder can reach; the default.
    "unit": Normalization("unit", 0.0, 1.0),
    # The document's ToTensor() + Normalize((0.5,), (0.5,)): [-1, 1]. A Sigmoid output can never
    # go below 0, so the background (-1) is out of its reach; kept to reproduce the document.
    "seed": Normalization("seed", 0.5, 0.5),
}


def get_normalization(name: str) -> Normalization:
    try:
        return NORMALIZATIONS[name]
    except KeyError:
        raise DataError(f"unknown normalisation {name!r}; choose one of {', '.join(NORMALIZATIONS)}") from None


def load_dataset(name: str = SAMPLE_NAME, split: str = "train", data_dir: str | None = None) -> Dataset:
    """Loads one split as uint8 images ``[N, H, W, C]`` (``C`` = 1 or 3) and int32 labels.

    Args:
        name: ``"mnist-sample"``, a folder of IDX files (``idx3`` grayscale or ``idx4`` colour
            images), or a TFDS dataset name (``"mnist"``, ``"fashion_mnist"``, ``"cifar10"``, ...).
        split: ``"train"`` or ``"test"``.
        data_dir: TFDS data directory (TFDS datasets only).

    Raises:
        DataError: the dataset cannot be found or read, or its images are not of a shape jaxae
            takes (see :func:`check_image_shape`); the message says what to do.
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    _check_named(name)
    if name == SAMPLE_NAME:
        folder = importlib.resources.files("jaxae") / "_data" / SAMPLE_NAME
        with importlib.resources.as_file(folder) as path:
            images, labels = read_idx_split(Path(path), split)
    elif _is_numpy_file(name):
        images, labels = _read_npz_split(Path(name), split)
    elif _looks_like_path(name):
        images, labels = read_idx_split(Path(name), split)
    else:
        images, labels = _load_tfds(name, split, data_dir)
    return Dataset(images=images, labels=labels, name=name, split=split)


def check_streamable(name: str) -> None:
    """Refuses ``--input stream`` where it would read the train split into memory anyway.

    A plain IDX file is read in place (memory-mapped); a gzipped one can only be decompressed
    into memory, which is what streaming is for avoiding. The embedded sample, an ``.npz`` and a
    TFDS dataset are read into host memory by design and stream from there (the devices still
    hold only a few steps of it).

    Raises:
        DataError: an IDX folder whose train images are gzip-compressed; the message says how
            to decompress them once.
    """
    if name == SAMPLE_NAME or _is_numpy_file(name) or not _looks_like_path(name):
        return
    folder = Path(name)
    path = find_idx_file(folder, "train", "images")
    try:
        with open(path, "rb") as f:
            compressed = f.read(2) == b"\x1f\x8b"
    except OSError as e:
        raise DataError(f"cannot read IDX file {path}: {e.strerror or e}") from None
    if compressed:
        raise DataError(
            f"--input stream reads IDX files in place, and {path} is gzip-compressed: decompress the folder once "
            f"(gunzip -k {folder}/*.gz; jaxae then reads the plain files), or train with --input memory"
        )


def dataset_image_shape(name: str = SAMPLE_NAME, data_dir: str | None = None) -> tuple[int, int, int]:
    """A dataset's image shape ``(H, W, C)``, learnt without loading it.

    Both splits are checked, train first, as training reads them: for the embedded sample and
    IDX folders only the headers of the image files are read; for a TFDS dataset, the first
    example of each split. So a run can build its model, and refuse one the images cannot feed,
    before a large dataset is read.

    Args:
        name: as for :func:`load_dataset`.
        data_dir: TFDS data directory (TFDS datasets only).

    Raises:
        DataError: what :func:`load_dataset` would raise for either split's images, or splits
            whose images differ in shape.
    """
    _check_named(name)
    if name == SAMPLE_NAME:
        folder = importlib.resources.files("jaxae") / "_data" / SAMPLE_NAME
        with importlib.resources.as_file(folder) as path:
            return _idx_folder_image_shape(Path(path))
    if _is_numpy_file(name):
        shapes = [_npz_image_shape(Path(name), split) for split in SPLITS]
        _check_splits_agree(f"{name}: ", "train", shapes[0], "test", shapes[1])
        return shapes[0]
    if _looks_like_path(name):
        return _idx_folder_image_shape(Path(name))
    train, test = (_tfds_image_shape(name, split, data_dir) for split in SPLITS)
    _check_splits_agree(f"TFDS dataset {name!r}: ", "train", train, "test", test)
    return train


def _check_named(name: str | None) -> None:
    if name is None:
        raise DataError(
            "no dataset given: pass --dataset (mnist-sample, a folder of IDX files or a TFDS name); a run converted "
            "from PyTorch with --image-shape alone records none"
        )
    if name == IN_MEMORY_NAME and not os.path.exists(name):
        raise DataError(
            f"the run was trained on arrays in memory (its dataset is {IN_MEMORY_NAME!r}), which no file holds: "
            "evaluate it with --dataset (images of the same shape), and resume it from Python with the arrays "
            "(jaxae.fit(config, workdir, train=, test=, resume=True))"
        )


def check_image_shape(shape_hwc: tuple[int, ...], where: str) -> None:
    """The one check every source's images pass where they enter jaxae.

    Args:
        shape_hwc: the shape of one image, ``(H, W, C)``.
        where: what the images are, for the message (a file, a TFDS dataset and split).

    Raises:
        DataError: ``C`` is not 1 (grayscale) or 3 (RGB), or a side is shorter than
            :data:`MIN_IMAGE_SIDE` (the conv models halve a side twice and figures need a picture).
    """
    shape = tuple(int(v) for v in shape_hwc)
    if len(shape) != 3:
        raise DataError(f"{where}: images have shape {shape}; jaxae needs images of shape (H, W, C)")
    h, w, c = shape
    if c not in _CHANNELS:
        if h in (1, 3, 4) and min(w, c) >= MIN_IMAGE_SIDE:
            advice = "; they look channels-first: jaxae wants (H, W, C), e.g. np.transpose(images, (0, 2, 3, 1))"
        elif c == 4:
            advice = "; for RGBA images drop the alpha channel: images[..., :3]"
        elif c == 2:
            advice = "; for grayscale + alpha images keep the first channel: images[..., :1]"
        else:
            advice = ""
        raise DataError(
            f"{where}: images are {shape_text(shape)}, with {c} channels; jaxae takes grayscale (C=1) or RGB (C=3) "
            f"images{advice}"
        )
    if min(h, w) < MIN_IMAGE_SIDE:
        raise DataError(
            f"{where}: images are {h}x{w}; jaxae needs images of at least {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE} pixels"
        )


def shape_text(shape: tuple[int, ...]) -> str:
    """``"32x32x3"``: an image shape as jaxae's messages write it."""
    return "x".join(str(int(v)) for v in shape)


def _check_splits_agree(where: str, split: str, shape: tuple, other: str, other_shape: tuple) -> None:
    """Refuses two splits whose images differ in shape; ``where`` prefixes the message (``"folder: "``)."""
    if tuple(shape) != tuple(other_shape):
        raise DataError(
            f"{where}the {split} images are {shape_text(shape)} but the {other} images are {shape_text(other_shape)} "
            "(H x W x C); both splits of a dataset must have one image shape"
        )


# ---------------------------------------------------------------------------------------------
# NumPy files: an .npz of x_train, y_train, x_test, y_test (the layout of Keras' mnist.npz)

_NPZ_KEYS = {"train": ("x_train", "y_train"), "test": ("x_test", "y_test")}
_NPZ_HOW = (
    "an .npz for jaxae holds x_train and x_test (uint8 (N, H, W) or (N, H, W, C)) and optionally y_train and "
    "y_test: np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...); or write an IDX folder with "
    "jaxae.write_idx_folder(folder, train=(x, y), test=(x, y))"
)


def _is_numpy_file(name: str) -> bool:
    if name.endswith(".npy"):
        raise DataError(f"{name} is one .npy array, without a train and a test split; {_NPZ_HOW}")
    return name.endswith(".npz")


def _open_npz(path: Path):
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"{path} does not exist") from None
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise DataError(f"{path} is not a readable .npz file ({e}); {_NPZ_HOW}") from None


def _read_npz_split(path: Path, split: str) -> tuple[np.ndarray, np.ndarray | None]:
    x_key, y_key = _NPZ_KEYS[split]
    with _open_npz(path) as npz:
        if x_key not in npz.files:
            raise DataError(f"{path} has no {x_key} (it holds {', '.join(npz.files) or 'nothing'}); {_NPZ_HOW}")
        try:
            images = npz[x_key]
            labels = npz[y_key] if y_key in npz.files else None
        except ValueError as e:  # object arrays need pickle, which is never loaded
            raise DataError(f"{path}: {e}; {_NPZ_HOW}") from None
    images, labels = _checked_split_arrays(split, images, labels)
    if labels is None:
        return images, None
    return images, labels.astype(np.int32)


def _npz_image_shape(path: Path, split: str) -> tuple[int, int, int]:
    """The image shape of one split of an .npz, read from its array header (the pixels are not read)."""
    x_key = _NPZ_KEYS[split][0]
    try:
        with zipfile.ZipFile(path) as archive, archive.open(f"{x_key}.npy") as member:
            version = np.lib.format.read_magic(member)
            read_header = (
                np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            )
            shape, _, _ = read_header(member)
    except FileNotFoundError:
        raise DataError(f"{path} does not exist") from None
    except KeyError:
        raise DataError(f"{path} has no {x_key}; {_NPZ_HOW}") from None
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise DataError(f"{path} is not a readable .npz file ({e}); {_NPZ_HOW}") from None
    hwc = tuple(shape[1:]) + ((1,) if len(shape) == 3 else ())
    if len(hwc) != 3:
        raise DataError(f"the {split} images of {path} have shape {shape}; expected (N, H, W, C) or (N, H, W)")
    check_image_shape(hwc, f"the {split} images of {path}")
    return hwc  # type: ignore[return-value]


def _looks_like_path(name: str) -> bool:
    """A folder (existing, or written as a path) rather than a TFDS name.

    TFDS names hold a ``/`` too (``emnist/letters``, ``imagenet_resized/32x32``): a name that
    exists as no file and starts with a registered TFDS dataset is one of those.
    """
    if os.path.exists(name) or name.startswith((".", os.path.sep, "~")):
        return True
    if os.path.sep not in name:
        return False
    try:
        import tensorflow_datasets as tfds
    except ImportError:  # pragma: no cover - it is a runtime dependency
        return True
    return name.split("/")[0] not in tfds.list_builders(with_community_datasets=False)


# ---------------------------------------------------------------------------------------------
# IDX files (the MNIST / Fashion-MNIST distribution format)

_FOLDER_LAYOUT = (
    "a dataset folder holds four IDX files (.gz or not): train-images-idx3-ubyte (N, H, W) for grayscale "
    "or train-images-idx4-ubyte (N, H, W, C) for colour, train-labels-idx1-ubyte, and the same two for t10k"
)


def _idx_names(split: str, kind: str, ndim: int) -> tuple[str, ...]:
    """The file names an IDX file may have: the standard dashed stem, the dotted spelling, each plain or .gz."""
    prefix = _IDX_PREFIX[split]
    stems = (f"{prefix}-{kind}-idx{ndim}-ubyte", f"{prefix}-{kind}.idx{ndim}-ubyte")
    return tuple(stem + suffix for stem in stems for suffix in ("", ".gz"))


def _image_file_ndims(kind: str) -> tuple[int, ...]:
    return _IMAGE_FILE_NDIMS if kind == "images" else (1,)


def find_idx_file(folder: Path, split: str, kind: str) -> Path:
    """The IDX file for ``split`` and ``kind`` (``"images"``/``"labels"``) in ``folder``.

    Image files are looked for under both their ``idx3`` and ``idx4`` names; the name only finds
    the file, the dimension count in its header is what is read.

    Raises:
        DataError: no such file, the folder cannot be searched, or it holds both an ``idx3`` and
            an ``idx4`` image file for the split (jaxae does not guess which one is meant).
    """
    found = []
    for ndim in _image_file_ndims(kind):
        for name in _idx_names(split, kind, ndim):
            candidate = folder / name
            try:
                if candidate.is_file():
                    found.append(candidate)
                    break  # the first spelling of this dimension count wins, as it always has
            except OSError as e:  # a folder without search permission
                raise DataError(f"cannot read dataset folder {folder}: {e.strerror or e}") from None
    if len(found) > 1:
        raise DataError(
            f"{folder} holds two {split} {kind} files, {found[0].name} and {found[1].name}; "
            "keep only the one you mean (idx3 for (N, H, W) grayscale, idx4 for (N, H, W, C) images)"
        )
    if found:
        return found[0]
    looked_for = " or ".join(_idx_names(split, kind, ndim)[0] for ndim in _image_file_ndims(kind))
    raise DataError(f"no {split} {kind} IDX file in {folder} (looked for {looked_for}[.gz]); {_FOLDER_LAYOUT}")


def read_idx_split(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images ``uint8[N, H, W, C]`` and labels ``int32[N]`` of one split of an IDX folder.

    The image file holds ``(N, H, W)`` (grayscale, ``C`` = 1 is appended) or ``(N, H, W, C)``; its
    header is checked (:func:`check_image_shape`) before its body is read. The other split's
    image header is read too (a few bytes), so a folder whose train and test images differ in
    shape fails here rather than in a compiled step later.

    Raises:
        DataError: a missing, unreadable or malformed file, counts that disagree, images of a
            shape jaxae does not take, or of another shape than the other split's.
    """
    _check_is_folder(folder)
    images_path, shape = _idx_image_shape(folder, split)
    images = read_idx(images_path)
    labels = read_idx(find_idx_file(folder, split, "labels"))
    if labels.ndim != 1:
        raise DataError(f"label IDX file in {folder} has {labels.ndim} dimensions, expected 1")
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{folder}: {images.shape[0]} {split} images but {labels.shape[0]} labels")
    if images.shape[0] == 0:
        raise DataError(f"{folder}: the {split} split is empty")
    _check_other_split_matches(folder, split, shape)
    return images.reshape(images.shape[0], *shape), labels.astype(np.int32)


def _check_is_folder(folder: Path) -> None:
    try:
        is_dir = folder.is_dir()
    except OSError as e:  # e.g. a parent folder without search permission
        raise DataError(f"cannot read dataset folder {folder}: {e.strerror or e}") from None
    if not is_dir:
        raise DataError(f"dataset folder {folder} does not exist (or is not a folder)")


def _idx_image_shape(folder: Path, split: str) -> tuple[Path, tuple[int, int, int]]:
    """``split``'s image file and its checked image shape ``(H, W, C)``, from its header alone."""
    path = find_idx_file(folder, split, "images")
    dims = read_idx_header(path)
    if len(dims) not in _IMAGE_FILE_NDIMS:
        raise DataError(
            f"image IDX file {path} has {len(dims)} dimensions {tuple(dims)}, expected (N, H, W) or (N, H, W, C)"
        )
    shape = (dims[1], dims[2], dims[3] if len(dims) == 4 else 1)
    check_image_shape(shape, str(path))
    return path, shape


def _check_other_split_matches(folder: Path, split: str, shape: tuple[int, int, int]) -> None:
    """Refuses a folder whose other split's images (by header) have another ``(H, W, C)``.

    An other split that is absent or broken passes: its own problems are reported when it is loaded.
    """
    other = next(s for s in SPLITS if s != split)
    try:
        _, other_shape = _idx_image_shape(folder, other)
    except DataError:
        return
    _check_splits_agree(f"{folder}: ", split, shape, other, other_shape)


def _idx_folder_image_shape(folder: Path) -> tuple[int, int, int]:
    _check_is_folder(folder)
    _, shape = _idx_image_shape(folder, "train")
    _, test_shape = _idx_image_shape(folder, "test")  # its own problems first, as loading it would report them
    _check_splits_agree(f"{folder}: ", "train", shape, "test", test_shape)
    return shape


def read_idx(path: Path) -> np.ndarray:
    """Reads one IDX file (gzip-compressed or not, told by content), validating every byte count.

    A compressed file is decompressed as a stream and never beyond the size its header
    declares, and a header declaring more than the file could hold is refused before any
    payload is read: a small file can never make this allocate much more than its header
    honestly describes.

    Raises:
        DataError: unreadable, corrupt compression, wrong magic number, unsupported element
            type, or a body whose length does not match the header.
    """
    return _read_idx(Path(path), header_only=False)


def read_idx_header(path: Path) -> tuple[int, ...]:
    """The dimensions an IDX file's header declares (reads only the header).

    Raises:
        DataError: as :func:`read_idx`, for the header.
    """
    return _read_idx(Path(path), header_only=True)


def _read_idx(path: Path, *, header_only: bool):
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            compressed = f.read(2) == b"\x1f\x8b"
            f.seek(0)
            if not compressed:
                return _parse_idx(f, path, size, size, header_only)
            with gzip.GzipFile(fileobj=f, mode="rb") as stream:
                # Deflate cannot expand data more than ~1032 times; a header asking for more
                # than that describes a file that cannot hold it.
                return _parse_idx(stream, path, None, _MAX_DEFLATE_RATIO * size + 1024, header_only)
    except DataError:
        raise
    except (zlib.error, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"cannot read IDX file {path}: corrupt or truncated gzip data ({e})") from None
    except OSError as e:
        raise DataError(f"cannot read IDX file {path}: {e.strerror or e}") from None
    except MemoryError:
        raise DataError(f"IDX file {path} does not fit in memory") from None


def _read_up_to(stream, n: int) -> bytes:
    """Up to ``n`` bytes, fewer only at the end of the stream (read in chunks: never more than asked)."""
    chunks, have = [], 0
    while have < n:
        chunk = stream.read(min(n - have, _CHUNK))
        if not chunk:
            break
        chunks.append(chunk)
        have += len(chunk)
    return b"".join(chunks)


def _parse_idx(stream, path: Path, file_size: int | None, max_size: int, header_only: bool):
    """Parses an IDX stream; ``file_size`` is the exact size when known (uncompressed files)."""
    magic = _read_up_to(stream, 4)
    if len(magic) < 4 or magic[0] != 0 or magic[1] != 0:
        raise DataError(
            f"{path} is not an IDX file (bad magic number {magic.hex() or 'empty'}; "
            "expected 0000 followed by a type byte and a dimension count)"
        )
    type_code, ndim = magic[2], magic[3]
    if type_code not in _IDX_DTYPES:
        raise DataError(f"{path}: IDX element type 0x{type_code:02x} is not supported (only unsigned bytes, 0x08)")
    if ndim == 0:
        raise DataError(f"{path}: IDX header declares zero dimensions")
    raw_dims = _read_up_to(stream, 4 * ndim)
    if len(raw_dims) < 4 * ndim:
        raise DataError(f"{path} is truncated inside its header")
    dims = struct.unpack(f">{ndim}I", raw_dims)
    header_len = 4 + 4 * ndim
    expected = math.prod(dims)  # a Python int: a product of 32-bit sizes cannot overflow it
    # Checked for a header-only read too: a model is built from the header's image shape before
    # the body is read, and a 20-byte file must not get one for 1024x1024x3 images.
    if file_size is not None and header_len + expected > file_size:
        raise DataError(
            f"{path} is truncated: header shape {tuple(dims)} needs {expected} bytes of data, "
            f"found {file_size - header_len}"
        )
    if header_len + expected > max_size:
        raise DataError(
            f"{path} is truncated or its header is corrupt: header shape {tuple(dims)} needs {expected} bytes "
            f"of data, more than a gzip file of its size can hold"
        )
    if header_only:
        return dims
    if file_size is not None and header_len + expected < file_size:
        raise DataError(
            f"{path} is longer than its header says: header shape {tuple(dims)} needs {expected} bytes of data"
        )
    if file_size is not None and expected:
        # A plain file is mapped, not read: its pages are the file's (shared, dropped under
        # memory pressure) and only the rows something reads are ever read from disk; e.g. a
        # process of a multi-process run reads only its own devices' rows. The file already
        # open is mapped (not its name again), so the map is of the file whose size was checked.
        with contextlib.suppress(OSError):  # a file system that cannot map files: read it below
            try:
                return np.memmap(stream, dtype=_IDX_DTYPES[type_code], mode="r", offset=header_len, shape=tuple(dims))
            except ValueError as e:  # shortened since its size was read, or a shape numpy cannot map
                raise DataError(f"cannot map IDX file {path} (header shape {tuple(dims)}): {e}") from None
    try:
        body = np.empty(expected, dtype=_IDX_DTYPES[type_code])
    except ValueError as e:  # e.g. a zero dimension next to sizes numpy cannot index
        raise DataError(f"{path}: header shape {tuple(dims)} is not a usable array shape ({e})") from None
    except MemoryError:
        # A gzip header may claim up to deflate's worst-case expansion of the file: whether the
        # stream really holds that much tells a corrupt header from a split too large to load.
        have = _count_up_to(stream, expected)
        if have < expected:
            raise DataError(_truncated(path, dims, expected, have)) from None
        raise DataError(
            f"IDX file {path} does not fit in memory: header shape {tuple(dims)} is {expected} bytes"
        ) from None
    have = _read_into(stream, body)
    if have < expected:
        raise DataError(_truncated(path, dims, expected, have))
    if stream.read(1):
        raise DataError(
            f"{path} is longer than its header says: header shape {tuple(dims)} needs {expected} bytes of data"
        )
    body.flags.writeable = False  # read-only, as a mapped file is: a split is never changed in place
    try:
        return body.reshape(dims)
    except ValueError as e:
        raise DataError(f"{path}: header shape {tuple(dims)} is not a usable array shape ({e})") from None


def _truncated(path: Path, dims: tuple[int, ...], expected: int, have: int) -> str:
    return f"{path} is truncated: header shape {tuple(dims)} needs {expected} bytes of data, found {have}"


def _count_up_to(stream, n: int) -> int:
    """How many bytes ``stream`` yields, up to ``n``, read in chunks and not kept."""
    have = 0
    while have < n:
        chunk = stream.read(min(n - have, _CHUNK))
        if not chunk:
            break
        have += len(chunk)
    return have


def _read_into(stream, out: np.ndarray) -> int:
    """Fills ``out`` (1-D bytes) from ``stream`` in chunks; the count read, short only at the end.

    Decompressed straight into the one array: the body is never held twice (a list of chunks
    joined into a ``bytes`` and then copied would peak at twice the split).
    """
    view, have = memoryview(out), 0
    while have < len(out):
        got = stream.readinto(view[have : have + _CHUNK])
        if not got:
            break
        have += got
    return have


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Writes a uint8 array as an IDX file (gzip-compressed when ``path`` ends in ``.gz``).

    The file is written beside ``path`` and renamed over it once complete, so a file that is
    replaced is never changed in place: a run that has the old one mapped (jaxae reads plain
    IDX files in place) goes on reading the old contents, never half of each.
    """
    path = Path(path)
    _write_atomically(path, _idx_bytes(array, compress=path.suffix == ".gz"))


def _write_atomically(path: Path, data: bytes) -> None:
    partial = path.with_name(f".{path.name}.partial")
    try:
        partial.write_bytes(data)
        os.replace(partial, path)  # never a half-written file under a name jaxae reads
    finally:
        partial.unlink(missing_ok=True)


def _idx_bytes(array: np.ndarray, *, compress: bool) -> bytes:
    array = np.ascontiguousarray(array, dtype=np.uint8)
    raw = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    return gzip.compress(raw, mtime=0) if compress else raw


def write_idx_folder(
    folder: str | Path,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    *,
    compress: bool = True,
) -> Path:
    """Writes numpy images and labels as an IDX dataset folder that :func:`load_dataset` reads.

    Grayscale images go to MNIST-standard ``idx3`` files ``(N, H, W)``; colour images to ``idx4``
    files ``(N, H, W, 3)``. What is written is checked first, as :func:`load_dataset` would check
    it, so a folder that is written can be read. Existing IDX files are never overwritten, and
    each file appears under its name only once it is completely written.

    Example::

        jaxae.write_idx_folder("data/my-colour-set", train=(x_train, y_train), test=(x_test, y_test))
        jaxae.load_dataset("data/my-colour-set", "train").images.shape  # (N, H, W, 3)

    Args:
        folder: the folder to write into (created if missing); it must hold no IDX dataset files yet.
        train: ``(images, labels)`` of the train split: images ``uint8`` ``(N, H, W, C)`` with ``C``
            1 or 3 (or ``(N, H, W)`` for grayscale; integers of another dtype are taken where every
            value is 0..255), labels 1-D integers 0..255, one per image.
        test: the same for the test split; its images must have the train images' ``(H, W, C)``.
        compress: gzip the files (``.gz`` names), as MNIST is distributed.

    Returns:
        The folder.

    Raises:
        DataError: the arrays are not of a kind jaxae reads, the folder already holds IDX dataset
            files, or a file cannot be written.
    """
    folder = Path(folder)
    for split, pair in (("train", train), ("test", test)):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise DataError(f"{split} must be a pair (images, labels), got {type(pair).__name__}")
    for split, pair in (("train", train), ("test", test)):
        if pair[1] is None:
            raise DataError(f"the {split} labels are None; IDX folders hold one label per image (e.g. zeros)")
    splits = {
        "train": _checked_split_arrays("train", *train, idx=True),
        "test": _checked_split_arrays("test", *test, idx=True),
    }
    train_shape, test_shape = (images.shape[1:] for images, _ in splits.values())
    _check_splits_agree("", "train", train_shape, "test", test_shape)
    suffix = ".gz" if compress else ""
    files = []
    for split, (images, labels) in splits.items():
        if images.shape[-1] == 1:  # 3-D, so that grayscale folders stay MNIST-standard idx3 files
            files.append((f"{_IDX_PREFIX[split]}-images-idx3-ubyte{suffix}", images[..., 0]))
        else:
            files.append((f"{_IDX_PREFIX[split]}-images-idx4-ubyte{suffix}", images))
        files.append((f"{_IDX_PREFIX[split]}-labels-idx1-ubyte{suffix}", labels))
    try:
        _refuse_existing_idx_files(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name, array in files:
            _write_atomically(folder / name, _idx_bytes(array, compress=compress))
    except OSError as e:
        raise DataError(f"cannot write IDX dataset folder {folder}: {e.strerror or e}") from None
    return folder


def _refuse_existing_idx_files(folder: Path) -> None:
    """Nothing saved is overwritten, and no folder ends up with both an idx3 and an idx4 file."""
    existing = [
        folder / name
        for split in SPLITS
        for kind in ("images", "labels")
        for ndim in _image_file_ndims(kind)
        for name in _idx_names(split, kind, ndim)
        if (folder / name).exists()
    ]
    if existing:
        raise DataError(
            f"{existing[0]} already exists; write_idx_folder writes into a folder without IDX dataset files"
        )


def _one_array(values: Any, what: str) -> np.ndarray:
    """``np.asarray(values)``, or a :class:`DataError` where the values are not one rectangular array."""
    if isinstance(values, np.ndarray):
        return values
    try:
        return np.asarray(values)
    except ValueError:
        shapes = sorted({np.shape(v) for v in values}, key=str) if isinstance(values, (list, tuple)) else []
        found = f" (of shapes {', '.join(map(str, shapes[:3]))})" if len(shapes) > 1 else ""
        raise DataError(
            f"{what} are not one array: a list whose items differ in shape{found}; give an array of one shape, "
            "e.g. np.stack(images), resizing or cropping the odd ones first"
        ) from None


def _pixel_kind(images: np.ndarray) -> str:
    """What non-uint8 images hold, with the conversion that fits them, for a message."""
    if images.dtype.kind in "iu":
        low, high = (int(images.min()), int(images.max())) if images.size else (0, 0)
        return (
            f"{images.dtype} values from {low} to {high}; rescale them to 0..255 (e.g. "
            "np.clip(x, 0, 255).astype(np.uint8) for values already in pixel units)"
        )
    if images.dtype.kind == "f":
        return f"dtype {images.dtype}; convert floats in [0, 1] with (x * 255).round().astype(np.uint8)"
    return f"dtype {images.dtype}; give uint8 pixels 0..255"


def _checked_split_arrays(split: str, images, labels, *, idx: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """``images`` as uint8 ``(N, H, W, C)`` and ``labels`` as int32 ``(N,)`` (None stays None),
    checked for :meth:`Dataset.from_arrays` and, with ``idx``, :func:`write_idx_folder` (uint8
    labels: an IDX label file holds bytes)."""
    images = _one_array(images, f"the {split} images")
    labels = None if labels is None else _one_array(labels, f"the {split} labels")
    # Integer pixels 0..255 convert exactly; uint8 is kept as it is (a mapped split is not copied).
    if (
        images.dtype != np.uint8
        and images.dtype.kind in "iu"
        and images.size
        and 0 <= images.min() <= images.max() <= 255
    ):
        images = images.astype(np.uint8)
    if images.dtype != np.uint8:
        raise DataError(f"the {split} images must be uint8 pixels 0..255, got {_pixel_kind(images)}")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4:
        raise DataError(f"the {split} images have shape {images.shape}; expected (N, H, W, C) or (N, H, W)")
    check_image_shape(images.shape[1:], f"the {split} images")
    if images.shape[0] == 0:
        raise DataError(f"the {split} split is empty")
    if labels is None:
        return images, None
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise DataError(
            f"the {split} labels have shape {labels.shape}; expected one label per image: ({images.shape[0]},)"
        )
    if idx:
        if labels.dtype.kind not in "iu" or labels.min() < 0 or labels.max() > 255:
            raise DataError(f"the {split} labels must be integers 0..255 (IDX label files hold bytes)")
        return images, labels.astype(np.uint8)
    if labels.dtype.kind not in "iu" or labels.min() < 0 or labels.max() >= 2**31:
        raise DataError(
            f"the {split} labels must be non-negative integer classes, got {labels.dtype} values from "
            f"{labels.min()} to {labels.max()}"
        )
    return images, labels.astype(np.int32)


# ---------------------------------------------------------------------------------------------
# TensorFlow Datasets


def _load_tfds(name: str, split: str, data_dir: str | None) -> tuple[np.ndarray, np.ndarray]:
    from tqdm.auto import tqdm

    source = _open_tfds(name, split, data_dir)
    n = len(source)
    where = f"TFDS dataset {name!r} ({split})"
    with _without_opencv_advice():
        shape = _first_tfds_image_shape(source, name, split)  # checked before the split is read
        images = np.empty((n, *shape), np.uint8)
        labels = np.empty((n,), np.int32)
        for i in tqdm(range(n), desc=f"reading {name} {split}", unit="img", disable=n < 20_000, leave=False):
            example = source[i]
            image = _tfds_image(example)
            if image.shape != shape:
                raise DataError(
                    f"{where}: example {i} has a {shape_text(image.shape)} image but example 0 a {shape_text(shape)} one; "
                    "jaxae needs one image shape per dataset (resize the images and write them with "
                    "jaxae.write_idx_folder)"
                )
            images[i] = image
            labels[i] = int(example["label"])
    return images, labels


class SourceImages:
    """A TFDS split's images read from its ``tfds.data_source`` only as they are indexed.

    Looks like the uint8 ``[N, H, W, C]`` array :func:`load_dataset` would return (``shape``,
    ``dtype``, ``nbytes``, ``len``, ``reshape(N, -1)``), but indexing it (an int, a slice, an
    array of ints) reads and decodes only those examples. ``fit`` reads a TFDS train split
    through it, so ``--input stream`` decodes only the rows of each batch as it trains, and
    each process of a ``--parallel shard`` run only the rows its own devices hold, never the
    whole split in every process. ``np.asarray`` reads it all.
    """

    dtype = np.dtype(np.uint8)

    def __init__(self, source: Any, shape: tuple[int, ...], where: str, *, flat: bool = False):
        self._source, self._image_shape, self._where, self._flat = source, tuple(shape), where, flat

    @property
    def shape(self) -> tuple[int, ...]:
        row = (math.prod(self._image_shape),) if self._flat else self._image_shape
        return (len(self._source), *row)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape)

    def __len__(self) -> int:
        return len(self._source)

    def reshape(self, *shape: Any) -> SourceImages:
        """Only ``reshape(N, -1)`` (one row per image) and back to ``(N, H, W, C)``."""
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], tuple) else shape
        if shape in ((len(self), -1), (len(self), math.prod(self._image_shape))):
            return SourceImages(self._source, self._image_shape, self._where, flat=True)
        if shape in ((len(self), *self._image_shape), (-1, *self._image_shape)):
            return SourceImages(self._source, self._image_shape, self._where)
        raise ValueError(f"a TFDS split read in place reshapes to (N, -1) or (N, H, W, C), not {shape}")

    def __getitem__(self, index: Any) -> np.ndarray:
        if isinstance(index, tuple):  # (rows, ...): only the rows are indexed here
            rows, rest = index[0], index[1:]
            return self[rows][(slice(None), *rest)] if rest else self[rows]
        if isinstance(index, (int, np.integer)):
            return self[np.asarray([index])][0]
        ids = np.arange(len(self))[index] if isinstance(index, slice) else np.asarray(index)
        flat_ids = ids.reshape(-1).astype(np.int64)
        out = np.empty((len(flat_ids), *self._image_shape), np.uint8)
        if len(flat_ids):
            getitems = getattr(self._source, "__getitems__", None)
            with _without_opencv_advice():
                examples = getitems(flat_ids.tolist()) if getitems else [self._source[int(i)] for i in flat_ids]
            for j, (i, example) in enumerate(zip(flat_ids, examples, strict=True)):
                image = _tfds_image(example)
                if image.shape != self._image_shape:
                    raise DataError(
                        f"{self._where}: example {i} has a {shape_text(image.shape)} image but example 0 a "
                        f"{shape_text(self._image_shape)} one; jaxae needs one image shape per dataset (resize the "
                        "images and write them with jaxae.write_idx_folder)"
                    )
                out[j] = image
        out = out.reshape(*ids.shape, *self.shape[1:])
        out.flags.writeable = False
        return out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[np.arange(len(self))]
        return out if dtype is None else out.astype(dtype)


def open_tfds_images(name: str, split: str, data_dir: str | None) -> SourceImages:
    """A TFDS split's images as :class:`SourceImages` (its first example checked, nothing else read)."""
    source = _open_tfds(name, split, data_dir)
    with _without_opencv_advice():
        shape = _first_tfds_image_shape(source, name, split)
    return SourceImages(source, shape, f"TFDS dataset {name!r} ({split})")


def is_tfds_name(name: str) -> bool:
    """Whether :func:`load_dataset` reads ``name`` from TFDS (not the sample, an ``.npz`` or a folder)."""
    return name != SAMPLE_NAME and not _is_numpy_file(name) and not _looks_like_path(name)


def _tfds_image_shape(name: str, split: str, data_dir: str | None) -> tuple[int, int, int]:
    """``(H, W, C)`` of a TFDS split from its first example (the builder info may leave sizes
    undeclared, None, for datasets whose images vary)."""
    source = _open_tfds(name, split, data_dir)
    with _without_opencv_advice():
        return _first_tfds_image_shape(source, name, split)


def _open_tfds(name: str, split: str, data_dir: str | None):
    """``tfds.data_source`` for a prepared, non-empty split, or a one-line DataError saying what to do."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:  # pragma: no cover - it is a runtime dependency
        raise DataError(f"reading TFDS dataset {name!r} needs tensorflow-datasets ({e})") from None
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)  # TFDS warns about empty variant folders before failing
    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # TFDS reports a missing preparation (and a bad name) in several ways
        # Only a registered name may be told to `tfds build`: TFDS rejects a mistyped one either as
        # not found or, for a name that is not a Python identifier ("fashion-mnist"), as unparsable.
        if isinstance(e, tfds.core.registered.DatasetNotFoundError) or not _is_registered_tfds_name(name, tfds):
            raise DataError(_unknown_dataset_message(name, tfds)) from None
        where = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
        has_tf = importlib.util.find_spec("tensorflow") is not None
        how = (
            ""
            if has_tf
            else "TensorFlow, which preparing needs, is not installed: pip install 'jaxae[tfds-build]'; then "
        )
        raise DataError(
            f"TFDS dataset {name!r} ({split}) is not prepared in array_record format under {where} "
            f"({type(e).__name__}). To prepare it (needs internet): {how}"
            f"tfds build {name} --file_format=array_record --data_dir={where}; "
            "or pass a folder of IDX files with --dataset PATH"
        ) from None
    finally:
        absl_logger.setLevel(level)
    if len(source) == 0:
        raise DataError(f"TFDS dataset {name!r} split {split!r} is empty")
    return source


def _tfds_image(example) -> np.ndarray:
    image = np.asarray(example["image"])
    return image[..., None] if image.ndim == 2 else image


def _first_tfds_image_shape(source, name: str, split: str) -> tuple[int, int, int]:
    """The checked ``(H, W, C)`` of the first example; also checks that the dataset has the
    ``image`` and ``label`` features jaxae reads, and what kind they are."""
    example = source[0]
    missing = [feature for feature in ("image", "label") if feature not in example]
    if missing:
        has = ", ".join(repr(k) for k in sorted(example)) or "none"
        raise DataError(
            f"TFDS dataset {name!r} has no {' and no '.join(repr(m) for m in missing)} feature (its features: {has}); "
            "jaxae reads image datasets with an 'image' feature and an integer 'label' feature"
        )
    where = f"TFDS dataset {name!r} ({split})"
    image = _tfds_image(example)
    if image.dtype != np.uint8:
        raise DataError(f"{where}: images are {image.dtype}; jaxae reads uint8 images (pixels 0..255)")
    check_image_shape(image.shape, where)
    label = np.asarray(example["label"])
    if label.ndim != 0 or label.dtype.kind not in "iu":
        raise DataError(
            f"{where}: the 'label' feature is {label.dtype} of shape {label.shape}; jaxae needs one integer "
            "class label per image"
        )
    return tuple(int(v) for v in image.shape)  # type: ignore[return-value]


@contextlib.contextmanager
def _without_opencv_advice():
    """Drops TFDS's OpenCV advice while images are decoded (TFDS logs it on the first one)."""
    absl_logger = logging.getLogger("absl")
    opencv_advice = _OpenCvAdviceFilter()
    absl_logger.addFilter(opencv_advice)
    try:
        yield
    finally:
        absl_logger.removeFilter(opencv_advice)


def _tfds_dataset_part(name: str) -> str | None:
    """The dataset name in a TFDS name string ``name[/config][:version]``, or None for a name in
    a community namespace (``"huggingface:foo"``), which the local registry cannot judge."""
    head, colon, tail = name.partition(":")
    version = tail.split("/")[0].split(".")
    is_version = len(version) == 3 and all(part.isdigit() or part == "*" for part in version)
    if colon and not is_version:
        return None
    return head.split("/")[0]


def _is_registered_tfds_name(name: str, tfds) -> bool:
    dataset = _tfds_dataset_part(name)
    return dataset is None or dataset in tfds.list_builders(with_community_datasets=False)


def _unknown_dataset_message(name: str, tfds) -> str:
    """One line for a name that is no sample, no folder and no registered TFDS dataset, naming the
    nearest registered names (a dash for an underscore and letter case are the usual slips)."""
    import difflib

    registered = tfds.list_builders(with_community_datasets=False)  # the local registry: no network
    typed = (_tfds_dataset_part(name) or name).lower().replace("-", "_")
    nearest = [typed] if typed in registered else difflib.get_close_matches(typed, registered, n=3, cutoff=0.7)
    message = (
        f"unknown dataset {name!r}: it is not {SAMPLE_NAME!r}, not an existing folder of IDX files, "
        "and not a registered TFDS dataset name"
    )
    if nearest:
        return message + "; did you mean " + " or ".join(repr(n) for n in nearest) + "?"
    return message + " (the TFDS names are listed at https://www.tensorflow.org/datasets/catalog)"


class _OpenCvAdviceFilter(logging.Filter):
    """Drops TFDS's one warning "OpenCV is not installed ... Defaulting to PIL to decode images".

    PIL is the decoder jaxae means TFDS to use: OpenCV (opencv-python, ~90 MB) would only speed up
    a one-off decode of 28x28 PNGs, so the advice is noise on every first read. Other TFDS
    warnings still pass.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("OpenCV is not installed")
