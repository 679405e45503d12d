"""Data-parallel training: none (1 device), pmap (4) and shard (4, and 2 processes x 2) agree.

The multi-device runs happen in subprocesses, because the fake CPU device count has to be set
before JAX starts and the rest of the suite keeps one device: ``parallel_helper.py`` trains
with 4 devices in one process, and two ``jaxae train`` processes with 2 devices each form one
run through ``jax.distributed`` (Gloo collectives over 127.0.0.1).
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxae import checkpoint, cli, parallel
from jaxae.data import write_idx
from jaxae.errors import JaxaeError
from jaxae.loop import LOCK_FILE, WorkdirLock, fit
from jaxae.train import TrainConfig, build

HELPER = Path(__file__).with_name("parallel_helper.py")
REPO = HELPER.parent.parent
# vqvae: state no gradient trains (the EMA codebook) summed over the devices' real rows.
VARIANTS = ["vanilla", "vae", "vqvae"]
EPOCHS = 3
# 512 training images in batches of 96: 6 steps, the last one 32 real rows and 64 masked,
# so with 4 devices of 24 rows two devices hold nothing but padding in the last step.
BATCH = 96
TOL = 1e-5
TIMEOUT = 300


def _env(devices: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    env.update(
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        PYTHONUNBUFFERED="1",
    )
    return env


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, sample_train, sample_test):
    """512 train / 128 test real digits as an IDX folder."""
    folder = tmp_path_factory.mktemp("parallel-data")
    rng = np.random.default_rng(5)
    tr = rng.choice(len(sample_train), 512, replace=False)
    te = rng.choice(len(sample_test), 128, replace=False)
    write_idx(folder / "train-images-idx3-ubyte", sample_train.images[tr, :, :, 0])
    write_idx(folder / "train-labels-idx1-ubyte", sample_train.labels[tr])
    write_idx(folder / "t10k-images-idx3-ubyte", sample_test.images[te, :, :, 0])
    write_idx(folder / "t10k-labels-idx1-ubyte", sample_test.labels[te])
    return folder


@pytest.fixture(scope="module")
def four_devices(tmp_path_factory, dataset):
    """Every variant trained with none / pmap / shard in one process with 4 CPU devices."""
    out = tmp_path_factory.mktemp("four-devices")
    proc = subprocess.run(
        [sys.executable, str(HELPER), str(out / "result"), str(dataset), str(EPOCHS), str(BATCH), *VARIANTS],
        capture_output=True,
        text=True,
        cwd=out,
        env=_env(4),
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((out / "result.json").read_text())
    with np.load(out / "result.npz") as npz:
        arrays = dict(npz)
    return report, arrays


def _final_state(arrays: dict, key: str) -> list[np.ndarray]:
    leaves = sorted((int(k.rsplit("/", 1)[1]), v) for k, v in arrays.items() if k.rsplit("/", 1)[0] == key)
    return [v for _, v in leaves]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_process_run(workdir: Path, dataset: Path, *flags: str) -> tuple[Path, list[str]]:
    """``jaxae train --parallel shard`` as 2 processes x 2 CPU devices on 127.0.0.1."""
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "jaxae", "train", "--dataset", str(dataset), "--epochs", str(EPOCHS)]
            + ["--batch-size", str(BATCH), "--parallel", "shard", "--workdir", str(workdir), "--no-progress"]
            + ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i), *flags],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(2),
        )
        for i in range(2)
    ]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=TIMEOUT))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-4000:]
    return workdir, [out for out, _ in outputs]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, dataset):
    return _two_process_run(tmp_path_factory.mktemp("two-processes") / "run", dataset)


# -- 1 device vs 4 devices, one process -------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_none_pmap_and_shard_give_the_same_losses_and_parameters(four_devices, variant):
    report, arrays = four_devices
    runs = {name: report["runs"][f"{variant}/{name}"] for name in ("none", "pmap", "shard")}
    assert {name: run["device_count"] for name, run in runs.items()} == {"none": 1, "pmap": 4, "shard": 4}
    reference = runs["none"]["history"]
    assert [r["epoch"] for r in reference] == list(range(1, EPOCHS + 1))
    assert reference[-1]["train_loss"] < reference[0]["train_loss"]  # it really trained
    baseline = _final_state(arrays, f"{variant}/none")
    for name in ("pmap", "shard"):
        history = runs[name]["history"]
        for key in ("train_loss", "test_loss", "step"):
            # 1e-5 absolute, or a few float32 ulps of the value for losses in nats (the VAE's ~500)
            np.testing.assert_allclose(
                [r[key] for r in history], [r[key] for r in reference], atol=TOL, rtol=1e-6, err_msg=f"{name} {key}"
            )
        state = _final_state(arrays, f"{variant}/{name}")
        assert len(state) == len(baseline)
        for ours, theirs in zip(state, baseline, strict=True):
            assert ours.shape == theirs.shape
            np.testing.assert_allclose(ours, theirs, atol=TOL, rtol=0, err_msg=name)


@pytest.mark.parametrize("variant", ["vanilla", "vqvae"])  # parallel_helper.STREAM_VARIANTS
def test_a_streamed_epoch_over_4_devices_gives_the_in_memory_numbers(four_devices, variant):
    report, arrays = four_devices
    memory, streamed = (report["runs"][f"{variant}/{name}"]["history"] for name in ("shard", "shard-stream"))
    for key in ("train_loss", "test_loss", "step"):
        np.testing.assert_allclose([r[key] for r in streamed], [r[key] for r in memory], rtol=1e-6, atol=0)
    for ours, theirs in zip(
        _final_state(arrays, f"{variant}/shard-stream"), _final_state(arrays, f"{variant}/shard"), strict=True
    ):
        np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-7)


def test_shard_holds_the_split_once_across_the_devices_even_where_they_do_not_divide_it(four_devices):
    report, arrays = four_devices
    held = report["held_once"]
    # 509 rows over 4 devices: a block of 128 each, one copy in all (before: 509 on every device).
    assert held["shape"] == [509, 784] and held["device_rows"] == [128] * 4, held
    assert len(set(held["devices"])) == 4 and held["rows_equal"] and held["padding_zero"], held
    reference, sharded = (report["runs"][f"odd/{name}"]["history"] for name in ("none", "shard"))
    for key in ("train_loss", "test_loss", "step"):
        np.testing.assert_allclose([r[key] for r in sharded], [r[key] for r in reference], atol=TOL, rtol=1e-6)
    for ours, theirs in zip(_final_state(arrays, "odd/shard"), _final_state(arrays, "odd/none"), strict=True):
        np.testing.assert_allclose(ours, theirs, atol=TOL, rtol=0)


@pytest.mark.slow  # three training processes on 120 MiB of images: about a minute
def test_shard_holds_one_copy_of_the_data_across_its_devices_in_memory(tmp_path):
    out = tmp_path / "memory.json"
    script = REPO / "experiments" / "data_memory.py"
    command = [sys.executable, str(script), "--images", "30000", "--test-images", "2000", "--out", str(out)]
    command += ["--runs", "none,shard,pmap"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, env=_env(1), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = {r["strategy"]: r for r in json.loads(out.read_text())["rows"]}
    # 123 MiB of train images: shard holds one copy between its 4 devices. (pmap's 4 CPU devices
    # alias one aligned host copy; on accelerators each holds its own, which no CPU run can show.)
    assert rows["shard"]["anon_vs_one_device"] <= 1.3, rows
    assert rows["shard"]["test_loss"] == pytest.approx(rows["pmap"]["test_loss"], rel=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_no_recompilation_across_epochs_on_any_path(four_devices, variant):
    report, _ = four_devices
    for name in ("none", "pmap", "shard", "shard-stream"):
        if f"{variant}/{name}" not in report["runs"]:
            continue  # shard-stream runs for two of the variants
        counts = report["runs"][f"{variant}/{name}"]["compiles_after_epoch"]
        assert len(counts) == EPOCHS
        assert counts == [counts[0]] * EPOCHS, f"{name} compiled again after the first epoch: {counts}"


def test_auto_is_shard_when_several_devices_are_visible(four_devices):
    report, _ = four_devices
    assert report["devices"] == 4 and report["auto"] == "shard"


@pytest.mark.parametrize("name", ["pmap", "shard"])
def test_a_batch_the_devices_do_not_divide_is_a_clear_error(four_devices, name):
    errors = four_devices[0]["errors"]
    assert errors[name] is not None, "an indivisible batch was accepted"
    assert f"--batch-size {BATCH + 2} is not divisible by the 4 devices" in errors[name]
    cli_result = errors[f"cli/{name}"]
    assert cli_result["code"] == 2
    lines = cli_result["stderr"].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jaxae: error: --batch-size 98 is not divisible"), lines


# -- 2 processes x 2 devices vs 1 process x 4 devices --------------------------------------------


@pytest.mark.slow
def test_two_processes_give_the_results_of_one_process(two_processes, four_devices):
    workdir, stdouts = two_processes
    report, arrays = four_devices
    reference = report["runs"]["vanilla/shard"]["history"]
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(1, EPOCHS + 1))
    for key in ("train_loss", "test_loss", "step"):
        np.testing.assert_allclose([r[key] for r in records], [r[key] for r in reference], atol=TOL, rtol=0)
    _, state, config = checkpoint.restore(workdir)
    assert config.batch_size == BATCH
    baseline = _final_state(arrays, "vanilla/shard")
    for ours, theirs in zip(jax.tree.leaves(state), baseline, strict=True):
        np.testing.assert_allclose(np.asarray(ours), theirs, atol=TOL, rtol=0)


@pytest.mark.slow  # a second two-process run: about 2 minutes
def test_two_processes_streaming_give_the_results_of_one_process_in_memory(tmp_path, dataset, four_devices):
    """Each process gathers only its own devices' columns of every batch from the mapped file."""
    workdir, _ = _two_process_run(tmp_path / "run", dataset, "--input", "stream")
    report, arrays = four_devices
    reference = report["runs"]["vanilla/shard"]["history"]
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    for key in ("train_loss", "test_loss", "step"):
        np.testing.assert_allclose([r[key] for r in records], [r[key] for r in reference], atol=TOL, rtol=0)
    _, state, _ = checkpoint.restore(workdir)
    for ours, theirs in zip(jax.tree.leaves(state), _final_state(arrays, "vanilla/shard"), strict=True):
        np.testing.assert_allclose(np.asarray(ours), theirs, atol=TOL, rtol=0)


