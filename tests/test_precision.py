"""Precision as a setting (``--dtype``, ``--matmul-precision``) and a run you can watch
(TensorBoard events, ``--profile``, compile time and peak memory in the records)."""

import json
import struct
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxae import cli, fit, models
from jaxae.config import TrainConfig
from jaxae.errors import JaxaeError
from jaxae.loop import evaluate_run
from jaxae.train import build

# one run of each model class (the other variants build these same classes)
MODELS = [("vanilla", "mlp"), ("vae", "mlp"), ("vanilla", "conv"), ("vae", "conv")]


def _dtypes_in(jaxpr_text: str) -> set[str]:
    return {d for d in ("bf16", "f32") if f":{d}[" in jaxpr_text or f"{d}[" in jaxpr_text}


def _step_and_batch(config, shape=(28, 28, 1)):
    trainer, state = build(config, shape)
    batch = jnp.asarray(np.random.default_rng(0).integers(0, 256, (8, int(np.prod(shape))), dtype=np.uint8))
    return trainer, state, batch


def test_the_settings_are_declared_checked_and_written_to_config_json():
    config = TrainConfig(dtype="bfloat16", matmul_precision="highest")
    assert config.to_dict()["dtype"] == "bfloat16" and config.to_dict()["matmul_precision"] == "highest"
    assert TrainConfig.from_dict(config.to_dict()) == config
    # a config written before the settings existed reads as float32 at the backend's default
    old = {k: v for k, v in TrainConfig().to_dict().items() if k not in ("dtype", "matmul_precision")}
    assert (TrainConfig.from_dict(old).dtype, TrainConfig.from_dict(old).matmul_precision) == ("float32", "default")
    with pytest.raises(JaxaeError, match=r"^unknown --dtype 'float16'; choose float32 or bfloat16$"):
        TrainConfig(dtype="float16")
    with pytest.raises(JaxaeError, match=r"^unknown --matmul-precision 'tf32'; choose default or high or highest$"):
        TrainConfig(matmul_precision="tf32")
    for command in ("train", "sweep"):
        args = cli.build_parser().parse_args([command, "--dtype", "bfloat16", "--matmul-precision", "high"])
        assert (args.dtype, args.matmul_precision) == ("bfloat16", "high")


@pytest.mark.parametrize(("variant", "arch"), MODELS)
def test_bfloat16_computes_in_bfloat16_and_keeps_parameters_state_and_loss_float32(variant, arch):
    fp32 = TrainConfig(variant=variant, arch=arch)
    bf16 = TrainConfig(variant=variant, arch=arch, dtype="bfloat16")
    trainer, state, batch = _step_and_batch(bf16)
    step = jax.make_jaxpr(trainer.train_step)(state, batch)
    assert "bf16" in _dtypes_in(str(step)), "no bfloat16 computation in the step"
    new_state, metrics = jax.jit(trainer.train_step)(state, batch)
    for leaf in jax.tree.leaves((new_state.params, new_state.opt_state)):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            assert leaf.dtype == jnp.float32
    assert metrics["loss"].dtype == jnp.float32
    # the same parameters give the float32 loss to bfloat16's rounding
    trainer32, state32, _ = _step_and_batch(fp32)
    _, metrics32 = jax.jit(trainer32.train_step)(state32, batch)
    assert float(metrics["loss"]) == pytest.approx(float(metrics32["loss"]), rel=3e-2)
    # and the float32 step holds no bfloat16 at all: its numbers are those of before the setting
    assert "bf16" not in _dtypes_in(str(jax.make_jaxpr(trainer32.train_step)(state32, batch)))


@pytest.mark.slow
def test_every_model_takes_dtype_and_param_dtype_as_flax_modules_do():
    rngs = nnx.Rngs(0)
    x = jnp.ones((2, 28, 28, 1))
    for cls in (models.Autoencoder, models.VAE, models.ConvAutoencoder, models.ConvVAE):
        model = cls(dtype=jnp.bfloat16, param_dtype=jnp.float32, rngs=rngs)
        assert model(x).dtype == jnp.float32  # the output is the loss's: float32
        assert {p.dtype for p in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype("float32")}
    with pytest.raises(JaxaeError, match=r"^dtype must be a floating-point dtype such as float32 or bfloat16"):
        models.ConvVAE(dtype=jnp.int8, rngs=rngs)


@pytest.mark.parametrize("precision", ["default", "high", "highest"])
def test_the_matmul_precision_reaches_every_product_of_the_step_and_the_evaluation(precision):
    trainer, state, batch = _step_and_batch(TrainConfig(arch="conv", matmul_precision=precision))
    images = jnp.concatenate([batch] * 2)
    for text in (
        trainer.jit_train_step.lower(state, batch).as_text(),
        trainer.jit_evaluate.lower(state, images, batch_size=8).as_text(),
    ):
        products = [
            line for line in text.splitlines() if "stablehlo.dot_general" in line or "stablehlo.convolution" in line
        ]
        assert len(products) > 2
        for line in products:
            if precision == "default":
                assert "HIGH" not in line, line
            else:
                assert f"precision = [{precision.upper()}, {precision.upper()}]" in line, line


