"""Dataset sources -> uint8 arrays, and the normalisation presets.

``load_dataset(name, split)`` returns images ``uint8[N, H, W, C]`` and labels ``int32[N]`` from

* ``"mnist-sample"``: 4,000 train / 1,000 test real MNIST digits shipped inside the package;
* a path to a folder with the four MNIST-format IDX files (``.gz`` or not);
* any other name: a prepared TensorFlow Datasets dataset, read with ``tfds.data_source``
  (random access, no TensorFlow needed to *read*).

Normalisation happens on the device inside the jitted step (see :class:`Normalization`), so
the host only ever holds uint8.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.resources
import importlib.util
import logging
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from jaxae.errors import DataError

SAMPLE_NAME = "mnist-sample"
SPLITS = ("train", "test")
_IDX_PREFIX = {"train": "train", "test": "t10k"}
_IDX_DTYPES = {0x08: np.uint8}
# The smallest image side jaxae accepts: the conv model halves a side twice, and the figures
# need a picture to draw.
MIN_IMAGE_SIDE = 8
_MAX_DEFLATE_RATIO = 1032  # zlib's documented worst-case expansion of deflate
_CHUNK = 1 << 20


@dataclasses.dataclass(frozen=True)
class Dataset:
    """One split of a dataset, as it sits in host memory."""

    images: np.ndarray  # uint8 [N, H, W, C]
    labels: np.ndarray  # int32 [N]
    name: str
    split: str

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
    """Loads one split as uint8 images ``[N, H, W, C]`` and int32 labels.

    Args:
        name: ``"mnist-sample"``, a folder of MNIST-format IDX files, or a TFDS dataset name
            (``"mnist"``, ``"fashion_mnist"``, ``"kmnist"``, ...).
        split: ``"train"`` or ``"test"``.
        data_dir: TFDS data directory (TFDS datasets only).

    Raises:
        DataError: the dataset cannot be found or read; the message says what to do.
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if name == SAMPLE_NAME:
        folder = importlib.resources.files("jaxae") / "_data" / SAMPLE_NAME
        with importlib.resources.as_file(folder) as path:
            images, labels = read_idx_split(Path(path), split)
    elif _looks_like_path(name):
        images, labels = read_idx_split(Path(name), split)
    else:
        images, labels = _load_tfds(name, split, data_dir)
        check_image_size(images.shape[1:3], f"TFDS dataset {name!r} ({split})")
    return Dataset(images=images, labels=labels, name=name, split=split)


def _looks_like_path(name: str) -> bool:
    return os.path.sep in name or name.startswith(".") or os.path.exists(name)


# ---------------------------------------------------------------------------------------------
# IDX files (the MNIST / Fashion-MNIST distribution format)


def find_idx_file(folder: Path, split: str, kind: str) -> Path:
    """The IDX file for ``split`` and ``kind`` (``"images"``/``"labels"``) in ``folder``."""
    prefix = _IDX_PREFIX[split]
    ndim = 3 if kind == "images" else 1
    stems = (f"{prefix}-{kind}-idx{ndim}-ubyte", f"{prefix}-{kind}.idx{ndim}-ubyte")
    for stem in stems:
        for suffix in ("", ".gz"):
            candidate = folder / (stem + suffix)
            try:
                if candidate.is_file():
                    return candidate
            except OSError as e:  # a folder without search permission
                raise DataError(f"cannot read dataset folder {folder}: {e.strerror or e}") from None
    raise DataError(
        f"no {split} {kind} IDX file in {folder} (looked for {stems[0]}[.gz]); a dataset folder "
        "holds the four MNIST-format files train-images-idx3-ubyte, train-labels-idx1-ubyte, "
        "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (.gz or not)"
    )


