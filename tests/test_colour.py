"""Colour and other image sizes end to end: every variant trains, evaluates, probes and draws its
figures on a colour IDX folder and on the committed TFDS data, and a trained colour conv model
goes through PyTorch and back with ``--check``."""

import json
from pathlib import Path

import jax
import matplotlib.image
import numpy as np
import pytest

from jaxae import checkpoint, cli
from jaxae.data import load_dataset, write_idx_folder
from jaxae.objectives import VARIANTS

TFDS_DIR = Path(__file__).parent / "data" / "tfds"
RUNS = [(name, arch) for name, variant in VARIANTS.items() for arch in variant.archs]


def _colourise(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Grey digits [N, H, W, 1] -> each drawn in its own colour on its own background."""
    ink = images.astype(np.float32) / 255
    fg, bg = rng.uniform(0, 1, (2, len(images), 1, 1, 3))
    return np.round(255 * (ink * fg + (1 - ink) * bg)).astype(np.uint8)


@pytest.fixture(scope="module")
def colour_folder(tmp_path_factory, sample_train, sample_test):
    """256 train / 64 test sample digits in colour, cropped to 28x20 (not square, sides divisible by 4)."""
    rng = np.random.default_rng(0)
    folder = tmp_path_factory.mktemp("colour")
    splits = {}
    for split, data, n in (("train", sample_train, 256), ("test", sample_test, 64)):
        pick = rng.choice(len(data), n, replace=False)
        splits[split] = (_colourise(data.images[pick, :, 4:24], rng), data.labels[pick])
    write_idx_folder(folder, **splits)
    return folder


def _train(capsys, workdir, *flags):
    code = cli.main(["train", "--workdir", str(workdir), "--epochs", "1", "--no-progress", *flags])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _is_colour_picture(path: Path) -> bool:
    pixels = matplotlib.image.imread(path)[..., :3]
    # a picture drawn through a grey colour map has R = G = B in every pixel; the test images'
    # colours differ by far more than the PNG's 1/255 steps
    return bool(np.mean(np.ptp(pixels, axis=-1) > 1.5 / 255) > 0.02)


# The conv runs are the slow ones (about a minute of CPU); the MLP runs and the colour conv
# model's round trip through PyTorch stay in make test.
_COLOUR_RUNS = [pytest.param(v, a, marks=pytest.mark.slow) if a == "conv" else (v, a) for v, a in RUNS]


@pytest.mark.parametrize(("variant", "arch"), _COLOUR_RUNS)
def test_every_variant_trains_evaluates_probes_and_draws_in_colour(colour_folder, tmp_path, capsys, variant, arch):
    workdir = tmp_path / "run"
    records = _train(
        capsys, workdir, "--dataset", str(colour_folder), "--variant", variant, "--arch", arch, "--batch-size", "64"
    )
    assert np.isfinite(records[-1]["test_loss"])
    assert checkpoint.read_meta(workdir)[1]["input_shape"] == [28, 20, 3]
    assert _is_colour_picture(workdir / "reconstructions.png")
    if variant == "vae":
        assert _is_colour_picture(workdir / "samples.png")
    code = cli.main(["evaluate", "--workdir", str(workdir), "--probe"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and np.isfinite(out["test_loss"]) and 0 <= out["probe_accuracy"] <= 1


# The conv runs on the TFDS files are the slow ones (about a minute of CPU): make test-all runs them.
_TFDS_RUNS = [pytest.param(v, a, marks=pytest.mark.slow) if a == "conv" else (v, a) for v, a in RUNS]


@pytest.mark.parametrize(("variant", "arch"), _TFDS_RUNS)
def test_every_variant_trains_on_the_committed_tfds_data(tmp_path, capsys, variant, arch):
    records = _train(
        capsys,
        tmp_path / "run",
        *("--dataset", "fashion_mnist", "--tfds-data-dir", str(TFDS_DIR)),
        *("--variant", variant, "--arch", arch, "--batch-size", "500"),
    )
    assert records[-1]["step"] == 4 and np.isfinite(records[-1]["test_loss"])


@pytest.mark.slow
def test_a_trained_colour_conv_model_goes_through_pytorch_and_back(colour_folder, tmp_path, capsys):
    pytest.importorskip("torch")
    trained = tmp_path / "trained"
    _train(capsys, trained, "--dataset", str(colour_folder), "--arch", "conv", "--batch-size", "64")
    exported = tmp_path / "model.pt"
    assert cli.main(["export", "--workdir", str(trained), "--out", str(exported), "--with-optimizer"]) == 0
    capsys.readouterr()
    back = tmp_path / "back"
    code = cli.main(["convert", str(exported), "--out", str(back), "--dataset", str(colour_folder), "--check"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["passed"] and report["image_shape"] == [28, 20, 3]
    assert report["examples"] == len(load_dataset(str(colour_folder), "test"))
    assert report["max_abs_diff_parameters"] == 0.0 and report["max_abs_diff_outputs"] <= 1e-5
    _, original, _ = checkpoint.restore(trained)
    _, converted, _ = checkpoint.restore(back)
    for a, b in zip(
        jax.tree.leaves((original.params, original.opt_state)),
        jax.tree.leaves((converted.params, converted.opt_state)),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _folder(path: Path, shape: tuple[int, ...], seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (96, *shape), dtype=np.uint8)
    labels = rng.integers(0, 3, 96).astype(np.int32)
    write_idx_folder(path, train=(images[:64], labels[:64]), test=(images[64:], labels[64:]))
    return str(path)


@pytest.mark.slow
def test_evaluate_refuses_a_dataset_whose_images_changed_shape(tmp_path, capsys):
    # 16x12x3 and 12x16x3 images hold as many values: the model would score the wrong reading of
    # every pixel without complaint
    data = _folder(tmp_path / "data", (16, 12, 3))
    _train(capsys, tmp_path / "run", "--dataset", data, "--arch", "conv", "--batch-size", "32")
    for name in ("train-images-idx4-ubyte.gz", "t10k-images-idx4-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        (tmp_path / "data" / name).unlink()
    (tmp_path / "data" / "t10k-labels-idx1-ubyte.gz").unlink()
    _folder(tmp_path / "data", (12, 16, 3))
    for flags in ([], ["--probe"]):
        code = cli.main(["evaluate", "--workdir", str(tmp_path / "run"), *flags])
        captured = capsys.readouterr()
        assert code == 2 and captured.out == "", captured.out
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and "holds a model for 16x12x3 images, not 12x16x3" in lines[0], lines


@pytest.mark.slow  # a conv run, evaluate and resume; test_checkpoints_of_format_1_still_restore covers old formats
def test_a_checkpoint_from_before_image_shapes_were_saved_takes_its_dataset_s(tmp_path, capsys, monkeypatch):
    # Format 2 recorded a shape read off the parameters, assuming square images: a conv model for
    # 16x64 images (64 feature positions) was recorded as one for 32x32 images.
    data = _folder(tmp_path / "data", (16, 64, 1))
    with monkeypatch.context() as old:
        old.setattr(checkpoint, "FORMAT_VERSION", 2)
        for module in (checkpoint, checkpoint.shapes):  # the save's metadata and its config check, as then
            old.setattr(module, "input_shape_of", lambda state: [32, 32, 1])
        records = _train(capsys, tmp_path / "run", "--dataset", data, "--arch", "conv", "--batch-size", "32")
    meta = checkpoint.read_meta(tmp_path / "run")[1]
    assert meta["format"] == 2 and meta["input_shape"] == [32, 32, 1]
    assert cli.main(["evaluate", "--workdir", str(tmp_path / "run")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["test_loss"] == pytest.approx(records[-1]["test_loss"], rel=1e-6)  # read as 16x64, as trained
    code = cli.main(
        ["train", "--workdir", str(tmp_path / "run"), "--dataset", data, "--arch", "conv", "--batch-size", "32"]
        + ["--epochs", "2", "--resume", "--no-progress"]
    )
    assert code == 0, capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["vanilla", "vae"])
def test_conv_channels_build_a_deeper_conv_net_for_64x64x3_images_that_goes_through_pytorch_and_back(
    tmp_path, capsys, variant
):
    pytest.importorskip("torch")
    data = _folder(tmp_path / "data", (64, 64, 3))
    flags = ("--dataset", data, "--arch", "conv", "--variant", variant, "--conv-channels", "8,16,32")
    records = _train(capsys, tmp_path / "run", *flags, "--batch-size", "32")
    assert np.isfinite(records[-1]["test_loss"])
    assert json.loads((tmp_path / "run" / "config.json").read_text())["conv_channels"] == [8, 16, 32]
    _, state, _ = checkpoint.restore(tmp_path / "run")
    encoder = state.params["encoder"]["layers"]
    assert [encoder[i]["kernel"].shape for i in sorted(encoder)] == [(3, 3, 3, 8), (3, 3, 8, 16), (3, 3, 16, 32)]
    assert state.params["project"]["kernel"].shape[-1] == 8 * 8 * 32  # 64 / 2^3 = 8 per side
    # the converter reads the stages off the file: no --conv-channels needed on the way back
    exported = tmp_path / "model.pt"
    assert cli.main(["export", "--workdir", str(tmp_path / "run"), "--out", str(exported)]) == 0
    capsys.readouterr()
    code = cli.main(["convert", str(exported), "--out", str(tmp_path / "back"), "--dataset", data, "--check"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["passed"] and report["image_shape"] == [64, 64, 3]
    assert report["max_abs_diff_parameters"] == 0.0 and report["max_abs_diff_outputs"] <= 1e-5
    converted = json.loads((tmp_path / "back" / "config.json").read_text())
    assert (converted["conv_channels"], converted["variant"]) == ([8, 16, 32], variant)


@pytest.mark.parametrize(
    "shape, channels, message",
    [
        (
            (28, 28, 1),
            "16,32,64",
            "--conv-channels 16,32,64 halves each side 3 times, so it needs image sides divisible by 8, got 28x28",
        ),
        ((64, 64, 3), "16,0", "argument --conv-channels: expected comma-separated positive integers"),
    ],
)
def test_conv_channels_that_do_not_fit_the_images_are_one_line(tmp_path, capsys, shape, channels, message):
    data = _folder(tmp_path / "data", shape)
    argv = [
        "train",
        "--workdir",
        str(tmp_path / "run"),
        "--dataset",
        data,
        "--arch",
        "conv",
        "--conv-channels",
        channels,
    ]
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse refuses a flag it cannot read by exiting
        code = e.code
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
