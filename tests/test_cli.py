import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxae import cli
from jaxae.data import write_idx


def run_cli(*args, cwd=None):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "jaxae", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600
    )


def test_train_then_evaluate_end_to_end(tmp_path, idx_folder):
    workdir = tmp_path / "run"
    proc = run_cli(
        "train",
        "--dataset",
        str(idx_folder),
        "--epochs",
        "3",
        "--batch-size",
        "64",
        "--workdir",
        str(workdir),
        "--no-progress",
    )
    assert proc.returncode == 0, proc.stderr
    for name in ("metrics.jsonl", "config.json", "reconstructions.png", "loss.png"):
        assert (workdir / name).stat().st_size > 0, name
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    for key in ("epoch", "train_loss", "test_loss", "test_mse", "samples_per_s", "seconds"):
        assert all(np.isfinite(r[key]) for r in records), key
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    config = json.loads((workdir / "config.json").read_text())
    assert config["batch_size"] == 64 and config["lr"] == 1e-3 and config["variant"] == "vanilla"
    assert (workdir / "reconstructions.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    proc = run_cli("evaluate", "--workdir", str(workdir))
    assert proc.returncode == 0, proc.stderr
    evaluated = json.loads(proc.stdout.strip().splitlines()[-1])
    assert evaluated["epoch"] == 3
    assert evaluated["test_mse"] == pytest.approx(records[-1]["test_mse"], rel=1e-6)


def test_document_defaults_in_help():
    parser = cli.build_parser()
    config = cli.train_config(parser.parse_args(["train"]))
    assert (config.epochs, config.batch_size, config.lr, config.variant, config.dataset, config.normalize) == (
        20,
        256,
        1e-3,
        "vanilla",
        "mnist-sample",
        "unit",
    )
    help_text = " ".join(parser._subparsers._group_actions[0].choices["train"].format_help().split())
    for shown in ("(default: 20)", "(default: 256)", "(default: 0.001)", "(default: vanilla)", "(default: 128,64)"):
        assert shown in help_text


def _assert_one_line_error(capsys, code, pattern):
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("jaxae: error: ")
    assert pattern in lines[0]


def _bad_idx_folder(tmp_path, mutate):
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((10, 28, 28), np.uint8))
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(10, np.uint8))
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((10, 28, 28), np.uint8))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(10, np.uint8))
    mutate(tmp_path / "train-images-idx3-ubyte")
    return tmp_path