def read_idx_split(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images ``uint8[N, H, W, 1]`` and labels ``int32[N]`` of one split of an IDX folder.

    The other split's image header is read too (a few bytes), so a folder whose train and test
    images differ in size fails here rather than in a compiled step later.

    Raises:
        DataError: a missing, unreadable or malformed file, counts that disagree, images smaller
            than :data:`MIN_IMAGE_SIDE` or of another size than the other split's.
    """
    try:
        is_dir = folder.is_dir()
    except OSError as e:  # e.g. a parent folder without search permission
        raise DataError(f"cannot read dataset folder {folder}: {e.strerror or e}") from None
    if not is_dir:
        raise DataError(f"dataset folder {folder} does not exist (or is not a folder)")
    images_path = find_idx_file(folder, split, "images")
    images = read_idx(images_path)
    labels = read_idx(find_idx_file(folder, split, "labels"))
    if images.ndim != 3:
        raise DataError(f"image IDX file {images_path} has {images.ndim} dimensions, expected 3 (N, H, W)")
    if labels.ndim != 1:
        raise DataError(f"label IDX file in {folder} has {labels.ndim} dimensions, expected 1")
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{folder}: {images.shape[0]} {split} images but {labels.shape[0]} labels")
    if images.shape[0] == 0:
        raise DataError(f"{folder}: the {split} split is empty")
    check_image_size(images.shape[1:3], str(images_path))
    other = next(s for s in SPLITS if s != split)
    other_shape = _idx_image_shape(folder, other)
    if other_shape is not None and other_shape != images.shape[1:3]:
        raise DataError(
            f"{folder}: the {split} images are {images.shape[1]}x{images.shape[2]} but the {other} images are "
            f"{other_shape[0]}x{other_shape[1]}; both splits of a dataset must have one image size"
        )
    return images[..., None], labels.astype(np.int32)


def _idx_image_shape(folder: Path, split: str) -> tuple[int, int] | None:
    """``(H, W)`` from the header of ``split``'s image file, or None if it is absent or unreadable.

    Only for the cross-split check: that split's own problems are reported when it is loaded.
    """
    try:
        dims = read_idx_header(find_idx_file(folder, split, "images"))
    except DataError:
        return None
    return (dims[1], dims[2]) if len(dims) == 3 else None


def check_image_size(hw: tuple[int, ...], where: str) -> None:
    """Refuses images smaller than ``MIN_IMAGE_SIDE`` on a side (models and figures need that much)."""
    if len(hw) != 2 or min(hw) < MIN_IMAGE_SIDE:
        size = "x".join(str(v) for v in hw)
        raise DataError(
            f"{where}: images are {size}; jaxae needs images of at least {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE} pixels"
        )


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
    if header_only:
        return dims
    header_len = 4 + 4 * ndim
    expected = math.prod(dims)  # a Python int: a product of 32-bit sizes cannot overflow it
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
    body = _read_up_to(stream, expected)
    if len(body) < expected:
        raise DataError(
            f"{path} is truncated: header shape {tuple(dims)} needs {expected} bytes of data, found {len(body)}"
        )
    if stream.read(1):
        raise DataError(
            f"{path} is longer than its header says: header shape {tuple(dims)} needs {expected} bytes of data"
        )
    try:
        return np.frombuffer(body, dtype=_IDX_DTYPES[type_code]).reshape(dims)
    except ValueError as e:  # e.g. a zero dimension next to sizes numpy cannot index
        raise DataError(f"{path}: header shape {tuple(dims)} is not a usable array shape ({e})") from None


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Writes a uint8 array as an IDX file (gzip-compressed when ``path`` ends in ``.gz``)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    raw = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    path = Path(path)
    path.write_bytes(gzip.compress(raw, mtime=0) if path.suffix == ".gz" else raw)


# ---------------------------------------------------------------------------------------------
# TensorFlow Datasets


def _load_tfds(name: str, split: str, data_dir: str | None) -> tuple[np.ndarray, np.ndarray]:
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
    n = len(source)
    if n == 0:
        raise DataError(f"TFDS dataset {name!r} split {split!r} is empty")
    from tqdm.auto import tqdm

    opencv_advice = _OpenCvAdviceFilter()  # TFDS logs it on the first image it decodes
    absl_logger.addFilter(opencv_advice)
    try:
        first = np.asarray(source[0]["image"])
        images = np.empty((n, *first.shape), np.uint8)
        labels = np.empty((n,), np.int32)
        for i in tqdm(range(n), desc=f"reading {name} {split}", unit="img", disable=n < 20_000, leave=False):
            example = source[i]
            images[i] = np.asarray(example["image"])
            labels[i] = int(example["label"])
    finally:
        absl_logger.removeFilter(opencv_advice)
    if images.ndim == 3:
        images = images[..., None]
    return images, labels


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