@pytest.mark.slow
def test_a_bfloat16_conv_vae_trains_and_records_its_precision(tmp_path, idx_folder, capsys):
    workdir = tmp_path / "run"
    code = cli.main(
        ["train", "--dataset", str(idx_folder), "--variant", "vae", "--arch", "conv", "--epochs", "2"]
        + ["--batch-size", "64", "--dtype", "bfloat16", "--matmul-precision", "highest", "--workdir", str(workdir)]
        + ["--no-progress", "--no-figures"]
    )
    out = capsys.readouterr()
    assert code == 0, out.err
    config = json.loads((workdir / "config.json").read_text())
    assert (config["dtype"], config["matmul_precision"]) == ("bfloat16", "highest")
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["test_loss"]) for r in records) and records[-1]["train_loss"] < records[0]["train_loss"]
    final = json.loads(out.out.strip().splitlines()[-1])
    assert final["compile_seconds"] > 0 and final["peak_host_bytes"] > 2**20

    # evaluate at the run's precision, or at another one given: the numbers move by bf16's rounding only
    same = evaluate_run(workdir)
    assert (same["dtype"], same["matmul_precision"]) == ("bfloat16", "highest")
    assert same["test_loss"] == pytest.approx(records[-1]["test_loss"], rel=1e-6)
    fp32 = evaluate_run(workdir, dtype="float32")
    assert fp32["dtype"] == "float32" and fp32["test_loss"] == pytest.approx(same["test_loss"], rel=2e-2)
    with pytest.raises(JaxaeError, match="unknown --dtype 'half'"):
        evaluate_run(workdir, dtype="half")


@pytest.mark.slow
def test_a_resume_may_change_the_precision_and_records_it(tmp_path, idx_folder, capsys):
    workdir = str(tmp_path / "run")
    base = ["train", "--dataset", str(idx_folder), "--batch-size", "128", "--workdir", workdir]
    base += ["--no-progress", "--no-figures"]
    assert cli.main([*base, "--epochs", "1"]) == 0
    assert cli.main([*base, "--epochs", "2", "--resume", "--dtype", "bfloat16"]) == 0, capsys.readouterr().err
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[1]["changed"] == {"dtype": {"from": "float32", "to": "bfloat16"}}
    assert json.loads((tmp_path / "run" / "config.json").read_text())["dtype"] == "bfloat16"


def test_a_model_of_your_own_with_a_bfloat16_config_is_one_line(tmp_path):
    own = models.Autoencoder(rngs=nnx.Rngs(0))
    images = np.zeros((64, 28, 28, 1), np.uint8)
    with pytest.raises(JaxaeError, match="a model of your own computes in the dtype it was built with"):
        fit(
            TrainConfig(dtype="bfloat16", epochs=1),
            model=own,
            tx=optax.adam(1e-3),
            train=(images, None),
            test=(images, None),
        )


# -- watching a run ----------------------------------------------------------------------------


def read_events(path: Path) -> list:
    """The ``Event`` protobufs of one TensorBoard event file. It is TFRecord: each record is its
    length (uint64), a CRC (uint32), the ``Event`` and another CRC."""
    from tensorboardX.proto import event_pb2

    data, i, events = path.read_bytes(), 0, []
    while i < len(data):
        (n,) = struct.unpack("<Q", data[i : i + 8])
        events.append(event_pb2.Event.FromString(data[i + 12 : i + 12 + n]))
        i += 12 + n + 4
    return events


def read_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the event files in ``folder``: ``{tag: [(step, value), ...]}``."""
    out: dict[str, list[tuple[int, float]]] = {}
    files = sorted(folder.glob("events.out.tfevents.*"))
    assert files, f"no event files in {folder}"
    for path in files:
        for event in read_events(path):
            for value in event.summary.value:
                out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


def test_the_workdir_holds_tensorboard_events_of_every_record_and_profile_leaves_a_trace(tmp_path, idx_folder):
    workdir, trace = tmp_path / "run", tmp_path / "trace"
    code = cli.main(
        ["train", "--dataset", str(idx_folder), "--epochs", "3", "--batch-size", "128", "--workdir", str(workdir)]
        + ["--no-progress", "--no-figures", "--profile", str(trace)]
    )
    assert code == 0
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    scalars = read_scalars(workdir / "events")
    for tag in ("test_loss", "train_loss", "lr", "samples_per_s"):
        assert scalars[tag] == [(r["step"], pytest.approx(r[tag], rel=1e-6)) for r in records], tag
    assert "compile_seconds" in records[0] and all("compile_seconds" not in r for r in records[1:])
    assert all(r["peak_host_bytes"] > 2**20 for r in records)
    assert list(trace.glob("plugins/profile/*/*.xplane.pb")), "no xplane trace"

    # --no-events writes none
    other = tmp_path / "quiet"
    args = ["train", "--dataset", str(idx_folder), "--epochs", "1", "--batch-size", "128", "--workdir", str(other)]
    assert cli.main([*args, "--no-progress", "--no-figures", "--no-events"]) == 0
    assert not (other / "events").exists()


def test_a_resumed_run_hides_the_events_past_its_checkpoint(tmp_path, idx_folder):
    from tensorboardX.proto import event_pb2

    workdir = str(tmp_path / "run")
    base = ["train", "--dataset", str(idx_folder), "--batch-size", "128", "--workdir", workdir]
    base += ["--no-progress", "--no-figures"]
    assert cli.main([*base, "--epochs", "2"]) == 0
    assert cli.main([*base, "--epochs", "3", "--resume"]) == 0
    first, resumed = (read_events(p) for p in sorted((tmp_path / "run" / "events").glob("events.out.tfevents.*")))
    # the resumed writer marks a restart at the step after its checkpoint's (2 epochs of 4 steps):
    # TensorBoard then hides what the first process wrote from that step on; a fresh run marks none
    starts = [
        e.step for e in resumed if e.HasField("session_log") and e.session_log.status == event_pb2.SessionLog.START
    ]
    assert starts == [2 * 4 + 1]
    assert not [e for e in first if e.HasField("session_log")]
    assert [e.step for e in resumed if e.summary.value and e.summary.value[0].tag == "test_loss"] == [12]