@pytest.mark.slow
def test_only_process_zero_reports(two_processes):
    workdir, stdouts = two_processes
    summary = json.loads(stdouts[0].strip().splitlines()[-1])
    assert summary["devices"] == 4 and summary["epochs"] == EPOCHS
    # Gloo's own connection messages go to stdout from C++, one piece at a time and from several
    # threads, so its lines come cut and interleaved anywhere between its pieces ("[Gloo] Rank " on one
    # line, "3 is connected to 3 peer ranks. " on the next, "Expected number of ..." on a third).
    # Nothing but those pieces may be there.
    assert _without_gloo(stdouts[1]) == ""
    for name in ("config.json", "reconstructions.png", "loss.png"):
        assert (workdir / name).stat().st_size > 0, name


GLOO_PIECES = re.compile(
    r"\[Gloo\]|Rank|is connected to|peer ranks\.?|Expected number of connected peer ranks is\s*:|\d+|\s+"
)


def _without_gloo(stdout: str) -> str:
    """What is left of a process's stdout once every piece of Gloo's connection messages is taken out."""
    return GLOO_PIECES.sub("", stdout)


def test_the_gloo_filter_keeps_anything_else():
    cut = "[Gloo] Rank \n1 is connected to 3 peer ranks. \nExpected number of connected peer ranks is : 3\n"
    assert _without_gloo(cut) == ""
    assert _without_gloo(cut + '{"epoch": 1}\n') == '{"epoch":}'
    assert _without_gloo("epoch 1/2\n") == "epoch/"


