"""Checkpoints, exact resume, and training that survives SIGINT, SIGTERM, SIGKILL and NaNs.

The kill tests run ``jaxae train`` in a subprocess on a 512-image IDX folder (8 steps per
epoch at batch 64) and signal it at chosen moments.
"""

import copy
import dataclasses
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxae import checkpoint, cli, rundir
from jaxae.config import flag_of
from jaxae.errors import CheckpointSaveError, JaxaeError, TrainingInterrupted
from jaxae.loop import fit
from jaxae.parallel import Strategy
from jaxae.train import TrainConfig, build

STEPS_PER_EPOCH = 8  # 512 train images, batch 64
# what a run measures of itself, which differs between two runs of the same numbers
TIMING = ("samples_per_s", "seconds", "compile_seconds", "peak_host_bytes", "peak_device_bytes")
REPO = Path(__file__).resolve().parents[1]


def _config(idx_folder, **changes):
    return TrainConfig(dataset=str(idx_folder), batch_size=64, **changes)


def _records(workdir):
    lines = (Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]


def _assert_same_tree(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _step_dirs(workdir):
    """(complete steps, unfinished temporary folders) as they lie on disk."""
    root = checkpoint.checkpoint_dir(workdir)
    if not root.is_dir():
        return [], []
    names = [p.name for p in root.iterdir()]
    return sorted(int(n) for n in names if n.isdigit()), sorted(n for n in names if "orbax-checkpoint-tmp" in n)


def _subprocess_env(**extra):
    """This checkout first on the path, whatever jaxae the interpreter has installed."""
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", **extra}


def _assert_one_line_error(capsys, code, *patterns):
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("jaxae: error: ")
    for pattern in patterns:
        assert pattern in err, err


# -- exact resume -----------------------------------------------------------------------------


@pytest.mark.slow
def test_resume_is_bitwise_identical_to_an_uninterrupted_run(tmp_path, idx_folder, capsys):
    full = fit(_config(idx_folder, epochs=4), tmp_path / "full", progress=False, save_every=3)
    assert checkpoint.complete_steps(tmp_path / "full") == [24, 32]  # every 3rd epoch and the last
    first = fit(_config(idx_folder, epochs=2), tmp_path / "split", progress=False)
    assert first.start_epoch == 0 and _step_dirs(tmp_path / "split")[0] == [8, 16]
    resumed = fit(_config(idx_folder, epochs=4), tmp_path / "split", progress=False, resume=True)

    assert resumed.start_epoch == 2
    _assert_same_tree(resumed.state, full.state)  # params, optimizer state, step, epoch, both keys
    assert int(resumed.state.step) == 4 * STEPS_PER_EPOCH and int(resumed.state.epoch) == 4
    assert _records(tmp_path / "split") == _records(tmp_path / "full")  # appended: epochs 1..4 once
    assert [r["epoch"] for r in _records(tmp_path / "split")] == [1, 2, 3, 4]
    strip = [{k: v for k, v in r.items() if k not in TIMING} for r in resumed.history]
    assert strip == _records(tmp_path / "full")
    assert json.loads((tmp_path / "split" / "config.json").read_text())["epochs"] == 4

    # At (or past) --epochs: nothing to do, exit 0 saying so, nothing rewritten.
    before = (tmp_path / "split" / "metrics.jsonl").read_text()
    for epochs in ("4", "3"):
        code = cli.main(
            ["train", "--dataset", str(idx_folder), "--batch-size", "64", "--epochs", epochs]
            + ["--workdir", str(tmp_path / "split"), "--resume", "--no-progress"]
        )
        captured = capsys.readouterr()
        assert code == 0, captured.err
        assert f"is already at epoch 4 (--epochs {epochs}); nothing to train" in captured.err
        assert json.loads(captured.out.splitlines()[-1])["epochs"] == 4
    assert (tmp_path / "split" / "metrics.jsonl").read_text() == before
    assert _step_dirs(tmp_path / "split")[0] == [16, 24, 32]


def test_keep_latest_plus_best(tmp_path):
    cfg = TrainConfig(hidden_dims=(8,), latent_dim=2)
    _, state = build(cfg, 16)
    metrics = {1: {"test_loss": 0.5}, 2: {"test_loss": 0.1}, 3: {"other": 0.0}, 4: None, 5: {"test_loss": 0.2}}
    with checkpoint.Checkpoints(tmp_path / "own", keep=2) as ckpts:
        for step, m in metrics.items():
            ckpts.save(state.replace(step=jnp.int32(step)), cfg, metrics=m)
    assert checkpoint.complete_steps(tmp_path / "own") == [2, 4, 5]  # the best (2) and the 2 latest
    with checkpoint.Checkpoints(tmp_path / "own", keep=2) as ckpts:
        assert ckpts.best_step() == 2
        with pytest.raises(JaxaeError, match="step 5 exists already"):
            ckpts.save(state.replace(step=jnp.int32(5)), cfg)
    _, restored, restored_cfg = checkpoint.restore(tmp_path / "own", 2)
    assert int(restored.step) == 2 and restored_cfg == cfg
    _assert_same_tree(restored.params, state.params)


class _Stacked(Strategy):
    """pmap's layout on one device: every leaf gets a leading device axis."""

    def put_state(self, state):
        return jax.tree.map(lambda x: jnp.asarray(x)[None], state)

    def host_state(self, state):
        return jax.tree.map(lambda x: x[0], state)


def test_library_save_restore_from_a_users_loop(tmp_path, sample_train):
    cfg = TrainConfig(epochs=2)
    trainer, state = build(cfg, 784)
    images = jnp.asarray(sample_train.images[:512].reshape(512, -1))
    state, _ = trainer.jit_train_epoch(state, images, batch_size=64)
    expected = jax.device_get(state)

    with checkpoint.Checkpoints(tmp_path / "run") as ckpts:
        assert ckpts.save(state, cfg, metrics={"test_loss": 0.5}) == 8
        # The next epoch donates `state` while the save may still be writing.
        state, _ = trainer.jit_train_epoch(state, images, batch_size=64)
    trainer2, restored, cfg2 = checkpoint.restore(tmp_path / "run")
    assert cfg2 == cfg
    _assert_same_tree(restored, expected)
    again, _ = trainer2.jit_train_epoch(restored, images, batch_size=64)
    _assert_same_tree(again, state)  # a restored state trains on exactly as the original

    assert checkpoint.save(tmp_path / "run", state, cfg) == 16  # the one-shot helper
    _, meta = checkpoint.read_meta(tmp_path / "run")
    assert meta["epoch"] == 2 and meta["config"] == cfg.to_dict() and meta["input_dim"] == 784
    _, stacked, _ = checkpoint.restore(tmp_path / "run", 8, strategy=_Stacked())
    assert stacked.params["encoder"]["layers"][0]["kernel"].shape == (1, 784, 128)
    _assert_same_tree(_Stacked().host_state(stacked), expected)


_MULTI_DEVICE = """
import sys
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxae import checkpoint
from jaxae.parallel import Strategy

assert jax.device_count() == 4, jax.devices()
mesh = Mesh(np.array(jax.devices()), ("d",))

class Replicated(Strategy):
    # The 'shard' strategy's state layout: replicated over a 4-device mesh.
    def put_state(self, state):
        return jax.device_put(state, NamedSharding(mesh, P()))
    def put_data(self, images):
        return jax.device_put(images, NamedSharding(mesh, P()))

class Stacked(Strategy):
    # The 'pmap' strategy's state layout: a leading axis over the 4 devices.
    def put_state(self, state):
        return jax.tree.map(
            lambda x: jax.device_put(np.broadcast_to(np.asarray(x)[None], (4, *np.shape(x))), NamedSharding(mesh, P("d"))),
            state,
        )
    def host_state(self, state):
        return jax.tree.map(lambda x: x.addressable_data(0)[0], state)

saved_on_one, new_workdir, expected_npz = sys.argv[1:]
expected = np.load(expected_npz)
_, state, config = checkpoint.restore(saved_on_one, strategy=Replicated())
for i, leaf in enumerate(jax.tree.leaves(state)):
    assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 4, leaf.sharding
    np.testing.assert_array_equal(np.asarray(leaf), expected[str(i)])
_, stacked, _ = checkpoint.restore(saved_on_one, strategy=Stacked())
for i, leaf in enumerate(jax.tree.leaves(stacked)):
    assert leaf.shape[0] == 4 and len(leaf.sharding.device_set) == 4
    for d in range(4):
        np.testing.assert_array_equal(np.asarray(leaf.addressable_data(d)[0]), expected[str(i)])

# Save from the 4-device layout; the 1-device process resumes from it.
checkpoint.save(new_workdir, state, config)
print("ok")
"""


@pytest.mark.slow
def test_restore_across_device_counts_and_layouts(tmp_path, idx_folder):
    """Saved on 1 device, restored replicated and stacked on 4; saved from 4, resumed on 1."""
    one = fit(_config(idx_folder, epochs=1), tmp_path / "one", progress=False)
    np.savez(tmp_path / "expected.npz", **{str(i): np.asarray(x) for i, x in enumerate(jax.tree.leaves(one.state))})
    script = tmp_path / "multi.py"
    script.write_text(_MULTI_DEVICE)
    env = _subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    args = [tmp_path / "one", tmp_path / "four", tmp_path / "expected.npz"]
    proc = subprocess.run(
        [sys.executable, str(script), *map(str, args)], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]

    _, state, _ = checkpoint.restore(tmp_path / "four")
    for leaf in jax.tree.leaves(state):
        assert leaf.sharding.device_set == {jax.devices()[0]}
    _assert_same_tree(state, one.state)
    from_four = fit(_config(idx_folder, epochs=2), tmp_path / "four", progress=False, resume=True)
    from_one = fit(_config(idx_folder, epochs=2), tmp_path / "one", progress=False, resume=True)
    assert from_four.start_epoch == 1
    _assert_same_tree(from_four.state, from_one.state)


_REAL_STRATEGIES = """
import sys
import jax, numpy as np
from jaxae.loop import fit
from jaxae.train import TrainConfig

assert jax.device_count() == 4, jax.devices()
data, root = sys.argv[1:]
config = lambda epochs: TrainConfig(dataset=data, batch_size=64, epochs=epochs)
straight = fit(config(4), progress=False, strategy="none").state
results = {}
for first, then in (("pmap", "none"), ("none", "pmap"), ("shard", "none"), ("none", "shard")):
    workdir = f"{root}/{first}-then-{then}"
    fit(config(2), workdir, progress=False, strategy=first)
    resumed = fit(config(4), workdir, progress=False, strategy=then, resume=True)
    assert resumed.start_epoch == 2, (first, then, resumed.start_epoch)
    for a, b in zip(jax.tree.leaves(resumed.state), jax.tree.leaves(straight), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0, err_msg=f"{first} -> {then}")
    print(first, "->", then, "ok")
print("ok")
"""


@pytest.mark.slow  # real processes; test_restore_across_device_counts_and_layouts covers the restore
def test_resume_under_another_strategy_and_device_count(tmp_path, idx_folder):
    """2 epochs under pmap/shard on 4 devices + 2 resumed on 1 device (and the reverse) = 4 on 1."""
    script = tmp_path / "strategies.py"
    script.write_text(_REAL_STRATEGIES)
    env = _subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, str(script), str(idx_folder), str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count(" ok") == 4


# -- refusing to resume the wrong thing -------------------------------------------------------


def test_resume_refuses_another_model_and_lists_every_difference(tmp_path, idx_folder, capsys):
    workdir = tmp_path / "run"
    fit(_config(idx_folder, epochs=1), workdir, progress=False)
    code = cli.main(
        ["train", "--dataset", str(idx_folder), "--batch-size", "64", "--epochs", "3", "--latent-dim", "16"]
        + ["--hidden-dims", "64", "--workdir", str(workdir), "--resume", "--no-progress"]
    )
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    # Each flag given with another value than the checkpoint's is named; --epochs may change on resume.
    assert "--hidden-dims 64 (the checkpoint's is 128,64); --latent-dim 16 (the checkpoint's is 32)" in err
    assert "--epochs" not in err
    # The library says the same of a config that differs, naming the flags.
    with pytest.raises(JaxaeError, match=r"was saved by a different run: --latent-dim: checkpoint 32, now 16"):
        fit(dataclasses.replace(_config(idx_folder, epochs=3), latent_dim=16), workdir, progress=False, resume=True)
    # The same folder written another way is the same dataset.
    relative = os.path.relpath(idx_folder)
    _, meta = rundir.check_resumable(workdir, _config(relative, epochs=5))
    assert meta["epoch"] == 1

    code = cli.main(["train", "--workdir", str(workdir), "--no-progress"])
    _assert_one_line_error(capsys, code, "already holds checkpoints", "--resume")
    code = cli.main(["train", "--workdir", str(tmp_path / "empty"), "--resume", "--no-progress"])
    _assert_one_line_error(capsys, code, "no checkpoints in")
    code = cli.main(["train", "--workdir", str(tmp_path / "x"), "--save-every", "0", "--no-progress"])
    _assert_one_line_error(capsys, code, "--save-every must be at least 1")


def _other_value(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "-other"
    if isinstance(value, tuple):
        return (*value, 7)
    if value is None:
        return "other"
    raise AssertionError(f"no other value for {value!r}")


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(TrainConfig)])
def test_every_config_field_but_run_length_must_match(field):
    """Fields added to TrainConfig later are compared too, unless declared changeable."""
    base = TrainConfig()
    # Only the comparison is tested: the other value need not be one a run can use.
    changed = copy.copy(base)
    object.__setattr__(changed, field, _other_value(getattr(base, field)))
    diffs = rundir.config_differences(base, changed)
    if field in rundir.RESUME_MAY_CHANGE:
        assert diffs == []
    else:
        assert len(diffs) == 1 and diffs[0].startswith(f"{flag_of(field)}: checkpoint "), diffs


