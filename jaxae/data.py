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
import os
import struct
from pathlib import Path

import numpy as np

from jaxae.errors import DataError

SAMPLE_NAME = "mnist-sample"
SPLITS = ("train", "test")
_IDX_PREFIX = {"train": "train", "test": "t10k"}
_IDX_DTYPES = {0x08: np.uint8}


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
        import jax.numpy as jnp

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
            if candidate.is_file():
                return candidate
    raise DataError(
        f"no {split} {kind} IDX file in {folder} (looked for {stems[0]}[.gz]); a dataset folder "
        "holds the four MNIST-format files train-images-idx3-ubyte, train-labels-idx1-ubyte, "
        "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (.gz or not)"
    )


def read_idx_split(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    if not folder.is_dir():
        raise DataError(f"dataset folder {folder} does not exist (or is not a folder)")
    images = read_idx(find_idx_file(folder, split, "images"))
    labels = read_idx(find_idx_file(folder, split, "labels"))
    if images.ndim != 3:
        raise DataError(f"image IDX file in {folder} has {images.ndim} dimensions, expected 3")
    if labels.ndim != 1:
        raise DataError(f"label IDX file in {folder} has {labels.ndim} dimensions, expected 1")
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{folder}: {images.shape[0]} {split} images but {labels.shape[0]} labels")
    if images.shape[0] == 0:
        raise DataError(f"{folder}: the {split} split is empty")
    return images[..., None], labels.astype(np.int32)


def read_idx(path: Path) -> np.ndarray:
    """Reads one IDX file (gzip-compressed or not, told by content), validating every byte count.

    Raises:
        DataError: unreadable, wrong magic number, unsupported element type, or a body whose
            length does not match the header.
    """
    try:
        raw = Path(path).read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"cannot read IDX file {path}: {e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(
            f"{path} is not an IDX file (bad magic number {raw[:4].hex() or 'empty'}; "
            "expected 0000 followed by a type byte and a dimension count)"
        )
    type_code, ndim = raw[2], raw[3]
    if type_code not in _IDX_DTYPES:
        raise DataError(f"{path}: IDX element type 0x{type_code:02x} is not supported (only unsigned bytes, 0x08)")
    if ndim == 0:
        raise DataError(f"{path}: IDX header declares zero dimensions")
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise DataError(f"{path} is truncated inside its header")
    dims = struct.unpack(f">{ndim}I", raw[4:header_len])
    expected = int(np.prod(dims, dtype=np.int64))
    body = len(raw) - header_len
    if body != expected:
        what = "truncated" if body < expected else "longer than its header says"
        raise DataError(f"{path} is {what}: header shape {tuple(dims)} needs {expected} bytes of data, found {body}")
    return np.frombuffer(raw, dtype=_IDX_DTYPES[type_code], offset=header_len).reshape(dims)


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