def _start_two_processes(dataset, workdirs, port, *flags) -> list[subprocess.Popen]:
    return [
        subprocess.Popen(
            [sys.executable, "-m", "jaxae", "train", "--dataset", str(dataset), "--epochs", "1"]
            + ["--batch-size", str(BATCH), "--parallel", "shard", "--workdir", str(workdir), "--no-progress"]
            + ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i), *flags],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(2),
        )
        for i, workdir in enumerate(workdirs)
    ]


def _finish(procs: list[subprocess.Popen], timeout: float) -> list[tuple[str, str]]:
    """Every process's (stdout, stderr); a process still running after ``timeout`` fails the test."""
    try:
        return [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_processes_that_do_not_share_the_workdir_fail_at_once_instead_of_hanging(tmp_path, dataset):
    # Each process's own folder stands for each host's local disk: Orbax's first save would wait forever.
    workdirs = [tmp_path / "host0" / "run", tmp_path / "host1" / "run"]
    start = time.monotonic()
    outputs = _finish(_start_two_processes(dataset, workdirs, _free_port()), timeout=120)
    assert time.monotonic() - start < 120
    for index, (_, err) in enumerate(outputs):
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[-1].startswith("jaxae: error: --workdir "), (index, err[-3000:])
        assert "process 1 does not see what process 0 writes there" in lines[-1]
        assert "must be storage every process sees (a shared file system or a mounted bucket)" in lines[-1]
        assert not checkpoint.complete_steps(workdirs[index]) and not (workdirs[index] / "metrics.jsonl").exists()


@pytest.mark.slow
def test_a_second_multi_process_run_on_a_busy_workdir_is_refused_in_every_process(tmp_path, dataset):
    workdir = tmp_path / "run"
    workdir.mkdir()
    # A single-process run holds the workdir: process 0 of the new run cannot lock it, and
    # process 1 (which can lock its own file) must not be left waiting for process 0.
    with WorkdirLock(workdir):
        outputs = _finish(_start_two_processes(dataset, [workdir, workdir], _free_port()), timeout=120)
    for index, (_, err) in enumerate(outputs):
        lines = err.strip().splitlines()
        assert len(lines) == 1 and f"{workdir} is in use by another jaxae run (PID {os.getpid()})" in lines[-1], err[
            -3000:
        ]
        assert lines[-1].startswith("jaxae: error: " + ("" if index == 0 else "process 0: "))
    assert not (workdir / "metrics.jsonl").exists()


@pytest.mark.slow
def test_an_unreachable_coordinator_fails_within_coordinator_timeout_in_one_line(tmp_path):
    port = _free_port()  # nothing listens there
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "jaxae", "train", "--workdir", str(tmp_path / "run"), "--no-progress"]
        + ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", "1"]
        + ["--coordinator-timeout", "3"],
        capture_output=True,
        text=True,
        env=_env(1),
        timeout=120,
    )
    took = time.monotonic() - start
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"jaxae: error: cannot reach the coordinator 127.0.0.1:{port}")
    assert "within 3 s" in lines[0] and "--coordinator-timeout" in lines[0]
    assert 3 <= took < 60  # JAX alone waits 300 s
    assert not (tmp_path / "run").exists()