# -- damaged checkpoints ----------------------------------------------------------------------


def _largest_data_file(step_dir):
    return max(
        (p for p in (step_dir / "state").rglob("*") if p.is_file() and "d" == p.parent.name), key=os.path.getsize
    )


_DAMAGE = {
    "deleted file": lambda d, older: _largest_data_file(d).unlink(),
    "truncated file": lambda d, older: os.truncate(_largest_data_file(d), 100),
    "deleted metadata": lambda d, older: (d / "meta" / "metadata").unlink(),
    # Readable, but not what was saved at this step, and no file list (as when killed right after
    # the commit): only the saved digest can tell.
    "arrays of another step": lambda d, older: (
        shutil.rmtree(d / "state"),
        shutil.copytree(older / "state", d / "state"),
        (d / checkpoint.FILE_LIST).unlink(),
    ),
}


@pytest.mark.slow
def test_damaged_checkpoint_is_a_clear_error_offering_older_ones(tmp_path, idx_folder, capsys):
    pristine = tmp_path / "pristine"
    fit(_config(idx_folder, epochs=3), pristine, progress=False)
    assert checkpoint.complete_steps(pristine) == [8, 16, 24]
    assert all((checkpoint.step_dir(pristine, s) / checkpoint.FILE_LIST).is_file() for s in (8, 16, 24))
    _, final, _ = checkpoint.restore(pristine)

    for name, damage in _DAMAGE.items():
        workdir = tmp_path / name.replace(" ", "-")
        shutil.copytree(pristine, workdir)
        damage(checkpoint.step_dir(workdir, 24), checkpoint.step_dir(workdir, 16))

        with pytest.raises(checkpoint.DamagedCheckpointError) as info:
            checkpoint.restore(workdir)
        assert info.value.step == 24 and info.value.older_steps == [8, 16], name
        code = cli.main(["evaluate", "--workdir", str(workdir)])
        _assert_one_line_error(capsys, code, f"checkpoint {checkpoint.step_dir(workdir, 24)} is damaged")
        with pytest.raises(JaxaeError, match=r"older complete checkpoints: steps 8, 16; read one with --step 16"):
            fit(_config(idx_folder, epochs=4), workdir, progress=False, resume=True)
    assert "do not match the digest" in str(info.value)  # the last case: only the digest can tell

    # As offered: --step 16 reads the older one; delete the damaged one and resume from it.
    assert cli.main(["evaluate", "--workdir", str(workdir), "--step", "16"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["epoch"] == 2
    shutil.rmtree(checkpoint.step_dir(workdir, 24))
    resumed = fit(_config(idx_folder, epochs=3), workdir, progress=False, resume=True)
    assert resumed.start_epoch == 2
    _assert_same_tree(resumed.state, final)  # nothing lost: the same state as before the damage


def test_damaged_checkpoint_from_the_command_line_is_one_line(tmp_path, idx_folder):
    """A real process, so nothing printed at exit can hide among pytest's output."""
    workdir = tmp_path / "run"
    fit(_config(idx_folder, epochs=2), workdir, progress=False)
    os.truncate(_largest_data_file(checkpoint.step_dir(workdir, 16)), 100)
    proc = subprocess.run(
        [sys.executable, "-m", "jaxae", "evaluate", "--workdir", str(workdir)],
        capture_output=True,
        text=True,
        env=_subprocess_env(),
        timeout=600,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr[-3000:]
    assert proc.stderr.startswith(f"jaxae: error: checkpoint {checkpoint.step_dir(workdir, 16)} is damaged (")
    assert "older complete checkpoints: steps 8; read one with --step 8" in proc.stderr


# -- NaN / Inf --------------------------------------------------------------------------------


class _PoisonAt(Strategy):
    """Makes the parameters NaN just before epoch ``epoch`` (1-based) trains."""

    def __init__(self, epoch):
        self.epoch = epoch

    def compile_epoch(self, trainer, state, images, batch_size):
        train_epoch = super().compile_epoch(trainer, state, images, batch_size)

        def run(state, images):
            if int(state.epoch) + 1 == self.epoch:
                state = state.replace(params=jax.tree.map(lambda p: p * jnp.nan, state.params))
            return train_epoch(state, images)

        return run


def test_nan_loss_stops_naming_the_epoch_and_keeps_the_last_good_checkpoint(tmp_path, idx_folder, capsys):
    workdir = tmp_path / "run"
    with pytest.raises(JaxaeError, match=r"training diverged at epoch 3 \(train loss = nan") as info:
        fit(_config(idx_folder, epochs=6), workdir, progress=False, strategy=_PoisonAt(3))
    assert f"last good checkpoint is {checkpoint.step_dir(workdir, 16)}" in str(info.value)
    assert _step_dirs(workdir) == ([8, 16], [])
    assert [r["epoch"] for r in _records(workdir)] == [1, 2]
    _, state, _ = checkpoint.restore(workdir)
    assert int(state.epoch) == 2 and all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))

    # A learning rate that blows up in the first epoch: nothing is saved at all.
    code = cli.main(
        ["train", "--dataset", str(idx_folder), "--batch-size", "64", "--epochs", "3", "--lr", "1e30"]
        + ["--workdir", str(tmp_path / "lr"), "--no-progress"]
    )
    _assert_one_line_error(capsys, code, "training diverged at epoch 1", "there is no earlier checkpoint", "--lr")
    assert _step_dirs(tmp_path / "lr") == ([], [])


# -- signals (a real process) -----------------------------------------------------------------


def _spawn(tmp_path, workdir, idx_folder, *extra, slow_save=0.0):
    env = _subprocess_env(**({checkpoint.SLOW_SAVE_ENV: str(slow_save)} if slow_save else {}))
    args = ["train", "--dataset", str(idx_folder), "--batch-size", "64", "--epochs", "100000"]
    args += ["--workdir", str(workdir), "--no-progress", *extra]
    # A child inherits an ignored SIGINT (a test runner may be started so); a handled one it does not.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with open(tmp_path / "stderr.txt", "w") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "jaxae", *args], stdout=subprocess.DEVNULL, stderr=err, env=env
            )
    finally:
        signal.signal(signal.SIGINT, previous)
    return proc, args


