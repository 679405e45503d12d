"""Prepares the TFDS fixture the tests read: real Fashion-MNIST, cut small, built by TFDS itself.

Command:   python tests/data/prepare_tfds_fixture.py --fashion-dir /usr/share/datasets/fashion-mnist
           (a Python with `pip install 'jaxae[tfds-build]'`, i.e. tensorflow-cpu next to
           tensorflow-datasets 4.9.10, and pillow; jaxae itself is not imported)
Runtime:   about 20 seconds on a 2-core CPU, most of it importing TensorFlow; no network.
Expected:  tests/data/tfds/fashion_mnist/3.0.1/ with dataset_info.json, features.json,
           label.labels.txt and one array_record shard per split: the first 2,000 train and
           2,000 test images of Fashion-MNIST, 2.6 MB in all (each shard is 1.3 MB); and
           tests/data/fashion_mnist_fixture.json, the label counts and a checksum of every
           (image, label) pair taken from the IDX files, which tests/test_tfds.py compares with
           what jaxae reads back. Running it again gives the same shards byte for byte.

`--fashion-dir` is the folder with the four original Fashion-MNIST IDX files (train-images-idx3-ubyte.gz,
train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz; Debian ships
them in `dataset-fashion-mnist` under /usr/share/datasets/fashion-mnist). Fashion-MNIST is
(c) Zalando SE, MIT licence.

How: TFDS's registered `fashion_mnist` builder (tensorflow_datasets/image_classification/mnist.py)
does all the preparing - decoding the IDX files, PNG-encoding the images, writing array_record
shards and dataset_info.json. Only two things are set from outside:

* its one download call, `dl_manager.download_and_extract({key: URL})`, is answered with the
  local files, decompressed as download_and_extract would leave them (the builder reads them raw),
  so no network is needed and no checksum of a download is checked;
* TFDS's own `DownloadConfig(max_examples_per_split=...)` keeps the first N examples the builder
  yields per split, i.e. the first N images of each IDX file, in file order.

Why this folder and not experiments/: it makes a test fixture, not a published result, and the
recipe belongs beside the files it made.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from unittest import mock

HERE = Path(__file__).resolve().parent
NAME, VERSION = "fashion_mnist", "3.0.1"
IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def read_idx_gz(path: Path):
    """A uint8 IDX file as a NumPy array (no jaxae: the build environment need not have it)."""
    import numpy as np

    raw = gzip.decompress(path.read_bytes())
    assert raw[:3] == b"\0\0\x08", f"{path}: not an unsigned-byte IDX file"
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def examples_sha256(images, labels) -> str:
    """One digest of a split's (image, label) pairs that does not depend on their order (TFDS
    shuffles examples when it writes them): sha256 over the sorted sha256 of each label byte +
    image bytes. tests/test_tfds.py computes the same."""
    digests = sorted(
        hashlib.sha256(bytes([int(y)]) + x.tobytes()).digest() for x, y in zip(images, labels, strict=True)
    )
    return hashlib.sha256(b"".join(digests)).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fashion-dir", type=Path, required=True, help="the four original Fashion-MNIST .gz IDX files")
    parser.add_argument("--out", type=Path, default=HERE / "tfds", help="TFDS data directory to write")
    parser.add_argument("--per-split", type=int, default=2000, help="first N images of each split to keep")
    args = parser.parse_args()

    import tensorflow_datasets as tfds

    manifest = {
        "dataset": f"{NAME}:{VERSION}",
        "made_by": "tests/data/prepare_tfds_fixture.py",
        "tensorflow_datasets": tfds.__version__,
        "examples_sha256": "sha256 over the sorted sha256 digests of each example's label byte + 784 image bytes",
        "idx_sha256": {},  # of the decompressed source files: gzip headers differ between copies
        "splits": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        local = {}  # original file name -> decompressed local copy
        for split, files in IDX_FILES.items():
            for name in files:
                source = args.fashion_dir / name
                raw = gzip.decompress(source.read_bytes())
                manifest["idx_sha256"][name.removesuffix(".gz")] = hashlib.sha256(raw).hexdigest()
                local[name] = tmp / name.removesuffix(".gz")
                local[name].write_bytes(raw)
            images, labels = (read_idx_gz(args.fashion_dir / name) for name in files)
            images, labels = images[: args.per_split], labels[: args.per_split]
            manifest["splits"][split] = {
                "num_examples": len(labels),
                "taken": f"the first {len(labels)} of {files[0]} / {files[1]}",
                "label_counts": {str(k): v for k, v in sorted(collections.Counter(labels.tolist()).items())},
                "examples_sha256": examples_sha256(images, labels),
            }

        def download_and_extract(self, url_or_urls):
            # The builder asks for {key: URL}; the URL's file name is the original file's name.
            return {key: str(local[url.rsplit("/", 1)[-1]]) for key, url in url_or_urls.items()}

        builder = tfds.builder(NAME, data_dir=tmp / "build", file_format="array_record")
        assert str(builder.version) == VERSION, builder.version
        config = tfds.download.DownloadConfig(max_examples_per_split=args.per_split)
        with mock.patch.object(tfds.download.DownloadManager, "download_and_extract", download_and_extract):
            builder.download_and_prepare(download_config=config)

        built = Path(builder.data_dir)
        for split, info in manifest["splits"].items():
            assert builder.info.splits[split].num_examples == info["num_examples"], builder.info.splits[split]
        target = args.out / NAME
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(built, target / VERSION)
    (HERE / "fashion_mnist_fixture.json").write_text(json.dumps(manifest, indent=2) + "\n")
    total = sum(p.stat().st_size for p in (target / VERSION).iterdir())
    print(f"wrote {target / VERSION} ({total / 1e6:.2f} MB) and {HERE / 'fashion_mnist_fixture.json'}")


if __name__ == "__main__":
    main()