def test_coordinator_timeout_reaches_jax(monkeypatch):
    seen = {}

    def initialize(*args, **kwargs):
        seen.update(kwargs)

    monkeypatch.setattr(jax.distributed, "initialize", initialize)
    monkeypatch.setattr(jax.config, "update", lambda *args: None)  # this process stays single-process
    monkeypatch.setattr(parallel, "_wait_for_coordinator", lambda *args: None)
    parallel.initialize_distributed("127.0.0.1:1234", 2, 1, timeout=7)
    assert seen == {"initialization_timeout": 7}
    args = cli.build_parser().parse_args(["train"])
    assert args.coordinator_timeout == 60
    with pytest.raises(JaxaeError, match="--coordinator-timeout must be at least 1 second, got 0"):
        parallel.initialize_distributed("127.0.0.1:1234", 2, 1, timeout=0)


# -- one device (this process) ----------------------------------------------------------------


def test_auto_is_none_on_one_device():
    assert jax.device_count() == 1
    assert parallel.get_strategy("auto").name == "none"
    with pytest.raises(JaxaeError, match="unknown parallel strategy 'ring'"):
        parallel.get_strategy("ring")


@pytest.mark.parametrize("name", ["none", "pmap", "shard"])
def test_a_mapped_split_is_copied_to_the_devices_so_rewriting_its_file_changes_nothing(tmp_path, name):
    """jax.device_put aliases a 64-byte aligned host array on CPU: a memory-mapped .npy (whose
    header numpy pads to 64 bytes) given to fit would train on whatever is written into the
    file later, and fault where the file is truncated."""
    path = tmp_path / "train.npy"
    images = np.random.default_rng(0).integers(0, 256, (64, 28 * 28), dtype=np.uint8)
    np.save(path, images)
    mapped = np.load(path, mmap_mode="r")
    assert mapped.offset % 64 == 0  # the alignment at which the CPU backend aliases
    placed = parallel.get_strategy(name, jax.devices()[:1]).put_data(mapped)
    with open(path, "r+b") as f:  # rewritten in place, as a tool other than jaxae's writers might
        f.seek(mapped.offset)
        f.write(b"\xff" * images.nbytes)
    assert np.all(mapped == 255)  # the map does see the new bytes
    on_devices = np.asarray(placed.data if name == "shard" else placed)
    np.testing.assert_array_equal(on_devices[: len(images)], images)