def _wait_for(proc, condition, timeout=300):
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"training exited early with {proc.returncode}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the training process")
        time.sleep(0.02)


def test_sigkill_mid_save_loses_nothing_saved_and_resume_is_exact(tmp_path, idx_folder):
    workdir = tmp_path / "run"
    # Every save holds its commit 2 s, so the kill lands inside the second save.
    proc, _ = _spawn(tmp_path, workdir, idx_folder, slow_save=2)
    _wait_for(proc, lambda: (lambda c, t: len(c) >= 1 and len(t) >= 1)(*_step_dirs(workdir)))
    proc.kill()
    proc.wait(timeout=60)
    complete, partial = _step_dirs(workdir)
    assert complete == [8] and partial == ["16.orbax-checkpoint-tmp"], (complete, partial)

    assert checkpoint.complete_steps(workdir) == [8]  # the partial save is not a checkpoint
    _, meta = checkpoint.read_meta(workdir)
    assert meta["epoch"] == 1
    resumed = fit(_config(idx_folder, epochs=3), workdir, progress=False, resume=True)
    uninterrupted = fit(_config(idx_folder, epochs=3), tmp_path / "uninterrupted", progress=False)
    assert resumed.start_epoch == 1
    _assert_same_tree(resumed.state, uninterrupted.state)
    assert _records(workdir) == _records(tmp_path / "uninterrupted")
    assert _step_dirs(workdir) == ([8, 16, 24], [])  # the partial folder was cleaned up


