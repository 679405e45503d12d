"""The training loop's run-level guards: the workdir (empty, unusable, locked) and resuming over
a damaged metrics.jsonl.

The workdir checks must run before any data is loaded or anything compiled: tests replace
``load_dataset`` with one that fails the test if it is reached. Faults about processes (a
second run on one workdir, a killed holder, a read-only mount) use real processes.
"""

import dataclasses
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import jaxae
from jaxae import checkpoint, cli, loop
from jaxae.errors import JaxaeError
from jaxae.loop import LOCK_FILE, WorkdirLock, fit
from jaxae.train import TrainConfig

REPO = Path(__file__).resolve().parent.parent


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    env.update(
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        JAX_PLATFORMS="cpu",
        PYTHONUNBUFFERED="1",
        **extra,
    )
    return env


def _train_command(dataset, workdir, *flags) -> list[str]:
    return [sys.executable, "-m", "jaxae", "train", "--dataset", str(dataset), "--workdir", str(workdir)] + [
        "--batch-size",
        "128",
        "--no-progress",
        *flags,
    ]


@pytest.fixture
def no_data_loading(monkeypatch):
    """Fails the test if fit() gets as far as loading a dataset."""

    def refuse(*args, **kwargs):
        raise AssertionError("fit() loaded data before checking the workdir")

    monkeypatch.setattr(loop, "load_dataset", refuse)


def _one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jaxae: error: "), lines
    return lines[0]


# -- an empty workdir -------------------------------------------------------------------------


def test_an_empty_workdir_is_refused_and_the_current_folder_untouched(tmp_path, monkeypatch, capsys, no_data_loading):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.json").write_text("mine")
    for workdir in ("", "  "):
        with pytest.raises(JaxaeError, match="--workdir is empty"):
            fit(TrainConfig(epochs=1), workdir, progress=False)
    code = cli.main(["train", "--workdir", "", "--no-progress"])
    assert code == 2
    assert "--workdir is empty" in _one_error_line(capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]
    assert (tmp_path / "config.json").read_text() == "mine"


def test_a_run_that_fails_before_writing_leaves_no_folder_it_created(tmp_path):
    workdir = tmp_path / "new" / "nested" / "run"
    with pytest.raises(JaxaeError, match="unknown dataset"):
        fit(TrainConfig(dataset="no_such_dataset", epochs=1), workdir, progress=False)
    assert list(tmp_path.iterdir()) == []  # its lock file and the three folders are gone


# -- a workdir that cannot be created or written ----------------------------------------------


def _under_a_file(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    return tmp_path / "notes.txt" / "run", "notes.txt is a file, not a folder"


def _dangling_symlink(tmp_path):
    (tmp_path / "run").symlink_to(tmp_path / "gone" / "scratch")
    return tmp_path / "run", "is a symbolic link to"


def _name_too_long(tmp_path):
    return tmp_path / ("r" * 300), "too long"


@pytest.mark.parametrize("make", [_under_a_file, _dangling_symlink, _name_too_long], ids=lambda f: f.__name__[1:])
def test_an_unusable_workdir_fails_before_loading_data(tmp_path, capsys, no_data_loading, make):
    workdir, reason = make(tmp_path)
    with pytest.raises(JaxaeError, match="cannot be used") as error:
        fit(TrainConfig(epochs=1), workdir, progress=False)
    assert reason in str(error.value) and str(workdir) in str(error.value)
    code = cli.main(["train", "--workdir", str(workdir), "--no-progress"])
    assert code == 2 and reason in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "gone").exists()  # a dangling link is reported, not followed


def test_a_read_only_file_system_fails_before_loading_data(tmp_path, monkeypatch, no_data_loading):
    """The OS call raises EROFS (monkeypatched; the real mount is the next test, where it can run)."""
    real_mkdir = Path.mkdir
    read_only = tmp_path / "ro"

    def mkdir(self, *args, **kwargs):
        if self == read_only or read_only in self.parents:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    with pytest.raises(JaxaeError, match=f"--workdir {read_only / 'run'} cannot be used: Read-only file system"):
        fit(TrainConfig(epochs=1), read_only / "run", progress=False)