def test_an_array_over_a_mapped_buffer_is_copied_too(tmp_path):
    """np.frombuffer(mmap) views the map through a memoryview, not an np.memmap."""
    import mmap

    path = tmp_path / "rows.bin"
    images = np.random.default_rng(1).integers(0, 256, (64, 784), dtype=np.uint8)
    path.write_bytes(images.tobytes())
    with open(path, "r+b") as f:
        mapped_file = mmap.mmap(f.fileno(), 0)
    viewed = np.frombuffer(mapped_file, np.uint8).reshape(64, 784)
    placed = parallel.get_strategy("none").put_data(viewed)
    mapped_file[:] = b"\xff" * images.nbytes
    assert np.all(viewed == 255)
    np.testing.assert_array_equal(np.asarray(placed), images)


def test_shard_refuses_row_shards_of_another_layout_and_unplaced_arrays():
    shard = parallel.get_strategy("shard", jax.devices()[:1])
    images = np.zeros((10, 64), np.uint8)
    elsewhere = parallel.RowShards(jax.device_put(images), 10)  # one device's array, not the mesh's
    with pytest.raises(JaxaeError, match="placed on a mesh of 1 devices .*place the host array with this strategy"):
        shard.put_data(elsewhere)
    trainer, state = build(TrainConfig(), (8, 8, 1))
    state = shard.put_state(state)
    # Before: compile_* placed a host array itself and compiled a function that array could not be passed to.
    for method in (shard.compile_epoch, shard.compile_evaluate):
        with pytest.raises(JaxaeError, match=f"{method.__name__} takes the RowShards that put_data returns, got"):
            method(trainer, state, images, 2)
    assert shard.put_data(shard.put_data(images)).rows == 10  # its own RowShards pass through


