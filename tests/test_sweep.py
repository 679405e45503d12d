"""``jaxae sweep``: a grid of models as one program, each model the run ``jaxae train`` makes."""

from __future__ import annotations

import dataclasses
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
import pytest

from jaxae import checkpoint, cli, sweep
from jaxae.errors import JaxaeError, TrainingInterrupted
from jaxae.loop import fit
from jaxae.sweep import fit_sweep, sweep_configs
from jaxae.train import TrainConfig

EPOCHS = 3
BASE = TrainConfig(epochs=EPOCHS, batch_size=256)
GRID = {"seed": [0, 1], "lr": [1e-3, 5e-4]}


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """A 2 seeds x 2 learning rates sweep of 3 epochs, with the compile count after each epoch."""
    workdir = tmp_path_factory.mktemp("sweep") / "grid"
    compiles: list[float] = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    after_epoch: list[int] = []
    try:
        result = fit_sweep(
            sweep_configs(BASE, **GRID),
            workdir,
            progress=False,
            callbacks=[lambda records: after_epoch.append(len(compiles))],
        )
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    return workdir, result, after_epoch


@pytest.fixture(scope="module")
def references(swept):
    """``jaxae train``'s run of every config of the grid, one epoch longer (for the resume test)."""
    _, result, _ = swept
    return [fit(TrainConfig(**{**c.to_dict(), "epochs": EPOCHS + 1}), progress=False) for c in result.configs]


def test_each_swept_model_is_the_train_run(swept, references):
    _, result, _ = swept
    assert len(result.configs) == 4
    for config, history, reference in zip(result.configs, result.histories, references, strict=True):
        swept_loss = [r["test_loss"] for r in history]
        train_loss = [r["test_loss"] for r in reference.history[:EPOCHS]]
        np.testing.assert_allclose(swept_loss, train_loss, atol=1e-5, rtol=0, err_msg=f"{config.seed} {config.lr}")
        np.testing.assert_allclose(history[-1]["train_loss"], reference.history[EPOCHS - 1]["train_loss"], atol=1e-5)


def test_no_recompile_after_the_first_epoch(swept):
    _, _, after_epoch = swept
    assert after_epoch[0] >= 2  # the epoch and the evaluation
    assert after_epoch == [after_epoch[0]] * EPOCHS


