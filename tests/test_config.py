"""Each setting declared once (jaxae.config), the resume rules derived from it, and the optimizer's
schedules and clipping (against real PyTorch)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxae
from jaxae import checkpoint, cli, config
from jaxae.config import NON_NEGATIVE, TrainConfig, flag_of, setting
from jaxae.errors import JaxaeError
from jaxae.loop import fit
from jaxae.train import build, learning_rate, make_optimizer


@dataclasses.dataclass(frozen=True)
class _WithOneMore(TrainConfig):
    """TrainConfig and one setting more, declared in one place."""

    decoder_dropout: float = setting(0.0, "a setting added in one place", bound=NON_NEGATIVE)


def _sub_parser(parser, command):
    return parser._subparsers._group_actions[0].choices[command]


def test_a_setting_declared_once_is_a_flag_of_train_and_sweep_validated_and_recorded(tmp_path, idx_folder, capsys):
    parser = cli.build_parser(_WithOneMore)
    for command in ("train", "sweep"):
        assert "--decoder-dropout" in _sub_parser(parser, command).format_help()
    args = parser.parse_args(["train", "--decoder-dropout", "0.25"])
    assert cli.train_config(args).decoder_dropout == 0.25
    args = parser.parse_args(["sweep", "--decoder-dropout", "0.5", "--seeds", "0,1"])
    assert [c.decoder_dropout for c in cli._sweep_configs_from_args(args)] == [0.5, 0.5]
    # validated as the config is made, in one line naming its flag
    with pytest.raises(JaxaeError, match=r"^--decoder-dropout must be >= 0, got -1"):
        _WithOneMore(decoder_dropout=-1.0)
    code = cli.main(["train", "--decoder-dropout", "-1", "--workdir", str(tmp_path / "bad")], config_class=_WithOneMore)
    assert code == 2 and "--decoder-dropout must be >= 0" in capsys.readouterr().err
    # recorded in config.json
    workdir = tmp_path / "run"
    argv = ["train", "--dataset", str(idx_folder), "--batch-size", "128", "--epochs", "1", "--decoder-dropout", "0.25"]
    assert cli.main([*argv, "--workdir", str(workdir), "--no-progress", "--no-figures"], config_class=_WithOneMore) == 0
    assert json.loads((workdir / "config.json").read_text())["decoder_dropout"] == 0.25
    assert not (workdir / "reconstructions.png").exists()  # --no-figures, shared with sweep
    # and a run of the subclass resumes with it (its checkpoint's config is read as the subclass)
    resume = [*argv[:5], "--epochs", "2", "--resume", "--workdir", str(workdir), "--no-progress", "--no-figures"]
    assert cli.main(resume, config_class=_WithOneMore) == 0, capsys.readouterr().err
    assert json.loads((workdir / "config.json").read_text())["decoder_dropout"] == 0.25
    assert [r["epoch"] for r in _records(workdir)] == [1, 2]


@dataclasses.dataclass(frozen=True)
class _WithADevicesSetting(TrainConfig):
    devices: int = setting(1, "a setting that shares its name with a fit_sweep argument", bound=NON_NEGATIVE)


def test_a_setting_named_like_an_argument_of_fit_goes_to_the_config_only():
    from jaxae.sweep import fit_sweep

    args = cli.build_parser(_WithADevicesSetting).parse_args(["sweep", "--devices", "2", "--seeds", "0,1"])
    assert "devices" not in cli._given_to(fit_sweep, args)  # it would restrict the sweep to devices=2
    assert {c.devices for c in cli._sweep_configs_from_args(args)} == {2}


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(TrainConfig)])
def test_every_setting_is_a_flag_of_train_and_sweep(field):
    parser = cli.build_parser()
    flag = flag_of(field)
    for command in ("train", "sweep"):
        assert flag in _sub_parser(parser, command)._option_string_actions, (command, flag)
    declared = config.declaration(next(f for f in dataclasses.fields(TrainConfig) if f.name == field))
    assert (field in config.SWEEPABLE) == declared.sweep
    assert (field in config.RESUME_MAY_CHANGE) == declared.may_change_on_resume


def test_python_values_a_run_cannot_use_are_one_line_errors():
    with pytest.raises(JaxaeError, match=r"--lr must be a number, got .*--lr-schedule .*fit\(tx=\.\.\.\)"):
        TrainConfig(lr=optax.cosine_decay_schedule(1e-3, 100))
    with pytest.raises(JaxaeError, match=r"--dataset must be a name, got ndarray; .*fit\(train=\.\.\."):
        TrainConfig(dataset=np.zeros((4, 28, 28, 1), np.uint8))
    with pytest.raises(JaxaeError, match="--epochs must be an integer, got 2.5"):
        TrainConfig(epochs=2.5)
    with pytest.raises(JaxaeError, match="--warmup-steps 10 is for --lr-schedule warmup_cosine"):
        TrainConfig(warmup_steps=10)
    with pytest.raises(dataclasses.FrozenInstanceError):
        TrainConfig().lr = 5.0  # a config stays as validated


# -- resuming: defining settings refused, shaping settings used and recorded ----------------------


def _train(workdir, idx_folder, *flags):
    argv = ["train", "--dataset", str(idx_folder), "--batch-size", "128", "--workdir", str(workdir)]
    return cli.main([*argv, "--no-progress", "--no-figures", *flags])


def _records(workdir):
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_resume_refuses_an_explicit_model_flag_that_differs_and_keeps_omitted_ones(tmp_path, idx_folder, capsys):
    workdir = tmp_path / "run"
    assert _train(workdir, idx_folder, "--epochs", "1", "--latent-dim", "16") == 0
    capsys.readouterr()
    code = _train(workdir, idx_folder, "--epochs", "2", "--latent-dim", "32", "--resume")
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "--latent-dim 32 (the checkpoint's is 16)" in err and "Leave that flag out" in err
    assert len(_records(workdir)) == 1  # nothing trained
    # Left out, the flag is the checkpoint's: the 16-wide model continues.
    assert _train(workdir, idx_folder, "--epochs", "2", "--resume") == 0
    assert json.loads((workdir / "config.json").read_text())["latent_dim"] == 16
    # Given with the checkpoint's own value, it is no conflict.
    assert _train(workdir, idx_folder, "--epochs", "3", "--latent-dim", "16", "--resume") == 0
    assert [r["epoch"] for r in _records(workdir)] == [1, 2, 3]


@pytest.mark.slow
def test_resume_with_a_smaller_lr_uses_it_and_records_the_change(tmp_path, idx_folder):
    workdir = tmp_path / "run"
    assert _train(workdir, idx_folder, "--epochs", "1") == 0
    assert _train(workdir, idx_folder, "--epochs", "2", "--lr", "5e-4", "--resume") == 0
    first, second = _records(workdir)
    assert first["lr"] == 1e-3 and "changed" not in first
    assert second["lr"] == 5e-4
    assert second["changed"] == {"lr": {"from": 1e-3, "to": 5e-4}}  # a longer run is no change
    assert json.loads((workdir / "config.json").read_text())["lr"] == 5e-4
    # The epoch after the resume is the one a 5e-4 optimizer takes from the epoch-1 checkpoint.
    cfg = TrainConfig(dataset=str(idx_folder), batch_size=128, epochs=2, lr=5e-4)
    trainer, template = build(cfg, (28, 28, 1))
    step1 = checkpoint.restore_state(workdir, template, step=4)
    train = jaxae.load_dataset(str(idx_folder), "train")
    expected, _ = trainer.jit_train_epoch(step1, jnp.asarray(train.images.reshape(512, -1)), batch_size=128)
    _, resumed, _ = checkpoint.restore(workdir)
    for a, b in zip(jax.tree.leaves(expected.params), jax.tree.leaves(resumed.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_resume_may_change_the_schedule_and_clipping_and_records_each_epochs_lr(tmp_path, idx_folder):
    workdir = tmp_path / "run"
    assert _train(workdir, idx_folder, "--epochs", "1") == 0
    flags = ["--epochs", "4", "--lr-schedule", "cosine", "--clip-grad-norm", "1.0", "--resume"]
    assert _train(workdir, idx_folder, *flags) == 0
    lrs = [r["lr"] for r in _records(workdir)]
    assert lrs[0] == 1e-3 and lrs[1] > lrs[2] > lrs[3] > 0
    assert lrs[3] == pytest.approx(learning_rate(TrainConfig(epochs=4, lr_schedule="cosine"), 4, 15))
    assert set(_records(workdir)[1]["changed"]) == {"lr_schedule", "clip_grad_norm"}


def test_a_resume_that_lengthens_a_cosine_schedule_records_it(tmp_path, idx_folder):
    workdir = tmp_path / "run"
    assert _train(workdir, idx_folder, "--epochs", "2", "--lr-schedule", "cosine") == 0
    assert _train(workdir, idx_folder, "--epochs", "4", "--resume") == 0
    records = _records(workdir)
    # The schedule now runs over 4 epochs: the rest of it is stretched, and the record says so.
    assert records[2]["changed"] == {"epochs": {"from": 2, "to": 4}}
    assert records[2]["lr"] == pytest.approx(learning_rate(TrainConfig(epochs=4, lr_schedule="cosine"), 4, 11))


@pytest.mark.slow
def test_a_resume_may_leave_a_warmup_schedule_without_naming_the_warmup(tmp_path, idx_folder):
    workdir = tmp_path / "run"
    assert _train(workdir, idx_folder, "--epochs", "2", "--lr-schedule", "warmup_cosine", "--warmup-steps", "2") == 0
    assert _train(workdir, idx_folder, "--epochs", "3", "--lr-schedule", "cosine", "--resume") == 0
    saved = json.loads((workdir / "config.json").read_text())
    assert (saved["lr_schedule"], saved["warmup_steps"]) == ("cosine", 0)
    assert _records(workdir)[2]["changed"]["warmup_steps"] == {"from": 2, "to": 0}


def test_a_schedule_of_fixed_length_is_not_stretched_by_a_resume_and_a_constant_lr_drops_it(tmp_path, idx_folder):
    workdir = tmp_path / "run"
    assert _train(workdir, idx_folder, "--epochs", "1", "--lr-schedule", "cosine", "--schedule-steps", "8") == 0
    assert _train(workdir, idx_folder, "--epochs", "2", "--resume") == 0
    assert "changed" not in _records(workdir)[1]  # 8 steps whatever the epochs: nothing stretched
    fixed = TrainConfig(lr_schedule="cosine", schedule_steps=8)  # its lr is that of the epoch's last step, 7 of 8
    assert _records(workdir)[1]["lr"] == pytest.approx(learning_rate(fixed, None, 7))
    assert learning_rate(fixed, None, 8) == 0.0 < learning_rate(fixed, None, 7)
    assert _train(workdir, idx_folder, "--epochs", "3", "--lr-schedule", "constant", "--resume") == 0
    saved = json.loads((workdir / "config.json").read_text())
    assert (saved["lr_schedule"], saved["schedule_steps"]) == ("constant", 0)
    assert _records(workdir)[2]["lr"] == 1e-3


@pytest.mark.slow
def test_init_from_keeps_the_input_scaling_its_weights_were_trained_on(tmp_path, idx_folder):
    assert _train(tmp_path / "seed", idx_folder, "--epochs", "1", "--normalize", "seed") == 0
    assert _train(tmp_path / "tuned", idx_folder, "--epochs", "1", "--init-from", str(tmp_path / "seed")) == 0
    assert json.loads((tmp_path / "tuned" / "config.json").read_text())["normalize"] == "seed"


@pytest.mark.slow
def test_the_same_npz_through_another_path_resumes(tmp_path, sample_train, sample_test, monkeypatch):
    np.savez(
        tmp_path / "digits.npz",
        x_train=sample_train.images[:256, :, :, 0], y_train=sample_train.labels[:256],
        x_test=sample_test.images[:64, :, :, 0], y_test=sample_test.labels[:64],
    )  # fmt: skip
    workdir = tmp_path / "run"
    assert _train(workdir, tmp_path / "digits.npz", "--epochs", "1") == 0
    monkeypatch.chdir(tmp_path)
    argv = ["train", "--dataset", "digits.npz", "--batch-size", "128", "--workdir", str(workdir), "--epochs", "2"]
    assert cli.main([*argv, "--resume", "--no-progress", "--no-figures"]) == 0
    assert [r["epoch"] for r in _records(workdir)] == [1, 2]


def test_a_warmup_as_long_as_the_run_is_one_line(tmp_path, idx_folder, capsys):
    code = _train(tmp_path / "w", idx_folder, "--epochs", "1", "--lr-schedule", "warmup_cosine", "--warmup-steps", "4")
    err = capsys.readouterr().err
    assert code == 2 and "--warmup-steps 4 is not shorter than the run (4 steps: 1 epochs of 4)" in err


def test_a_run_with_no_dataset_recorded_says_to_give_one(tmp_path):
    with pytest.raises(JaxaeError, match="no dataset given: pass --dataset"):
        fit(TrainConfig(dataset=None), tmp_path / "run", progress=False)


# -- the schedules and clipping, against optax's schedules and torch's clip_grad_norm_ -------------


def _params():
    rng = np.random.default_rng(0)
    return {"w": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32), "b": jnp.asarray(rng.normal(size=3), jnp.float32)}


def _grads(step):
    rng = np.random.default_rng(100 + step)
    return {
        "w": jnp.asarray(rng.normal(size=(5, 3)) * 3, jnp.float32),
        "b": jnp.asarray(rng.normal(size=3), jnp.float32),
    }


@pytest.mark.parametrize("schedule", ["cosine", "warmup_cosine"])
def test_a_schedule_is_optax_s_schedule_with_the_state_of_plain_adam(schedule):
    cfg = TrainConfig(epochs=2, lr=1e-2, lr_schedule=schedule, warmup_steps=3 if schedule == "warmup_cosine" else 0)
    tx = make_optimizer(cfg, steps_per_epoch=5)
    if schedule == "cosine":
        reference = optax.adam(optax.cosine_decay_schedule(1e-2, 10))
    else:
        reference = optax.adam(optax.warmup_cosine_decay_schedule(0.0, 1e-2, 3, 10, end_value=0.0))
    params = ref_params = _params()
    state, ref_state = tx.init(params), reference.init(params)
    # The same structure as the constant-lr Adam: a resumed run may switch schedules.
    plain = optax.adam(1e-3).init(params)
    assert jax.tree.structure(state) == jax.tree.structure(plain)
    for step in range(10):
        updates, state = tx.update(_grads(step), state, params)
        params = optax.apply_updates(params, updates)
        ref_updates, ref_state = reference.update(_grads(step), ref_state, ref_params)
        ref_params = optax.apply_updates(ref_params, ref_updates)
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_clipping_and_a_schedule_take_torch_s_steps(optimizer):
    torch = pytest.importorskip("torch")
    cfg = TrainConfig(
        epochs=1, lr=1e-2, optimizer=optimizer, weight_decay=0.1, lr_schedule="cosine", clip_grad_norm=0.5
    )
    steps = 6
    tx = make_optimizer(cfg, steps_per_epoch=steps)
    params = _params()
    state = tx.init(params)
    t_params = {k: torch.nn.Parameter(torch.tensor(np.asarray(v))) for k, v in params.items()}
    cls = torch.optim.AdamW if optimizer == "adamw" else torch.optim.Adam
    opt = cls(list(t_params.values()), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: float(optax.cosine_decay_schedule(1.0, steps)(s)))
    for step in range(steps):
        grads = _grads(step)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        for k, p in t_params.items():
            p.grad = torch.tensor(np.asarray(grads[k]))
        torch.nn.utils.clip_grad_norm_(list(t_params.values()), 0.5)
        opt.step()
        sched.step()
        for k in params:
            np.testing.assert_allclose(np.asarray(params[k]), t_params[k].detach().numpy(), rtol=2e-5, atol=1e-6)


def test_a_schedule_without_the_runs_length_says_so_when_it_steps():
    cfg = TrainConfig(lr_schedule="cosine")
    tx = make_optimizer(cfg)  # a state can be made (evaluate and export need no steps)
    state = tx.init(_params())
    with pytest.raises(JaxaeError, match="runs over the run's steps"):
        tx.update(_grads(0), state, _params())


def test_the_module_a_state_was_built_from_still_works_after_a_donating_step():
    from flax import nnx

    model = jaxae.Autoencoder((28, 28, 1), (16,), 4, rngs=nnx.Rngs(params=0))
    trainer, state = jaxae.create_train_state(model, optax.adam(1e-3))
    x = jnp.zeros((8, 28, 28, 1), jnp.uint8)
    before = np.asarray(model(jnp.zeros((2, 784))))
    state, _ = trainer.jit_train_step(state, x)
    np.testing.assert_array_equal(np.asarray(model(jnp.zeros((2, 784)))), before)  # not "Array has been deleted"


def _torch_continuation(torch, path, steps):
    """The lr of each of torch's next ``steps`` optimizer steps after loading an exported run's
    model, optimizer and scheduler as the export's note says."""
    from jaxae import torch_reference

    back = torch.load(path, weights_only=True)
    model = torch_reference.MLPAutoencoder(784, (128, 64), 32)
    model.load_state_dict(back["model_state_dict"])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    opt.load_state_dict(back["optimizer_state_dict"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=back["scheduler_state_dict"]["T_max"])
    sched.load_state_dict(back["scheduler_state_dict"])
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()  # no gradients: the parameters stay, the step is counted
        sched.step()
    return lrs


@pytest.mark.parametrize("schedule", ["cosine", "warmup_cosine"])
def test_export_of_a_scheduled_run_carries_its_schedule_as_torch_s_cosine_annealing(
    tmp_path, idx_folder, capsys, schedule
):
    torch = pytest.importorskip("torch")
    workdir = tmp_path / "run"
    warmup = ["--warmup-steps", "3"] if schedule == "warmup_cosine" else []
    # 512 images in batches of 128: 4 steps an epoch, 12 in the run; one epoch done.
    assert (
        _train(workdir, idx_folder, "--epochs", "3", "--lr-schedule", schedule, *warmup, "--clip-grad-norm", "2") == 0
    )
    # stopped after one epoch (the checkpoint of step 4): rewrite it as a run at epoch 1 of 3
    cfg = TrainConfig(epochs=3, lr_schedule=schedule, warmup_steps=3 if warmup else 0)
    capsys.readouterr()
    out = tmp_path / "run.pt"
    assert cli.main(["export", "--workdir", str(workdir), "--out", str(out), "--with-optimizer", "--step", "4"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "CosineAnnealingLR(optimizer, T_max=" in summary["notes"][0]
    assert "clip_grad_norm_(model.parameters(), 2)" in summary["notes"][1]
    # torch's scheduler continues the run's schedule: every later step's lr is jaxae's, to rounding
    # (jaxae's schedule is float32 math: 1e-7 of the peak lr, 1e-3 = 1e-10)
    expected = [learning_rate(cfg, 4, step) for step in range(4, 12)]
    np.testing.assert_allclose(_torch_continuation(torch, out, 8), expected, rtol=1e-6, atol=1e-10)


def test_export_of_a_run_in_its_warmup_with_its_optimizer_is_one_line(tmp_path, idx_folder, capsys):
    pytest.importorskip("torch")
    workdir = tmp_path / "run"
    assert _train(workdir, idx_folder, "--epochs", "2", "--lr-schedule", "warmup_cosine", "--warmup-steps", "6") == 0
    capsys.readouterr()
    argv = ["export", "--workdir", str(workdir), "--out", str(tmp_path / "w.pt"), "--with-optimizer", "--step", "4"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "is in its warm-up (update 4 of --warmup-steps 6)" in err and len(err.strip().splitlines()) == 1
    assert cli.main(argv[:-3] + ["--step", "4"]) == 0  # the weights alone


def test_evaluate_and_export_read_a_run_of_another_optax_chain_without_its_optimizer(tmp_path, idx_folder, capsys):
    workdir = tmp_path / "sgd"
    cfg = TrainConfig(dataset=str(idx_folder), batch_size=128, epochs=1)
    trained = fit(cfg, workdir, tx=optax.sgd(0.1, momentum=0.9), progress=False)
    sgd_state = optax.sgd(0.1, momentum=0.9).init(trained.state.params)
    assert jax.tree.structure(trained.state.opt_state) == jax.tree.structure(sgd_state)  # it trained with SGD
    assert cli.main(["evaluate", "--workdir", str(workdir)]) == 0  # before: "another optimizer than the one given"
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluated["test_loss"] == pytest.approx(trained.history[-1]["test_loss"], rel=1e-6)
    assert cli.main(["export", "--workdir", str(workdir), "--out", str(tmp_path / "w.safetensors")]) == 0
    code = cli.main(["export", "--workdir", str(workdir), "--out", str(tmp_path / "o.pt"), "--with-optimizer"])
    assert code == 2 and "another optimizer" in capsys.readouterr().err  # that one needs the optimizer's state


def test_another_hosts_signal_does_not_make_this_hosts_first_signal_its_second(monkeypatch):
    import os
    import signal as signals

    from jax.experimental import multihost_utils

    from jaxae import rundir

    killed = []
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(multihost_utils, "process_allgather", lambda x: np.array([0, signals.SIGTERM]))
    monkeypatch.setattr(os, "kill", lambda pid, sig: killed.append(sig))
    stop = rundir.StopOnSignal()
    assert stop.agreed() == signals.SIGTERM and stop.from_another_process
    stop._handle(signals.SIGTERM, None)  # this host's own first SIGTERM: finish the epoch and save
    assert killed == [] and stop.signum == signals.SIGTERM
    stop._handle(signals.SIGTERM, None)  # its second one stops it at once
    assert killed == [signals.SIGTERM]
    stop.__exit__()
    signals.signal(signals.SIGTERM, signals.SIG_DFL)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("hidden_dims", (128, 0), "--hidden-dims must be positive integers like 128,64, got (128, 0)"),
        ("hidden_dims", (), "--hidden-dims must be positive integers like 128,64, got ()"),
        ("conv_channels", (16, -1), "--conv-channels must be positive integers like 16,32,64, got (16, -1)"),
        ("conv_channels", (16.5,), "--conv-channels must be positive integers like 16,32,64, got (16.5,)"),
    ],
)
def test_a_tuple_of_widths_from_the_library_is_checked_in_one_line(field, value, message):
    with pytest.raises(JaxaeError) as e:
        TrainConfig(**{field: value})
    assert str(e.value) == message