@pytest.mark.parametrize(
    "sig, status, slow_save",
    [(signal.SIGINT, 130, 0.0), (signal.SIGTERM, 143, 1.0)],  # SIGTERM lands during a save
    ids=["SIGINT", "SIGTERM"],
)
def test_sigint_sigterm_save_a_final_checkpoint_and_exit(tmp_path, idx_folder, sig, status, slow_save):
    workdir = tmp_path / "run"
    proc, args = _spawn(tmp_path, workdir, idx_folder, "--keep", "2", slow_save=slow_save)
    _wait_for(proc, lambda: len(_step_dirs(workdir)[0]) >= 1)
    proc.send_signal(sig)
    try:
        proc.wait(timeout=120)
    finally:
        proc.kill()
    err = (tmp_path / "stderr.txt").read_text()
    assert proc.returncode == status, err[-3000:]

    complete, partial = _step_dirs(workdir)
    assert partial == [], partial  # the save in flight was finished, not left half-written
    records = _records(workdir)
    epochs = [r["epoch"] for r in records]
    assert epochs == list(range(1, len(epochs) + 1))
    assert complete[-1] == records[-1]["step"] == epochs[-1] * STEPS_PER_EPOCH  # the final checkpoint
    name = signal.Signals(sig).name
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"jaxae: interrupted by {name} after epoch {epochs[-1]} of 100000;"), err[-3000:]
    assert f"checkpoint saved in {checkpoint.step_dir(workdir, complete[-1])}" in last
    assert last.endswith("resume with: jaxae " + " ".join(args) + " --resume")
    assert "Traceback" not in err

    _, meta = checkpoint.read_meta(workdir)  # what --resume will continue from
    assert meta["epoch"] == epochs[-1]


def test_interrupted_fit_raises_for_library_callers(tmp_path, idx_folder):
    """In-process: the first SIGTERM finishes the epoch, saves, and raises TrainingInterrupted."""

    def send_sigterm(record):
        if record["epoch"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingInterrupted) as info:
        fit(_config(idx_folder, epochs=50), tmp_path / "run", progress=False, save_every=5, callbacks=[send_sigterm])
    assert signal.getsignal(signal.SIGTERM) is previous  # handlers restored
    e = info.value
    assert (e.signum, e.epoch, e.step, e.exit_status) == (signal.SIGTERM, 2, 16, 143)
    assert e.checkpoint == str(checkpoint.step_dir(tmp_path / "run", 16))
    assert checkpoint.complete_steps(tmp_path / "run") == [16]  # saved although save_every is 5


# -- integrity: what a save accepts and what a restore trusts ----------------------------------


def _tiny(**changes):
    """A 16-pixel model small enough that a checkpoint is a few kB and a save a few ms."""
    config = TrainConfig(hidden_dims=(8,), latent_dim=2, **changes)
    return config, *build(config, 16)