class _SecondaryProcess(parallel.Strategy):
    """The single-device strategy as seen by a process other than process 0."""

    @property
    def is_primary(self) -> bool:
        return False


def test_only_the_primary_process_writes_outputs(tmp_path, idx_folder):
    workdir = tmp_path / "run"
    result = fit(TrainConfig(dataset=str(idx_folder), epochs=1, batch_size=128), workdir, strategy=_SecondaryProcess())
    assert len(result.history) == 1
    # Every process takes part in the checkpoint; nothing else is written but the run's lock file.
    assert sorted(p.name for p in workdir.iterdir()) == [LOCK_FILE, checkpoint.CHECKPOINT_DIR]


@pytest.mark.parametrize(
    "flags, pattern",
    [
        (["--num-processes", "2", "--process-id", "2"], "--process-id must be in [0, 2), got 2"),
        (["--num-processes", "0"], "--num-processes must be positive"),
        (["--coordinator", "localhost", "--num-processes", "2", "--process-id", "0"], "must be HOST:PORT"),
    ],
)
def test_bad_multi_process_settings_are_one_line_and_exit_2(tmp_path, capsys, flags, pattern):
    code = cli.main(["train", *flags, "--workdir", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("jaxae: error: ")
    assert pattern in err[0]
    assert not (tmp_path / "out").exists()


def test_train_help_documents_the_parallel_flags():
    text = cli.build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    for flag in ("--parallel {auto,none,pmap,shard}", "--coordinator HOST:PORT", "--num-processes N", "--process-id I"):
        assert flag in text, flag
    args = cli.build_parser().parse_args(["train"])
    assert args.parallel == "auto"


def _train_two(dataset, workdir, *flags, env=None) -> list[subprocess.Popen]:
    """``jaxae train --parallel shard`` of the whole run as 2 processes x 2 devices."""
    port = _free_port()
    return [
        subprocess.Popen(
            [sys.executable, "-m", "jaxae", "train", "--dataset", str(dataset), "--epochs", str(EPOCHS)]
            + ["--batch-size", str(BATCH), "--parallel", "shard", "--workdir", str(workdir), "--no-progress"]
            + ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i), *flags],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env or _env(2),
        )
        for i in range(2)
    ]


@pytest.mark.slow  # two real processes for a minute; test_config tests the agreement of a signal from another process in process
def test_a_signal_to_one_process_stops_both_at_one_step_and_resume_is_exact(tmp_path, dataset, four_devices):
    """A preempted host: SIGTERM to process 1 only. Both stop at the same epoch boundary with one
    complete checkpoint (before: process 0 waited in a collective forever); resumed, the run ends
    at the uninterrupted run's numbers."""
    workdir = tmp_path / "run"
    # Saves held 1.5 s each, so the signal lands mid-run.
    procs = _train_two(dataset, workdir, env={**_env(2), checkpoint.SLOW_SAVE_ENV: "1.5"})
    metrics = workdir / "metrics.jsonl"
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline and not any(p.poll() is not None for p in procs):
        if metrics.exists() and metrics.read_text().strip():
            break
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)
    outputs = _finish(procs, timeout=120)
    assert [p.returncode for p in procs] == [128 + signal.SIGTERM] * 2, [err[-2000:] for _, err in outputs]
    assert "SIGTERM (sent to another process of the run)" in outputs[0][1]
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert len(records) < EPOCHS and checkpoint.complete_steps(workdir)[-1] == records[-1]["step"], records

    procs = _train_two(dataset, workdir, "--resume")
    outputs = _finish(procs, timeout=TIMEOUT)
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outputs]
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    reference = four_devices[0]["runs"]["vanilla/shard"]["history"]
    assert [r["epoch"] for r in records] == list(range(1, EPOCHS + 1))
    for key in ("train_loss", "test_loss", "step"):
        np.testing.assert_allclose([r[key] for r in records], [r[key] for r in reference], atol=TOL, rtol=0)
