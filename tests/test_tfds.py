"""TensorFlow Datasets as a source: a real prepared dataset read without TensorFlow, and names.

The fixture under ``tests/data/tfds`` is Fashion-MNIST cut to 2,000 train / 500 test images and
prepared by TFDS's own registered ``fashion_mnist`` builder in array_record format; how it was
made, and the checksums of the images it was made from, are in ``tests/data/prepare_tfds_fixture.py``
and ``tests/data/fashion_mnist_fixture.json``.
"""

from __future__ import annotations

import pytest

from jaxae import cli


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