def _can_mount() -> bool:
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return False
    probe = subprocess.run(["unshare", "-m", "mount", "-t", "tmpfs", "tmpfs", "/mnt"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_mount(), reason="needs root and unshare(1) to mount a read-only tmpfs")
def test_a_read_only_mount_is_one_line_from_a_real_process(tmp_path):
    """A real read-only tmpfs, mounted in a private mount namespace."""
    mountpoint = tmp_path / "ro"
    mountpoint.mkdir()
    script = 'mount -t tmpfs -o ro tmpfs "$1" && shift && exec "$@"'
    command = _train_command("mnist-sample", mountpoint / "run", "--epochs", "1")
    start = time.monotonic()
    proc = subprocess.run(
        ["unshare", "-m", "sh", "-c", script, "sh", str(mountpoint), *command],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = _one_error_line(proc.stderr)
    assert f"--workdir {mountpoint / 'run'} cannot be used: Read-only file system" in line
    assert time.monotonic() - start < 60


# -- one run per workdir ----------------------------------------------------------------------


def test_fit_refuses_a_workdir_another_run_holds(tmp_path, no_data_loading):
    workdir = tmp_path / "run"
    workdir.mkdir()
    with WorkdirLock(workdir):
        with pytest.raises(JaxaeError, match=rf"in use by another jaxae run \(PID {os.getpid()}\)"):
            fit(TrainConfig(epochs=1), workdir, progress=False)
    assert not (workdir / "metrics.jsonl").exists()


def _wait_for(path: Path, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert proc.poll() is None, f"exited with {proc.returncode}: {proc.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.1)


@pytest.mark.slow  # two real runs; the sweep's in-use folder and a killed run's lock are tested faster
def test_a_second_run_on_a_busy_workdir_exits_2_at_once_and_the_first_completes(tmp_path, idx_folder):
    workdir = tmp_path / "run"
    first = subprocess.Popen(
        _train_command(idx_folder, workdir, "--epochs", "2"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # Every save is held 4 s before its commit: the first run is surely still running.
        env=_env(JAXAE_TEST_SLOW_SAVE_SECONDS="4"),
    )
    try:
        _wait_for(workdir / (LOCK_FILE + ".holder"), first)
        start = time.monotonic()
        second = subprocess.run(
            _train_command(idx_folder, workdir, "--epochs", "2"), capture_output=True, text=True, env=_env(), timeout=60
        )
        took = time.monotonic() - start
        assert first.poll() is None, "the first run ended before the second one started"
        out, err = first.communicate(timeout=180)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert second.returncode == 2, second.stderr[-3000:]
    line = _one_error_line(second.stderr)
    assert f"{workdir} is in use by another jaxae run (PID {first.pid})" in line
    assert took < 30  # the interpreter and the imports, no data, no compiling
    assert first.returncode == 0, err[-3000:]
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert checkpoint.complete_steps(workdir) == [4, 8]
    assert checkpoint.unfinished_saves(workdir) == []
    assert not (workdir / (LOCK_FILE + ".holder")).exists()


def test_the_lock_of_a_killed_run_does_not_block_the_next(tmp_path, idx_folder):
    workdir = tmp_path / "run"
    workdir.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from jaxae.loop import WorkdirLock; "
            "lock = WorkdirLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(600)",
            str(workdir),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    try:
        assert holder.stdout.readline().strip() == "locked", holder.stderr.read()
        with pytest.raises(JaxaeError, match=f"PID {holder.pid}"):
            WorkdirLock(workdir).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # Its holder file (a dead PID) is still there; the lock itself died with the process.
    assert (workdir / (LOCK_FILE + ".holder")).read_text().split()[0] == str(holder.pid)
    result = fit(TrainConfig(dataset=str(idx_folder), epochs=1, batch_size=128), workdir, progress=False)
    assert [r["epoch"] for r in result.history] == [1]
    assert not (workdir / (LOCK_FILE + ".holder")).exists()


# -- resuming over a damaged metrics.jsonl ----------------------------------------------------


def test_resume_skips_damaged_metrics_lines_with_one_warning(tmp_path, idx_folder, capsys):
    workdir = tmp_path / "run"
    flags = ["--dataset", str(idx_folder), "--batch-size", "128", "--workdir", str(workdir), "--no-progress"]
    assert cli.main(["train", "--epochs", "1", *flags]) == 0
    metrics = workdir / "metrics.jsonl"
    good = metrics.read_bytes()
    damaged = [b"\xff\xfe\x00garbage", b'{"epoch": null}', b"[1, 2]", b'{"epoch": "2"}', b'{"loss": 1.0}', b"3"]
    metrics.write_bytes(good + b"\n".join(damaged) + b"\n")
    capsys.readouterr()
    assert cli.main(["train", "--epochs", "2", "--resume", *flags]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"jaxae: warning: skipped 6 unreadable lines of {metrics} (not an epoch's JSON record); "
        "the resumed run rewrites it without them"
    ]
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert json.loads(good) == records[0]  # the good line is kept as it was

    # The library warns (once) instead of printing.
    metrics.write_bytes(good + b'{"epoch": null}\n')
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable line of"):
        result = fit(TrainConfig(dataset=str(idx_folder), epochs=2, batch_size=128), workdir, resume=True)
    assert [r["epoch"] for r in result.history] == [1]  # from the good line; already at epoch 2


@pytest.mark.parametrize("command", ["train", "sweep"])
def test_a_conv_model_the_images_cannot_feed_fails_before_the_data_is_read(tmp_path, capsys, monkeypatch, command):
    from jaxae import sweep
    from jaxae.data import write_idx_folder

    images, labels = np.zeros((8, 30, 30, 3), np.uint8), np.zeros(8, np.int32)
    write_idx_folder(tmp_path / "data", train=(images, labels), test=(images, labels))

    def refuse(*args, **kwargs):
        raise AssertionError("the dataset was read before the model was checked against its image shape")

    monkeypatch.setattr(loop, "load_dataset", refuse)
    monkeypatch.setattr(sweep, "load_dataset", refuse)
    code = cli.main(
        [command, "--dataset", str(tmp_path / "data"), "--arch", "conv", "--workdir", str(tmp_path / "run")]
    )
    assert code == 2
    assert "needs image sides divisible by 4, got 30x30" in _one_error_line(capsys.readouterr().err)


# -- your own model, optimizer and arrays -----------------------------------------------------


class _TinyNet(nnx.Module):
    """A model of the user's own, following the contract: flat [B, D] in and out."""

    def __init__(self, d: int, rngs: nnx.Rngs):
        self.image_shape = (28, 28, 1)
        self.down = nnx.Linear(d, 16, rngs=rngs)
        self.up = nnx.Linear(16, d, rngs=rngs)

    def encode(self, x):
        return jax.nn.gelu(self.down(x))

    def decode(self, z):
        return jax.nn.sigmoid(self.up(z))

    def __call__(self, x):
        return self.decode(self.encode(x))


def _own_tx():
    schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-3, warmup_steps=4, decay_steps=16)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=1e-2))


def _arrays(sample_train, sample_test):
    return (sample_train.images[:512], None), (sample_test.images[:128], sample_test.labels[:128])


def test_fit_takes_your_own_module_optax_chain_and_arrays_and_resumes_exactly(tmp_path, sample_train, sample_test):
    train, test = _arrays(sample_train, sample_test)
    cfg = TrainConfig(batch_size=128, epochs=4, seed=3)

    def run(workdir, epochs, resume=False):
        model = _TinyNet(784, nnx.Rngs(params=0))
        return fit(
            dataclasses.replace(cfg, epochs=epochs),
            workdir,
            model=model,
            tx=_own_tx(),
            train=train,
            test=test,
            progress=False,
            resume=resume,
        )

    straight = run(tmp_path / "straight", 4)
    run(tmp_path / "halves", 2)
    resumed = run(tmp_path / "halves", 4, resume=True)
    for a, b in zip(jax.tree.leaves(straight.state), jax.tree.leaves(resumed.state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in straight.history]
    assert straight.history[-1]["train_loss"] < straight.history[0]["train_loss"]
    assert json.loads((tmp_path / "straight" / "config.json").read_text())["dataset"] == "arrays"
    assert "lr" not in straight.history[0]  # the schedule is the user's: jaxae does not know its lr
    # The checkpoint holds the user's model: restored into its template, not rebuilt from the config.
    with pytest.raises(JaxaeError, match="holds a model of your own"):
        checkpoint.restore(tmp_path / "straight")
    # Resumed without that model, it is not called damaged: the message says what to pass.
    with pytest.raises(JaxaeError, match=r"holds a model of your own.*model=<the same module>"):
        fit(cfg, tmp_path / "straight", train=train, test=test, progress=False, resume=True, save_every=1)
    _, template = jaxae.create_train_state(_TinyNet(784, nnx.Rngs(params=0)), _own_tx())
    restored = checkpoint.restore_state(tmp_path / "straight", template)
    np.testing.assert_array_equal(
        np.asarray(restored.params["up"]["bias"]), np.asarray(straight.state.params["up"]["bias"])
    )


class _NoDecodeLogits(_TinyNet):
    def encode_distribution(self, x):
        return self.down(x), self.down(x)


class _WrongShape(_TinyNet):
    def __call__(self, x):
        return self.encode(x)


@pytest.mark.parametrize(
    "model, variant, message",
    [
        (_NoDecodeLogits, "vae", r"_NoDecodeLogits does not follow .*calls model\.decode_logits\(\)"),
        (_WrongShape, "vanilla", r"_WrongShape\(x\) returns \(2, 16\) for x \[2, 784\]; the contract is"),
    ],
)
def test_a_model_off_the_contract_is_one_line_before_training(
    tmp_path, sample_train, sample_test, model, variant, message
):
    train, test = _arrays(sample_train, sample_test)
    with pytest.raises(JaxaeError, match=message):
        fit(TrainConfig(variant=variant), tmp_path / "r", model=model(784, nnx.Rngs(params=0)), train=train, test=test)
    assert not (tmp_path / "r").exists()


def test_a_run_on_arrays_says_so_where_its_dataset_is_needed(tmp_path, sample_train, sample_test, capsys):
    train, test = _arrays(sample_train, sample_test)
    fit(TrainConfig(batch_size=128, epochs=1), tmp_path / "run", train=train, test=test, progress=False, figures=False)
    for argv in (
        ["evaluate", "--workdir", str(tmp_path / "run")],
        ["train", "--resume", "--workdir", str(tmp_path / "run")],
    ):
        assert cli.main([*argv, "--epochs", "2"] if argv[0] == "train" else argv) == 2
        err = capsys.readouterr().err
        assert "trained on arrays in memory" in err and len(err.strip().splitlines()) == 1, err


def test_a_strategy_that_is_not_one_is_one_line(sample_train, sample_test):
    train, test = _arrays(sample_train, sample_test)
    with pytest.raises(JaxaeError, match=r"^strategy= object lacks put_state, check_batch_size, is_primary, put_data"):
        fit(TrainConfig(batch_size=128, epochs=1), train=train, test=test, strategy=object(), progress=False)


def test_fit_needs_both_splits_in_memory(sample_train):
    with pytest.raises(JaxaeError, match="got train= but no test="):
        fit(TrainConfig(), train=(sample_train.images[:10], None))