@pytest.mark.parametrize(
    "change",
    [{"hidden_dims": (4,)}, {"hidden_dims": (8, 4)}, {"latent_dim": 3}, {"variant": "vae"}, {"arch": "conv"}],
    ids=lambda c: next(iter(c)) + "=" + str(next(iter(c.values()))),
)
def test_save_refuses_a_config_that_does_not_describe_the_state(tmp_path, change):
    config, _, state = _tiny()
    wrong = dataclasses.replace(config, **change)
    with pytest.raises(JaxaeError, match=r"cannot save: the config") as info:
        checkpoint.save(tmp_path / "run", state, wrong)
    message = str(info.value)
    assert len(message.splitlines()) == 1
    if "arch" not in change:  # an MLP state for a conv config has no first parameter to compare
        assert "parameter " in message and "pass the config the state was built from" in message
    assert checkpoint.complete_steps(tmp_path / "run") == []  # nothing written
    assert checkpoint.save(tmp_path / "run", state, config) == 0  # the right config saves


def _flip_bit(path, offset, bit=0):
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


def _meta_file(workdir, step):
    return checkpoint.step_dir(workdir, step) / "meta" / "metadata"


@pytest.mark.parametrize("file_list", ["kept", "deleted"])  # deleted: as when killed right after the commit
def test_damaged_metadata_is_reported_as_damage_not_as_another_run(tmp_path, file_list):
    config, _, state = _tiny(dataset="some-dataset")
    pristine = tmp_path / "pristine"
    checkpoint.save(pristine, state, config)
    checkpoint.save(pristine, state.replace(step=jnp.int32(1)), config)

    def damaged_copy(name, damage):
        workdir = tmp_path / name
        shutil.copytree(pristine, workdir)
        if file_list == "deleted":
            (checkpoint.step_dir(workdir, 1) / checkpoint.FILE_LIST).unlink()
        damage(_meta_file(workdir, 1))
        return workdir

    # One flipped bit in a config key ("seed" -> "reed") once read as an unknown setting.
    key = damaged_copy("bit", lambda p: _flip_bit(p, p.read_bytes().index(b'"seed"') + 1, 0))
    # An edited value (same size, so the file list's sizes agree) once read as "another run".
    seed = damaged_copy("seed", lambda p: p.write_bytes(p.read_bytes().replace(b'"seed": 0', b'"seed": 1')))
    for workdir in (key, seed):
        with pytest.raises(checkpoint.DamagedCheckpointError) as info:
            checkpoint.restore(workdir)
        assert info.value.step == 1 and info.value.older_steps == [0]
        assert f"checkpoint {checkpoint.step_dir(workdir, 1)} is damaged" in str(info.value)
        assert "read one with --step 0" in str(info.value)
    with pytest.raises(checkpoint.DamagedCheckpointError, match="is damaged"):
        rundir.check_resumable(seed, dataclasses.replace(config, seed=1))
    with pytest.raises(checkpoint.DamagedCheckpointError, match="is damaged"):
        checkpoint.read_meta(seed)
    _, restored, _ = checkpoint.restore(seed, 0)  # the older one is untouched
    _assert_same_tree(restored, state)


def test_checkpoints_of_format_1_still_restore(tmp_path):
    """Saved by jaxae before the metadata digest: no ``meta_sha256``, a file list of sizes only."""
    config, _, state = _tiny()
    workdir = tmp_path / "run"
    checkpoint.save(workdir, state, config)
    meta_path = _meta_file(workdir, 0)
    meta = json.loads(meta_path.read_text())
    del meta["meta_sha256"]
    meta["format"] = 1
    meta_path.write_text(json.dumps(meta))
    listing = checkpoint.step_dir(workdir, 0) / checkpoint.FILE_LIST
    sizes = json.loads(listing.read_text())["files"]
    sizes["meta/metadata"] = meta_path.stat().st_size
    listing.write_text(json.dumps({"files": sizes}))

    trainer, restored, restored_config = checkpoint.restore(workdir)
    assert restored_config == config
    _assert_same_tree(restored, state)
    assert rundir.check_resumable(workdir, config)[1]["format"] == 1
    _, meta = checkpoint.read_meta(workdir)
    assert "meta_sha256" not in meta


def test_restore_takes_the_optimizer_a_run_was_trained_with(tmp_path):
    config, trainer, state = _tiny()
    images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (64, 16), dtype=np.uint8))
    for name, tx in (("sgd", optax.sgd(0.1, momentum=0.9)), ("adamw", optax.adamw(1e-3))):
        own = dataclasses.replace(trainer, tx=tx)
        start = jax.tree.map(jnp.copy, state.replace(opt_state=tx.init(state.params)))  # the epoch donates it
        trained, _ = own.jit_train_epoch(start, images, batch_size=16)
        expected = jax.device_get(trained)
        workdir = tmp_path / name
        checkpoint.save(workdir, trained, config)

        with pytest.raises(JaxaeError, match=r"holds the state of another optimizer than the one given") as info:
            checkpoint.restore(workdir)  # rebuilds Adam from the config
        assert not isinstance(info.value, checkpoint.DamagedCheckpointError)
        assert "tx=" in str(info.value) and len(str(info.value).splitlines()) == 1

        restored_trainer, restored, _ = checkpoint.restore(workdir, tx=tx)
        assert restored_trainer.tx is tx
        _assert_same_tree(restored, expected)
        template = state.replace(opt_state=tx.init(state.params))
        _assert_same_tree(checkpoint.restore_state(workdir, template), expected)


# -- failed saves (a real process) ------------------------------------------------------------


def _train_cli(workdir, idx_folder, epochs, *extra):
    return [sys.executable, "-m", "jaxae", "train", "--dataset", str(idx_folder), "--batch-size", "64"] + [
        "--hidden-dims", "8", "--latent-dim", "2", "--epochs", str(epochs), "--workdir", str(workdir), "--no-progress",
        *extra,
    ]  # fmt: skip


def _assert_quiet_failure(proc, status, *patterns):
    """Exit ``status`` with one line on stderr: no traceback, no noise from Orbax's threads."""
    err = proc.stderr.strip()
    assert proc.returncode == status, err[-3000:]
    assert len(err.splitlines()) == 1, err[-3000:]
    assert err.startswith("jaxae: error: ") and "Traceback" not in err and "Event loop" not in err
    for pattern in patterns:
        assert pattern in err, err