def test_every_model_has_an_ordinary_workdir_and_the_summary_holds_runs_and_groups(swept):
    workdir, result, _ = swept
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary == json.loads(json.dumps(result.summary))
    assert summary["models"] == 4 and summary["varying"] == ["seed", "lr"]
    for run in summary["runs"]:
        folder = workdir / run["workdir"]
        config = json.loads((folder / "config.json").read_text())
        assert (config["seed"], config["lr"]) == (run["seed"], run["lr"])
        lines = (folder / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == EPOCHS and json.loads(lines[-1])["test_loss"] == run["test_loss"]
        assert (folder / "loss.png").exists() and (folder / "reconstructions.png").exists()
        assert (folder / "checkpoints").is_dir()
    assert [g["lr"] for g in summary["groups"]] == [1e-3, 5e-4]
    for group in summary["groups"]:
        members = [r for r in summary["runs"] if r["lr"] == group["lr"]]
        assert group["n"] == 2 == len(members)
        for metric in ("test_loss", "test_mse", "test_mse_pixels"):
            values = [r[metric] for r in members]
            assert group[f"{metric}_mean"] == pytest.approx(np.mean(values), abs=1e-12)
            assert group[f"{metric}_std"] == pytest.approx(np.std(values, ddof=1), abs=1e-12)
            assert group[f"{metric}_std"] > 0


def test_evaluate_and_train_resume_work_on_one_swept_model(swept, references, tmp_path, capsys):
    workdir, result, _ = swept
    i = 3
    run = result.summary["runs"][i]
    folder = tmp_path / run["workdir"]
    shutil.copytree(workdir / run["workdir"], folder)
    capsys.readouterr()
    assert cli.main(["evaluate", "--workdir", str(folder)]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["test_loss"] == pytest.approx(run["test_loss"], abs=1e-6)

    config = result.configs[i]
    argv = ["train", "--workdir", str(folder), "--resume", "--epochs", str(EPOCHS + 1), "--no-progress"]
    argv += ["--batch-size", "256", "--seed", str(config.seed), "--lr", str(config.lr)]
    assert cli.main(argv) == 0
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    assert records[-1]["test_loss"] == pytest.approx(references[i].history[EPOCHS]["test_loss"], abs=1e-5)


def test_an_interrupted_sweep_resumes_to_the_uninterrupted_result(swept, tmp_path, handled_sigint):
    _, uninterrupted, _ = swept
    configs = sweep_configs(BASE, **GRID)

    def interrupt_after_first_epoch(records):
        if records[0]["epoch"] == 1:
            os.kill(os.getpid(), signal.SIGINT)  # as a user's Ctrl-C: finish, save every model, stop

    with pytest.raises(TrainingInterrupted, match="after epoch 1 of 3") as stopped:
        fit_sweep(configs, tmp_path, progress=False, figures=False, callbacks=[interrupt_after_first_epoch])
    assert stopped.value.epoch == 1
    with pytest.raises(JaxaeError, match="already holds a sweep"):
        fit_sweep(configs, tmp_path, progress=False)
    resumed = fit_sweep(configs, tmp_path, resume=True, progress=False, figures=False)
    assert resumed.start_epoch == 1
    for a, b in zip(resumed.histories, uninterrupted.histories, strict=True):
        assert [r["epoch"] for r in a] == [1, 2, 3]
        np.testing.assert_allclose([r["test_loss"] for r in a], [r["test_loss"] for r in b], atol=1e-6, rtol=0)
    with pytest.raises(JaxaeError, match="sweep of other runs"):
        fit_sweep(sweep_configs(BASE, seed=[0, 1, 2]), tmp_path, resume=True, progress=False)


def test_a_diverged_model_is_marked_and_left_out_of_its_group():
    configs = sweep_configs(BASE, seed=[0, 1, 2])
    histories = [[{"epoch": 3, "test_loss": v}] for v in (0.1, float("nan"), 0.3)]
    placement = sweep.Placement(3, "none")
    summary = sweep._summary(["a", "b", "c"], configs, ["seed"], histories, placement, {1: 2})
    assert summary["runs"][1]["diverged_at_epoch"] == 2
    (group,) = summary["groups"]
    assert group["n"] == 2 and group["diverged"] == 1 and group["seeds"] == [0, 2]
    assert group["test_loss_mean"] == pytest.approx(0.2) and group["test_loss_std"] == pytest.approx(
        np.std([0.1, 0.3], ddof=1)
    )


@pytest.mark.parametrize(
    "flags, what",
    [
        (["--latent-dim", "16,32"], "--latent-dim"),
        (["--hidden-dims", "128,64", "256,128"], "--hidden-dims"),
        (["--arch", "conv", "--conv-channels", "8,16", "16,32"], "--conv-channels"),
        (["--arch", "mlp,conv"], "--arch"),
        (["--variant", "vanilla", "vae"], "--variant"),
    ],
)
def test_a_list_of_a_shape_setting_is_one_line_exit_2(flags, what, tmp_path, capsys):
    assert cli.main(["sweep", "--workdir", str(tmp_path / "w"), "--seeds", "0,1", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith(f"jaxae: error: {what} takes one value in a sweep: it changes the parameter shapes")
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("flags", [["--seeds", "0,a"], ["--lr", "1e-3,"], ["--beta", "x"]])
def test_a_list_that_is_not_numbers_is_one_line_exit_2(flags, tmp_path, capsys):
    assert cli.main(["sweep", "--workdir", str(tmp_path / "w"), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"jaxae: error: {flags[0]} takes one value or a comma list")


def test_library_refuses_grids_that_cannot_be_one_program():
    with pytest.raises(JaxaeError, match="--latent-dim takes one value"):
        sweep_configs(BASE, latent_dim=[16, 32])
    with pytest.raises(JaxaeError, match="--batch-size|batch_size"):
        sweep.check_grid([BASE, TrainConfig(epochs=EPOCHS, batch_size=128)])
    with pytest.raises(JaxaeError, match="same run twice"):
        sweep.check_grid([BASE, BASE])


def test_a_grid_that_cannot_fit_is_refused_before_compiling(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(sweep, "device_memory_bytes", lambda device: 64 * 2**20)

    def no_compile(*args, **kwargs):
        raise AssertionError("compiled a grid that does not fit")

    monkeypatch.setattr(sweep.Placement, "compile", no_compile)
    argv = ["sweep", "--workdir", str(tmp_path / "w"), "--seeds", ",".join(map(str, range(64))), "--no-progress"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "a sweep of 64 models needs about" in err and "per model x 64 models" in err and "64.0 MiB" in err
    # Not a blanket refusal: 256 of the document's models with Fashion-MNIST fit in 16 GiB.
    estimate = sweep.estimate_memory(TrainConfig(), 220_000, 784, 70_000 * 784, 256)
    assert 2**30 < estimate.total < 0.9 * 16 * 2**30


@pytest.mark.slow
def test_models_spread_over_four_devices_give_the_same_numbers(tmp_path):
    out = tmp_path / "report.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parents[1]), env.get("PYTHONPATH")]))
    helper = Path(__file__).with_name("sweep_helper.py")
    proc = subprocess.run([sys.executable, str(helper), str(out)], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["devices"] == 4
    assert report["five/none"]["placement"] == "one device"
    assert report["five/shard"]["placement"] == "models over devices"
    assert report["two/shard"]["placement"] == "data-parallel"
    one_device = report["five/none"]["test_loss"]
    np.testing.assert_allclose(report["five/shard"]["test_loss"], one_device, atol=1e-5, rtol=0)
    np.testing.assert_allclose(report["two/shard"]["test_loss"], one_device[:2], atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "variant, values",
    [
        ("denoising", {"noise_std": [0.0, 0.3], "mask_prob": [0.0, 0.25]}),
        ("sparse", {"sparsity_weight": [0.0, 0.05], "sparsity_target": [0.05, 0.2]}),
        ("vae", {"beta": [0.0, 2.0], "seed": [0, 1]}),
    ],
)
def test_swept_loss_weights_give_the_train_step_of_each_config(variant, values, sample_train):
    """Every sweepable loss setting as a per-model value: one vmapped step equals each config's own."""
    base = TrainConfig(variant=variant, sparsity="kl" if variant == "sparse" else "l1")
    configs = sweep_configs(base, **values)
    names = tuple(n for n in sweep.varying_settings(configs) if n in sweep.HYPERPARAMETERS)
    batch = jax.numpy.asarray(sample_train.images[:64].reshape(64, -1))
    built = [sweep.build(c, 784) for c in configs]
    program = sweep.SweepProgram(base, built[0][0].graphdef, names)
    hyper = {n: jax.numpy.asarray([getattr(c, n) for c in configs], jax.numpy.float32) for n in names}
    stacked = jax.tree.map(jax.numpy.asarray, sweep.stack([state for _, state in built]))

    def step(state, h):
        return program.trainer(h).train_step(state, batch)

    states, metrics = jax.jit(jax.vmap(step))(stacked, hyper)
    for i, (trainer, state) in enumerate(built):
        alone, alone_metrics = trainer.jit_train_step(state, batch)
        np.testing.assert_allclose(
            metrics["loss"][i], alone_metrics["loss"], rtol=1e-6, atol=1e-7, err_msg=str(configs[i])
        )
        for a, b in zip(jax.tree.leaves(alone.params), jax.tree.leaves(states.params), strict=True):
            # Adam's first update is about lr * sign(gradient): a tiny gradient's rounding shows.
            np.testing.assert_allclose(b[i], a, rtol=0, atol=1e-6)


def test_a_sweep_refuses_a_folder_another_run_holds(tmp_path):
    from jaxae.loop import WorkdirLock

    workdir = tmp_path / "grid"
    workdir.mkdir()
    configs = sweep_configs(TrainConfig(epochs=1), seed=[0, 1])
    with WorkdirLock(workdir):
        with pytest.raises(JaxaeError, match=rf"in use by another jaxae run \(PID {os.getpid()}\)"):
            fit_sweep(configs, workdir, progress=False)
    assert list(workdir.iterdir()) == [workdir / ".jaxae.lock"]


@pytest.mark.slow
def test_a_sweep_keeps_the_runs_optimizer_settings(tmp_path):
    # AdamW with decay in a sweep is AdamW with decay in each model, as in `jaxae train`.
    base = TrainConfig(epochs=1, optimizer="adamw", weight_decay=0.1, betas=(0.8, 0.99), eps=1e-6)
    result = fit_sweep(sweep_configs(base, lr=[1e-3, 3e-3]), None, progress=False)
    for config, state in zip(result.configs, result.states, strict=True):
        alone = fit(config, None, progress=False)
        np.testing.assert_allclose(
            jax.tree.leaves(state.params)[0], jax.tree.leaves(alone.state.params)[0], atol=1e-5, rtol=0
        )


# -- hostile round: processes, stuck sweeps, huge grids ------------------------------------------

REPO = Path(__file__).resolve().parents[1]


def _env(**extra):
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", **extra}


def _sweep_command(idx_folder, workdir, *flags):
    return [sys.executable, "-m", "jaxae", "sweep", "--dataset", str(idx_folder), "--batch-size", "64"] + [
        "--workdir",
        str(workdir),
        "--no-progress",
        "--no-figures",
        *flags,
    ]


def _wait_until(condition, proc, seconds=180):
    deadline = time.monotonic() + seconds
    while not condition():
        assert proc.poll() is None, f"exited with {proc.returncode}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _epochs(run_dir):
    return [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_model_folder_of_a_running_sweep_is_refused_as_in_use(tmp_path, idx_folder):
    sweep_dir = tmp_path / "S"
    with open(tmp_path / "sweep.err", "w") as err:
        proc = subprocess.Popen(
            _sweep_command(idx_folder, sweep_dir, "--seeds", "0,1", "--epochs", "6"),
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=_env(JAXAE_TEST_SLOW_SAVE_SECONDS="1"),  # every save held 1 s: the sweep is surely running
        )
    try:
        _wait_until(lambda: (sweep_dir / "sweep.json").exists(), proc)
        train = subprocess.run(
            [sys.executable, "-m", "jaxae", "train", "--dataset", str(idx_folder), "--batch-size", "64"]
            + ["--workdir", str(sweep_dir / "seed1"), "--seed", "1", "--epochs", "9", "--resume", "--no-progress"],
            capture_output=True,
            text=True,
            env=_env(),
            timeout=120,
        )
        assert proc.poll() is None, "the sweep ended before the train run started"
        assert proc.wait(timeout=300) == 0, (tmp_path / "sweep.err").read_text()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert train.returncode == 2, train.stderr
    (line,) = train.stderr.strip().splitlines()
    assert f"{sweep_dir / 'seed1'} is in use by another jaxae run (PID {proc.pid})" in line
    for name in ("seed0", "seed1"):
        assert _epochs(sweep_dir / name) == [1, 2, 3, 4, 5, 6]  # nothing the sweep wrote was lost


def test_a_sweep_refuses_a_model_folder_a_train_run_holds_and_leaves_no_folders(tmp_path):
    from jaxae.loop import WorkdirLock

    (tmp_path / "held").mkdir()
    configs = sweep_configs(TrainConfig(epochs=1), seed=[0, 1])
    sweep_dir = tmp_path / "new" / "S"
    (sweep_dir / "seed1").mkdir(parents=True)
    with WorkdirLock(sweep_dir / "seed1"):
        with pytest.raises(JaxaeError, match=rf"seed1 is in use by another jaxae run \(PID {os.getpid()}\)"):
            fit_sweep(configs, sweep_dir, progress=False)
    assert sorted(p.name for p in sweep_dir.iterdir()) == [".jaxae.lock", "seed1"]  # only what it made is gone
    # a refusal after the folders are claimed removes what it created
    code = cli.main(["sweep", "--workdir", str(tmp_path / "fresh" / "S"), "--seeds", "0,1", "--batch-size", "5000"])
    assert code == 2 and not (tmp_path / "fresh").exists()


@pytest.mark.slow  # a real process killed; the interrupted sweep's resume is tested in process
def test_a_sweep_killed_before_its_first_checkpoint_resumes_from_the_start(tmp_path, idx_folder):
    sweep_dir = tmp_path / "S"
    flags = ("--seeds", "0,1", "--epochs", "2")
    proc = subprocess.Popen(
        _sweep_command(idx_folder, sweep_dir, *flags),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=_env(JAXAE_TEST_SLOW_SAVE_SECONDS="60"),  # the first save is held: killed in the middle of it
    )
    try:
        _wait_until(lambda: any((sweep_dir / "seed0" / "checkpoints").glob("*tmp*")), proc)
    finally:
        proc.kill()
        proc.wait()
    assert (sweep_dir / "sweep.json").exists() and checkpoint.complete_steps(sweep_dir / "seed0") == []
    resumed = subprocess.run(
        _sweep_command(idx_folder, sweep_dir, *flags, "--resume"), capture_output=True, text=True, env=_env()
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    fresh = subprocess.run(
        _sweep_command(idx_folder, tmp_path / "F", *flags), capture_output=True, text=True, env=_env()
    )
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    for name in ("seed0", "seed1"):
        assert _epochs(sweep_dir / name) == [1, 2]
    got = json.loads((sweep_dir / "summary.json").read_text())["runs"]
    want = json.loads((tmp_path / "F" / "summary.json").read_text())["runs"]
    assert [r["test_loss"] for r in got] == [r["test_loss"] for r in want]


def _no_nan(text):
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.slow
def test_a_diverged_model_is_reported_and_the_sweep_resumes(tmp_path, capsys, idx_folder):
    argv = ["sweep", "--dataset", str(idx_folder), "--batch-size", "64", "--lr", "1e-3,1e30"]
    argv += ["--workdir", str(tmp_path / "S"), "--no-progress", "--no-figures"]
    assert cli.main([*argv, "--epochs", "2"]) == 1
    captured = capsys.readouterr()
    (line,) = captured.err.strip().splitlines()
    assert line.startswith("jaxae: error: 1 of 2 models diverged (seed0_lr1e+30 at epoch 1)")
    summary = _no_nan((tmp_path / "S" / "summary.json").read_text())
    (bad,) = [r for r in summary["runs"] if "diverged_at_epoch" in r]
    assert bad["test_loss"] is None and bad["epochs"] == 1
    assert _no_nan((tmp_path / "S" / "sweep.json").read_text())["diverged"] == {"seed0_lr1e+30": 1}
    for text in (tmp_path / "S" / "seed0_lr1e+30" / "metrics.jsonl").read_text().splitlines():
        _no_nan(text)
    # the sweep resumes: the healthy model goes on, the diverged one stays diverged and unsaved
    assert cli.main([*argv, "--epochs", "3", "--resume"]) == 1
    capsys.readouterr()
    assert _epochs(tmp_path / "S" / "seed0_lr0.001") == [1, 2, 3]
    assert _epochs(tmp_path / "S" / "seed0_lr1e+30") == [1]
    assert checkpoint.complete_steps(tmp_path / "S" / "seed0_lr1e+30") == []


def test_a_grid_far_too_large_is_refused_from_its_size_before_any_config_is_made(tmp_path, capsys, monkeypatch):
    def no_configs(*args, **kwargs):
        raise AssertionError("made the configs of a grid that cannot fit")

    monkeypatch.setattr(sweep, "sweep_configs", no_configs)
    lrs = ",".join(f"{1e-3 * (i + 1):g}" for i in range(10))
    argv = ["sweep", "--workdir", str(tmp_path / "S"), "--seeds", ",".join(map(str, range(9000))), "--lr", lrs]
    assert cli.main(argv) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "a sweep of 90000 models needs about" in line and not (tmp_path / "S").exists()


def test_sweeping_a_setting_the_variant_ignores_is_refused(tmp_path, capsys):
    code = cli.main(["sweep", "--workdir", str(tmp_path / "S"), "--noise-std", "0.1,0.2"])
    assert code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "--noise-std does not change the vanilla variant's training" in line
    assert "sweep it with --variant denoising" in line and not (tmp_path / "S").exists()
    with pytest.raises(JaxaeError, match="--beta does not change the sparse variant"):
        sweep.check_grid(sweep_configs(TrainConfig(variant="sparse"), beta=[1.0, 2.0]))


@pytest.mark.slow
def test_a_sweep_takes_arrays_in_memory_as_fit_does(sample_train, sample_test):
    train = (sample_train.images[:256], sample_train.labels[:256])
    test = (sample_test.images[:64], None)
    base = TrainConfig(epochs=1, batch_size=64)
    result = fit_sweep(sweep_configs(base, seed=[0, 1]), train=train, test=test, progress=False)
    assert [c.dataset for c in result.configs] == ["arrays", "arrays"]
    for config, history in zip(result.configs, result.histories, strict=True):
        alone = fit(config, train=train, test=test, progress=False).history
        np.testing.assert_allclose(history[0]["train_loss"], alone[0]["train_loss"], rtol=1e-5)
    with pytest.raises(JaxaeError, match="got test= but no train="):
        fit_sweep([base], test=test, progress=False)


@pytest.mark.slow
def test_a_resumed_sweep_records_what_it_changes_as_a_resumed_run_does(tmp_path, idx_folder):
    base = TrainConfig(dataset=str(idx_folder), batch_size=128, epochs=1, lr_schedule="cosine")
    fit_sweep(sweep_configs(base, seed=[0, 1]), tmp_path / "s", progress=False, figures=False)
    longer = dataclasses.replace(base, epochs=2, clip_grad_norm=1.0)
    fit_sweep(sweep_configs(longer, seed=[0, 1]), tmp_path / "s", resume=True, progress=False, figures=False)
    for name in ("seed0", "seed1"):
        records = [json.loads(line) for line in (tmp_path / "s" / name / "metrics.jsonl").read_text().splitlines()]
        assert "changed" not in records[0]
        # the cosine now runs over 2 epochs: its rest is stretched, and recorded as a resumed run records it
        assert records[1]["changed"] == {"clip_grad_norm": {"from": 0.0, "to": 1.0}, "epochs": {"from": 1, "to": 2}}
    assert json.loads((tmp_path / "s" / "summary.json").read_text())["models"] == 2


def test_a_sweep_writes_its_summary_before_its_figures_and_one_epoch_time_for_every_model(
    tmp_path, idx_folder, monkeypatch
):
    from jaxae import plots

    def broken(*args, **kwargs):
        raise OSError("the figure could not be drawn")

    monkeypatch.setattr(plots, "write_run_figures", broken)
    base = TrainConfig(dataset=str(idx_folder), batch_size=128, epochs=1)
    with pytest.raises(OSError, match="could not be drawn"):
        fit_sweep(sweep_configs(base, seed=[0, 1, 2]), tmp_path / "s", progress=False)
    assert json.loads((tmp_path / "s" / "summary.json").read_text())["models"] == 3
    seconds = {json.loads((tmp_path / "s" / f"seed{i}" / "metrics.jsonl").read_text())["seconds"] for i in range(3)}
    assert len(seconds) == 1  # the epoch's training and evaluation, one figure for all the models


def test_one_conv_channels_value_in_a_sweep_keeps_its_commas():
    from jaxae.config import sweep_lists

    single, lists = sweep_lists({"conv_channels": ["8,16,32"], "seed": "0,1"})
    assert single["conv_channels"] == (8, 16, 32) and lists == {"seed": [0, 1]}