@pytest.mark.parametrize(
    "make_args, pattern",
    [
        (lambda tmp: ["--dataset", "no_such_dataset_xyz"], "unknown dataset 'no_such_dataset_xyz'"),
        (lambda tmp: ["--dataset", str(tmp)], "no train images IDX file"),
        (
            lambda tmp: [
                "--dataset",
                str(_bad_idx_folder(tmp, lambda p: p.write_bytes(b"PK\x03\x04" + p.read_bytes()))),
            ],
            "bad magic number",
        ),
        (
            lambda tmp: ["--dataset", str(_bad_idx_folder(tmp, lambda p: p.write_bytes(p.read_bytes()[:-5])))],
            "is truncated",
        ),
        (
            lambda tmp: [
                "--dataset",
                str(_bad_idx_folder(tmp, lambda p: write_idx(p, np.zeros((10, 20, 20), np.uint8)))),
            ],
            "the train images are 20x20x1 but the test images are 28x28x1",
        ),
        (
            lambda tmp: [
                "--dataset",
                str(_bad_idx_folder(tmp, lambda p: write_idx(p, np.zeros((10, 1, 1), np.uint8)))),
            ],
            "images are 1x1; jaxae needs images of at least 8x8",
        ),
        (lambda tmp: ["--dataset", "mnist", "--tfds-data-dir", str(tmp)], "tfds build mnist"),
        (lambda tmp: ["--batch-size", "5000"], "larger than the 4000-image train split"),
        (lambda tmp: ["--epochs", "0"], "--epochs must be positive"),
        (lambda tmp: ["--epochs", "-3"], "--epochs must be positive"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, make_args, pattern):
    code = cli.main(["train", *make_args(tmp_path), "--workdir", str(tmp_path / "out"), "--no-progress"])
    _assert_one_line_error(capsys, code, pattern)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "train_images, pattern",
    [
        (
            np.zeros((10, 28, 28, 3, 1), np.uint8),
            "has 5 dimensions (10, 28, 28, 3, 1), expected (N, H, W) or (N, H, W, C)",
        ),
        (np.zeros((10, 28, 28, 2), np.uint8), "with 2 channels; jaxae takes grayscale (C=1) or RGB (C=3) images"),
        (np.zeros((10, 28, 28, 4), np.uint8), "with 4 channels; jaxae takes grayscale (C=1) or RGB (C=3) images"),
        (np.zeros((10, 28, 28, 3), np.uint8), "the train images are 28x28x3 but the test images are 28x28x1"),
    ],
)
def test_idx_images_of_a_shape_jaxae_does_not_take_stop_train_before_any_compile(
    tmp_path, capsys, monkeypatch, train_images, pattern
):
    import jaxae.loop

    def no_build(*args, **kwargs):
        raise AssertionError("a model was built (and would be compiled) for data that is refused")

    monkeypatch.setattr(jaxae.loop, "build", no_build)

    def replace_train_images(path):
        path.unlink()
        write_idx(path.with_name("train-images-idx4-ubyte"), train_images)

    (tmp_path / "data").mkdir()
    folder = _bad_idx_folder(tmp_path / "data", replace_train_images)
    code = cli.main(["train", "--dataset", str(folder), "--workdir", str(tmp_path / "out"), "--no-progress"])
    _assert_one_line_error(capsys, code, pattern)
    assert not (tmp_path / "out").exists()


def test_evaluate_without_checkpoint(tmp_path, capsys):
    code = cli.main(["evaluate", "--workdir", str(tmp_path)])
    _assert_one_line_error(capsys, code, "no checkpoints in")


def test_bad_input_from_a_real_process_has_no_traceback(tmp_path):
    proc = run_cli("train", "--dataset", str(tmp_path / "missing"), "--workdir", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("jaxae: error: dataset folder")
    proc = run_cli("train", "--dataset", "mnist", "--tfds-data-dir", str(tmp_path / "tfds"))
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "tfds build mnist" in proc.stderr


@pytest.mark.slow  # samples.png, the IW bound and the probe are each tested faster (test_train, test_objectives, test_colour)
def test_vae_run_writes_samples_and_evaluate_adds_iw_and_probe(tmp_path, idx_folder, capsys):
    workdir = tmp_path / "vae"
    code = cli.main(
        [
            "train",
            "--variant",
            "vae",
            "--dataset",
            str(idx_folder),
            "--epochs",
            "2",
            "--batch-size",
            "64",
            "--workdir",
            str(workdir),
            "--no-progress",
        ]
    )
    assert code == 0
    assert (workdir / "samples.png").read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    assert cli.main(["evaluate", "--workdir", str(workdir), "--iw-samples", "8", "--probe"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["iw_samples"] == 8
    assert 0 < out["test_nll_iw"] < out["test_neg_elbo"] * 1.05
    assert 0.1 < out["probe_accuracy"] <= 1 and out["probe_accuracy_pixels"] > 0.5


def test_iw_samples_needs_a_vae(tmp_path, idx_folder, capsys):
    workdir = tmp_path / "ae"
    assert (
        cli.main(
            [
                "train",
                "--dataset",
                str(idx_folder),
                "--epochs",
                "1",
                "--batch-size",
                "64",
                "--workdir",
                str(workdir),
                "--no-progress",
            ]
        )
        == 0
    )
    capsys.readouterr()
    code = cli.main(["evaluate", "--workdir", str(workdir), "--iw-samples", "8"])
    _assert_one_line_error(capsys, code, "--iw-samples needs a vae or iwae run")


def test_variant_flags_reach_the_config(tmp_path, idx_folder):
    args = cli.build_parser().parse_args(
        [
            "train",
            "--variant",
            "sparse",
            "--sparsity",
            "kl",
            "--sparsity-target",
            "0.1",
            "--sparsity-weight",
            "0.5",
            "--noise-std",
            "0.3",
            "--mask-prob",
            "0.2",
            "--beta",
            "4",
            "--likelihood",
            "gaussian",
            "--arch",
            "mlp",
        ]
    )
    cfg = cli.train_config(args)
    assert (cfg.variant, cfg.sparsity, cfg.sparsity_target, cfg.sparsity_weight) == ("sparse", "kl", 0.1, 0.5)
    assert (cfg.noise_std, cfg.mask_prob, cfg.beta, cfg.likelihood) == (0.3, 0.2, 4.0, "gaussian")


def _main_exit_code(argv):
    """``cli.main``'s exit status, whether it returns it or argparse exits with it."""
    try:
        return cli.main(argv)
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize(
    "flags, pattern",
    [
        (["--hidden-dims", "abc"], "--hidden-dims: expected comma-separated positive integers like 128,64, got 'abc'"),
        (["--betas", "abc"], "--betas: expected two comma-separated numbers like 0.9,0.999, got 'abc'"),
        (["--betas", "0.9"], "--betas: expected two comma-separated numbers"),
        (["--hidden-dims", "128,,64"], "--hidden-dims: expected comma-separated positive integers like 128,64"),
        (["--hidden-dims", "128,0"], "--hidden-dims: expected comma-separated positive integers like 128,64"),
        (["--seed", str(2**70)], "--seed must be an integer from 0 to 4294967295"),
        (["--seed", str(2**32)], "--seed must be an integer from 0 to 4294967295"),
        (["--seed=-1"], "--seed must be an integer from 0 to 4294967295"),
        (["--variant", "vae", "--beta", "inf"], "--beta must be a finite number, got inf"),
        (["--variant", "sparse", "--sparsity-weight", "inf"], "--sparsity-weight must be a finite number, got inf"),
        (["--lr", "nan"], "--lr must be a finite number, got nan"),
        (["--variant", "denoising", "--noise-std", "inf"], "--noise-std must be a finite number"),
        (["--sparsity-target", "nan"], "--sparsity-target must be a finite number"),
        (["--mask-prob", "inf"], "--mask-prob must be a finite number"),
        (["--epochs", "ten"], "argument --epochs: invalid int value: 'ten'"),
        (["--latent-dim", "0"], "--latent-dim must be positive"),
        (["--latent-dim", str(10**11)], "parameters: training needs at least"),
    ],
)
def test_bad_flag_values_are_one_line_and_exit_2(tmp_path, capsys, flags, pattern):
    code = _main_exit_code(["train", *flags, "--workdir", str(tmp_path / "out"), "--no-progress"])
    _assert_one_line_error(capsys, code, pattern)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_bad_flag_values_from_a_real_process_have_no_traceback(tmp_path):
    for flags in (["--hidden-dims", "abc"], ["--seed", str(2**70)]):
        proc = run_cli("train", *flags, "--workdir", str(tmp_path / "out"))
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert proc.stderr.startswith("jaxae: error: ")
    assert not (tmp_path / "out").exists()


def test_evaluate_of_a_model_with_nan_parameters_prints_null_and_fails(tmp_path, capsys):
    import jax
    import jax.numpy as jnp

    from jaxae import checkpoint
    from jaxae.train import TrainConfig, build

    config = TrainConfig()
    _, state = build(config, (28, 28, 1))
    state = state.replace(params=jax.tree_util.tree_map(lambda p: jnp.full_like(p, jnp.nan), state.params))
    checkpoint.save(tmp_path / "nan", state, config)
    capsys.readouterr()
    assert cli.main(["evaluate", "--workdir", str(tmp_path / "nan")]) == 1
    out, err = capsys.readouterr()
    metrics = json.loads(out)  # valid JSON: null, not NaN
    assert metrics["test_loss"] is None and metrics["test_mse"] is None
    assert err.count("\n") == 1 and "not finite" in err


def test_a_machine_fault_at_the_start_of_a_run_is_one_line_exit_1(tmp_path, capsys, monkeypatch):
    # A full disk while fit writes config.json is no bad input: one line and exit 1, no traceback.
    import errno
    from pathlib import Path

    real_write_text = Path.write_text

    def full_disk(self, *args, **kwargs):
        if self.name == "config.json":
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real_write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_disk)
    code = cli.main(["train", "--epochs", "1", "--workdir", str(tmp_path / "run"), "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 1 and err.count("\n") == 1, err
    assert err.startswith("jaxae: error: No space left on device: ") and "config.json" in err, err