@pytest.fixture
def small_disk(tmp_path):
    """A 300 kB tmpfs: room for one checkpoint of the tiny model, not two."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(mount_point)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=True)


@pytest.mark.slow
def test_disk_full_stops_training_at_the_failed_save_with_one_line(tmp_path, idx_folder, small_disk):
    workdir = small_disk / "run"
    proc = subprocess.run(
        _train_cli(workdir, idx_folder, 6), capture_output=True, text=True, env=_subprocess_env(), timeout=600
    )
    complete, _ = _step_dirs(workdir)
    assert complete, proc.stderr[-3000:]  # the first save fitted
    last = complete[-1]
    failed = last + STEPS_PER_EPOCH
    _assert_quiet_failure(
        proc,
        1,
        f"saving checkpoint {checkpoint.step_dir(workdir, failed)} (step {failed}) failed: No space left on device",
        f"the last complete checkpoint is {checkpoint.step_dir(workdir, last)} (step {last})",
    )
    # Stopped at the failed save: no epoch past it was recorded, none saved.
    assert [r["epoch"] for r in _records(workdir)] == list(range(1, failed // STEPS_PER_EPOCH + 1))
    _, state, _ = checkpoint.restore(workdir)  # the last complete checkpoint is intact
    assert int(state.step) == last and int(state.epoch) == last // STEPS_PER_EPOCH


# Runs the command given after it with a 40 kB file-size limit; an ignored SIGXFSZ survives the
# exec, so a write past the limit fails with EFBIG instead of killing the process.
_LIMIT_FILE_SIZE = """
import os, resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, 40_000))
os.execv(sys.argv[1], sys.argv[1:])
"""


@pytest.mark.slow
def test_a_save_failing_for_another_reason_is_one_line_too(tmp_path, idx_folder):
    """A file-size limit (RLIMIT_FSIZE) makes every checkpoint's largest file fail to write (EFBIG)."""
    workdir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-c", _LIMIT_FILE_SIZE, *_train_cli(workdir, idx_folder, 4)],
        capture_output=True,
        text=True,
        env=_subprocess_env(),
        timeout=600,
    )
    _assert_quiet_failure(
        proc,
        1,
        f"saving checkpoint {checkpoint.step_dir(workdir, STEPS_PER_EPOCH)} (step {STEPS_PER_EPOCH}) failed: File too large",
        "no checkpoint was completed",
    )
    assert [r["epoch"] for r in _records(workdir)] == [1]
    assert checkpoint.complete_steps(workdir) == []


def _overwrite_middle(path, length=40):
    data = bytearray(path.read_bytes())
    start = len(data) // 3
    data[start : start + length] = b"A" * len(data[start : start + length])
    path.write_bytes(bytes(data))


@pytest.mark.slow  # real processes; the damaged-metadata tests in process cover the message
def test_damaged_orbax_metadata_is_one_line_from_the_command_line(tmp_path, idx_folder):
    pristine = tmp_path / "pristine"
    fit(_config(idx_folder, epochs=1, hidden_dims=(8,), latent_dim=2), pristine, progress=False)
    state_dir = checkpoint.step_dir(pristine, STEPS_PER_EPOCH) / "state"
    damages = {
        # Same size, so only the content tells; Orbax once read it silently or failed noisily.
        "garbage _sharding": lambda d: (d / "_sharding").write_bytes(b"#" * (d / "_sharding").stat().st_size),
        "garbage _METADATA": lambda d: (d / "_METADATA").write_bytes(b"{" * (d / "_METADATA").stat().st_size),
        # Without the file list (killed right after the commit) Orbax itself meets the damage: its
        # reads still in flight once printed "Event loop is closed" tracebacks after the error.
        "garbage manifest, no file list": lambda d: (
            _overwrite_middle(d / "manifest.ocdbt"),
            (d.parent / checkpoint.FILE_LIST).unlink(),
        ),
    }
    for name, damage in damages.items():
        workdir = tmp_path / name.replace(" ", "-")
        shutil.copytree(pristine, workdir)
        damage(checkpoint.step_dir(workdir, STEPS_PER_EPOCH) / "state")
        for command in (
            [sys.executable, "-m", "jaxae", "evaluate", "--workdir", str(workdir)],
            _train_cli(workdir, idx_folder, 2, "--resume"),
        ):
            proc = subprocess.run(command, capture_output=True, text=True, env=_subprocess_env(), timeout=600)
            _assert_quiet_failure(proc, 2, f"checkpoint {checkpoint.step_dir(workdir, STEPS_PER_EPOCH)} is damaged")
    assert state_dir.is_dir()


# -- checkpoint folders as untrusted bytes (property-based) -----------------------------------


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """One saved checkpoint of the tiny model: (workdir, the state and config saved, its files)."""
    config, _, state = _tiny()
    workdir = tmp_path_factory.mktemp("tiny") / "run"
    checkpoint.save(workdir, state, config)
    files = sorted(p.relative_to(workdir).as_posix() for p in workdir.rglob("*") if p.is_file())
    return workdir, (jax.device_get(state), config), files


_REPLACEMENTS = st.one_of(st.binary(max_size=64), st.sampled_from([b"", b"{}", b"[]", b"null", b'{"files": {}}']))
_MUTATION = st.tuples(
    st.sampled_from(["flip a bit", "truncate", "overwrite", "replace", "delete"]),
    st.integers(min_value=0),  # which file (modulo their number)
    st.integers(min_value=0),  # where in it (modulo its size)
    _REPLACEMENTS,
)


def _mutate(workdir, files, mutation):
    kind, which, where, data = mutation
    path = workdir / files[which % len(files)]
    if not path.is_file():
        return
    at = where % max(path.stat().st_size, 1)
    if kind == "flip a bit":
        data = bytearray(path.read_bytes()) or bytearray(b"\0")
        data[at] ^= 1 << (where % 8)
        path.write_bytes(bytes(data))
    elif kind == "truncate":
        os.truncate(path, at)
    elif kind == "overwrite":
        with open(path, "r+b") as f:
            f.seek(at)
            f.write(data or b"\0")
    elif kind == "replace":
        path.write_bytes(data)
    else:
        path.unlink()


# "deleted": as when a process is killed between a save's commit and its file list, so the
# metadata digest, Orbax's own checks and the state digest must catch what the list would have.
@pytest.mark.parametrize("file_list", ["kept", "deleted"])
@settings(
    max_examples=int(os.environ.get("JAXAE_TEST_EXAMPLES", 30)),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(mutations=st.lists(_MUTATION, min_size=1, max_size=3))
def test_a_mutated_checkpoint_restores_exactly_or_raises_a_jaxae_error(
    tiny_checkpoint, tmp_path_factory, capfd, file_list, mutations
):
    pristine, saved, files = tiny_checkpoint
    workdir = tmp_path_factory.mktemp("mutated") / "run"
    shutil.copytree(pristine, workdir)
    if file_list == "deleted":
        (checkpoint.step_dir(workdir, 0) / checkpoint.FILE_LIST).unlink()
    for mutation in mutations:
        _mutate(workdir, files, mutation)
    try:
        try:
            _, restored, restored_config = checkpoint.restore(workdir)
        except JaxaeError as e:
            assert len(str(e).splitlines()) == 1, str(e)
        else:  # never a wrong state or config silently
            _assert_same_tree(restored, saved[0])
            assert restored_config == saved[1]
        err = capfd.readouterr().err  # includes late output of earlier examples' background threads
        assert "Traceback" not in err and "Event loop" not in err, err[-3000:]
    finally:
        shutil.rmtree(workdir.parent)


def test_a_save_on_a_read_only_filesystem_raises_once_and_keeps_the_last_checkpoint(small_disk):
    """In-process, for library callers: the tmpfs is remounted read-only between two saves (EROFS)."""
    config, _, state = _tiny()
    workdir = small_disk / "run"
    checkpoint.save(workdir, state, config)
    ckpts = checkpoint.Checkpoints(workdir)
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    with pytest.raises(CheckpointSaveError, match=r"Read-only file system \(EROFS\)") as info:
        ckpts.save(state.replace(step=jnp.int32(1)), config)
        ckpts.wait()
    assert (info.value.step, info.value.last_complete_step) == (1, 0)
    assert f"the last complete checkpoint is {checkpoint.step_dir(workdir, 0)} (step 0)" in str(info.value)
    with pytest.raises(CheckpointSaveError):  # nothing more is saved after a failure
        ckpts.save(state.replace(step=jnp.int32(2)), config)
    ckpts.close()  # the failure was raised already: not again
    _, restored, _ = checkpoint.restore(workdir)
    _assert_same_tree(restored, state)


@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_the_image_shape_is_saved_and_a_model_for_other_images_is_refused(tmp_path, arch):
    # 16x12x3 and 12x16x3 hold the same number of values and give the same parameter shapes
    # (an MLP's first kernel sees only H*W*C; a conv model's only (H/4)*(W/4) features), so
    # without the saved shape such a checkpoint would restore and read every pixel wrongly.
    config = TrainConfig(arch=arch, latent_dim=4, hidden_dims=(8,))
    _, state = build(config, (16, 12, 3))
    checkpoint.save(tmp_path, state, config)
    _, restored, _ = checkpoint.restore(tmp_path)
    assert restored.image_shape == (16, 12, 3)
    assert checkpoint.read_meta(tmp_path)[1]["input_shape"] == [16, 12, 3]
    _, other = build(config, (12, 16, 3))
    assert jax.tree.map(np.shape, other.params) == jax.tree.map(np.shape, state.params)
    with pytest.raises(JaxaeError, match=r"a model for 16x12x3 images, not 12x16x3") as info:
        checkpoint.restore_state(tmp_path, other)
    assert "\n" not in str(info.value)


def test_init_from_a_model_for_other_images_is_refused(tmp_path):
    from jaxae.loop import init_params_from

    config = TrainConfig(latent_dim=4, hidden_dims=(8,))
    _, state = build(config, (16, 12, 3))
    checkpoint.save(tmp_path, state, config)
    trainer, other = build(config, (24, 8, 3))  # 576 values too
    with pytest.raises(JaxaeError, match=r"--init-from .* holds a model for 16x12x3 images, not 24x8x3"):
        init_params_from(tmp_path, trainer, other)


@pytest.mark.slow  # a race against a live run, many reads
def test_reading_the_latest_checkpoint_of_a_run_that_rotates_them_never_reports_damage(tmp_path, idx_folder, caplog):
    # A live `train --keep 1` deletes its latest checkpoint each time it completes a newer one.
    workdir = tmp_path / "live"
    proc, _ = _spawn(tmp_path, workdir, idx_folder, "--keep", "1")
    restored, failures = 0, []
    try:
        _wait_for(proc, lambda: len(_step_dirs(workdir)[0]) >= 1)
        deadline = time.monotonic() + 60
        while restored < 40 and time.monotonic() < deadline:
            try:
                _, state, _ = checkpoint.restore(workdir)
                step, meta = checkpoint.read_meta(workdir)
                assert int(state.step) > 0 and meta["step"] == step
                restored += 1
            except JaxaeError as e:
                failures.append(str(e))
        assert proc.poll() is None, "the run ended while it was being read"
    finally:
        proc.kill()
        proc.wait()
    assert failures == [] and restored == 40
    assert not [r for r in caplog.records if "Metadata file does not exist" in r.getMessage()]


# -- inside an epoch: --save-every-steps ------------------------------------------------------


def _signal_at_step(step: int | None):
    """An optax transformation that changes nothing and sends this process SIGTERM from inside
    the compiled step numbered ``step`` (0-based): a signal at an exact point of an epoch."""

    def update(updates, count, params=None):
        def send(count):
            if step is not None and int(count) == step:
                os.kill(os.getpid(), signal.SIGTERM)

        jax.debug.callback(send, count)
        return updates, count + 1

    return optax.GradientTransformation(lambda params: jnp.zeros((), jnp.int32), update)


def _tx(config, signal_at=None):
    from jaxae.train import make_optimizer

    return optax.chain(make_optimizer(config, STEPS_PER_EPOCH), _signal_at_step(signal_at))


def test_an_epoch_in_parts_gives_the_whole_epochs_numbers_and_saves_inside_it(tmp_path, idx_folder):
    config = _config(idx_folder, epochs=2)
    whole = fit(config, tmp_path / "whole", progress=False)
    parts = fit(config, tmp_path / "parts", progress=False, save_every_steps=3, keep=100)
    assert _records(tmp_path / "parts") == _records(tmp_path / "whole")
    _assert_same_tree(parts.state, whole.state)
    # Parts end at 3 and 6 inside each 8-step epoch, and at its end.
    assert checkpoint.complete_steps(tmp_path / "parts") == [3, 6, 8, 11, 14, 16]
    _, inside = checkpoint.read_meta(tmp_path / "parts", 11)
    progress = inside["epoch_progress"]
    assert inside["format"] == checkpoint.INSIDE_EPOCH_FORMAT and inside["epoch"] == 1
    assert (progress["epoch_step"], progress["steps_per_epoch"], progress["train_rows"]) == (3, 8, 512)
    assert len(progress["step_metrics"]["loss"]["values"]) == 3
    _, end = checkpoint.read_meta(tmp_path / "parts", 8)
    assert "epoch_progress" not in end and end["format"] == checkpoint.FORMAT_VERSION


def test_a_signal_inside_an_epoch_saves_at_the_next_part_and_resume_is_exact(tmp_path, idx_folder):
    config = _config(idx_folder, epochs=2)
    reference = fit(config, tmp_path / "uninterrupted", progress=False, tx=_tx(config), save_every_steps=3)
    # SIGTERM during step 10 (the second of epoch 2): the part running ends at step 11, 3 into the epoch.
    with pytest.raises(TrainingInterrupted) as info:
        fit(config, tmp_path / "run", progress=False, tx=_tx(config, signal_at=9), save_every_steps=3)
    e = info.value
    assert (e.signum, e.epoch, e.step, e.exit_status) == (signal.SIGTERM, 1, 11, 143)
    assert str(e).startswith("interrupted by SIGTERM at step 3 of 8 of epoch 2 of 2; checkpoint saved in")
    assert checkpoint.complete_steps(tmp_path / "run")[-1] == 11
    assert len(_records(tmp_path / "run")) == 1  # epoch 2 has no record until it ends
    resumed = fit(config, tmp_path / "run", progress=False, tx=_tx(config), save_every_steps=3, resume=True)
    assert resumed.start_epoch == 1
    _assert_same_tree(resumed.state, reference.state)
    assert _records(tmp_path / "run") == _records(tmp_path / "uninterrupted")  # epoch 2's train loss too
    # Resumed without --save-every-steps, the rest of the epoch is one part: the same numbers.
    with pytest.raises(TrainingInterrupted):
        fit(config, tmp_path / "again", progress=False, tx=_tx(config, signal_at=9), save_every_steps=3)
    fit(config, tmp_path / "again", progress=False, tx=_tx(config), resume=True)
    assert _records(tmp_path / "again") == _records(tmp_path / "uninterrupted")


def test_resuming_inside_an_epoch_refuses_other_train_data_and_an_older_reader(
    tmp_path, idx_folder, sample_train, sample_test, monkeypatch
):
    config = TrainConfig(epochs=2, batch_size=64)
    images, labels = sample_train.images, sample_train.labels
    test = (sample_test.images[:128], sample_test.labels[:128])
    run = functools.partial(fit, config, tmp_path / "run", progress=False, test=test, save_every_steps=3)
    with pytest.raises(TrainingInterrupted):
        run(train=(images[:512], labels[:512]), tx=_tx(config, signal_at=1))
    # 500 images are 8 steps of 64 too, but not the epoch the checkpoint stopped inside.
    with pytest.raises(JaxaeError, match="stopped at step 3 of an epoch of 8 steps over 512 train images, and this"):
        run(train=(images[:500], labels[:500]), tx=_tx(config), resume=True)
    # 512 other images: the same count and steps, other pixels (a file rewritten between save and resume).
    other = images[512:1024]
    with pytest.raises(JaxaeError, match=r"over train images that have changed since \(crc32:[0-9a-f]{8}, now crc32:"):
        run(train=(other, labels[:512]), tx=_tx(config), resume=True)
    # A jaxae that reads only epoch-end checkpoints refuses this one instead of restarting its epoch.
    monkeypatch.setattr(checkpoint, "READABLE_FORMAT", checkpoint.FORMAT_VERSION)
    with pytest.raises(JaxaeError, match="has format 4.*upgrade jaxae"):
        checkpoint.read_meta(tmp_path / "run")


def test_save_every_steps_must_be_positive(tmp_path, idx_folder, capsys):
    with pytest.raises(JaxaeError, match="--save-every-steps must be at least 1, got 0"):
        fit(_config(idx_folder, epochs=1), tmp_path / "run", progress=False, save_every_steps=0)
    code = cli.main(
        ["train", "--dataset", str(idx_folder), "--save-every-steps", "-2", "--workdir", str(tmp_path / "c")]
    )
    _assert_one_line_error(capsys, code, "--save-every-steps must be at least 1, got -2")


@pytest.mark.slow  # a real process for about half a minute
def test_sigterm_to_a_real_process_inside_an_epoch_saves_there_exits_143_and_resumes_exactly(tmp_path, idx_folder):
    workdir = tmp_path / "run"
    # Batch 8: 64 steps an epoch, a part every 2; each save holds its commit 1 s, so the first
    # epoch lasts half a minute and the signal lands inside it.
    proc, args = _spawn(tmp_path, workdir, idx_folder, "--batch-size", "8", "--save-every-steps", "2", slow_save=1.0)
    _wait_for(proc, lambda: len(_step_dirs(workdir)[0]) >= 1)
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=120)
    finally:
        proc.kill()
    err = (tmp_path / "stderr.txt").read_text()
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    step = checkpoint.complete_steps(workdir)[-1]
    assert 2 <= step < 64 and step % 2 == 0, step
    assert last.startswith(f"jaxae: interrupted by SIGTERM at step {step} of 64 of epoch 1 of 100000;"), last
    assert last.endswith("resume with: jaxae " + " ".join(args) + " --resume")
    config = dataclasses.replace(_config(idx_folder, epochs=1), batch_size=8)
    resumed = fit(config, workdir, progress=False, resume=True)
    uninterrupted = fit(config, tmp_path / "uninterrupted", progress=False)
    _assert_same_tree(resumed.state, uninterrupted.state)
    assert _records(workdir) == _records(tmp_path / "uninterrupted")
