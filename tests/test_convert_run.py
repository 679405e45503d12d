"""Moving a whole PyTorch run to jaxae and back: checkpoint formats, prefixes, renames, inferred
sizes, and Adam/AdamW state, proven against real torch (the files are written here by torch).

The parity tests run both frameworks from the same migrated state over the same batches: one
step (loss within 1e-6 relative, weights within 1e-5) and 50 steps (per-step losses within
1e-5 relative), for Adam with non-default betas and eps, Adam with L2 weight decay, and AdamW.
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxae
from jaxae import checkpoint, cli, convert, torch_reference
from jaxae.data import NORMALIZATIONS
from jaxae.train import TrainConfig, build

torch = pytest.importorskip("torch")

BATCH = 32
# A 784-64-32-16 model: not the document's sizes, so every test also exercises inference.
HIDDEN, LATENT = (64, 32), 16


@pytest.fixture(autouse=True)
def fp32():
    torch.set_default_dtype(torch.float32)
    with jax.default_matmul_precision("highest"):
        yield


@pytest.fixture(scope="module")
def batches(sample_train):
    """60 fixed uint8 batches [32, 784] and their normalised float32 copies."""
    rng = np.random.default_rng(0)
    ids = rng.permutation(len(sample_train))[: 60 * BATCH].reshape(60, BATCH)
    u8 = sample_train.images.reshape(len(sample_train), -1)[ids]
    return u8, NORMALIZATIONS["unit"].table[u8]


def torch_model(seed=0):
    torch.manual_seed(seed)
    return torch_reference.MLPAutoencoder(784, HIDDEN, LATENT)


OPTIMIZERS = {
    "adam-betas-eps": (lambda p: torch.optim.Adam(p, lr=2e-3, betas=(0.8, 0.95), eps=1e-6), "adam"),
    "adam-l2": (lambda p: torch.optim.Adam(p, lr=1e-3, betas=(0.85, 0.99), eps=1e-7, weight_decay=0.05), "adam"),
    "adamw": (lambda p: torch.optim.AdamW(p, lr=1e-3, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.1), "adamw"),
}


def torch_step(model, opt, x):
    opt.zero_grad()
    loss = torch.mean(torch.square(model(x) - x))
    loss.backward()
    opt.step()
    return loss.item()


def torch_run(batches, make_opt, steps=5):
    """A PyTorch run of ``steps`` steps: the model, its optimizer, the per-step losses."""
    model = torch_model()
    opt = make_opt(model.parameters())
    x = torch.from_numpy(batches[1])
    losses = [torch_step(model, opt, x[i]) for i in range(steps)]
    return model, opt, losses


def general_checkpoint(model, opt, epoch=2):
    return {
        "epoch": epoch,
        "model_state_dict": model.state_dict(),
        "optimizer_state_dict": opt.state_dict(),
        "loss": 0.1,
    }


def convert_cli(capsys, source, out, *flags):
    code = cli.main(["convert", str(source), "--out", str(out), *flags])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def one_line_error(capsys, code, pattern):
    captured = capsys.readouterr()
    assert code == 2, captured
    err = captured.err.strip()
    assert err.startswith("jaxae: error: ") and "\n" not in err and pattern in err, err
    return err


# --- reading what PyTorch users save --------------------------------------------------------------


def test_every_container_and_prefix_reads_as_the_same_model(tmp_path, batches):
    model, opt, _ = torch_run(batches, OPTIMIZERS["adam-betas-eps"][0], steps=2)
    sd = model.state_dict()
    x = batches[1][0]
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    lightning = {  # the layout of a Lightning .ckpt, as the plain dict it is
        "epoch": 0,
        "global_step": 2,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": {f"model.{k}": v for k, v in sd.items()},
        "optimizer_states": [opt.state_dict()],
        "lr_schedulers": [],
        "loops": {"fit_loop": {"epoch_progress": {"current": {"completed": 1}}}},
    }
    sources = {
        "bare": (dict(sd), ""),
        "general": (general_checkpoint(model, opt), ""),
        "model/optimizer": ({"model": sd, "optimizer": opt.state_dict(), "epoch": 1}, ""),
        "state_dict/optimizer": ({"state_dict": sd, "optimizer": opt.state_dict()}, ""),
        "ddp": ({f"module.{k}": v for k, v in sd.items()}, "module."),
        "compiled ddp": ({f"module._orig_mod.{k}": v for k, v in sd.items()}, "module._orig_mod."),
        "lightning": (lightning, "model."),
    }
    for name, (obj, stripped) in sources.items():
        path = tmp_path / f"{name.replace('/', '-').replace(' ', '-')}.pt"
        torch.save(obj, path)
        found = convert.match(path)
        assert found.stripped == stripped, name
        assert (found.config.hidden_dims, found.config.latent_dim, found.config.variant) == (HIDDEN, LATENT, "vanilla")
        out = np.asarray(convert.model_from_match(found)(jnp.asarray(x)))
        np.testing.assert_allclose(out, expected, atol=1e-6, err_msg=name)
    ckpt = convert.read_torch_file(tmp_path / "lightning.pt")
    assert (ckpt.container, ckpt.epoch, ckpt.step) == ("a Lightning checkpoint", 1, 2)
    assert ckpt.optimizer is not None
    convert.save_state_dict({k: v.numpy() for k, v in sd.items()}, tmp_path / "m.safetensors", "safetensors")
    assert convert.match(tmp_path / "m.safetensors").config.hidden_dims == HIDDEN


def test_inference_reads_family_arch_and_sizes_and_checks_given_flags():
    vae = torch_reference.MLPVAE(784, (96, 48), 12).state_dict()
    found = convert.match(vae)
    assert (found.config.variant, found.config.arch, found.config.hidden_dims, found.config.latent_dim) == (
        "vae",
        "mlp",
        (96, 48),
        12,
    )
    conv = convert.match(torch_reference.ConvVAE(latent_dim=8).state_dict())
    assert (conv.config.variant, conv.config.arch, conv.config.latent_dim, conv.input_dim) == ("vae", "conv", 8, 784)
    ae = convert.match(torch_model().state_dict())
    assert ae.config.variant == "vanilla" and "linear code" in ae.notes[0]
    # given settings are checked against the tensors
    with pytest.raises(jaxae.JaxaeError, match=r"--latent-dim 32 does not match .*give --latent-dim 16"):
        convert.match(torch_model().state_dict(), latent_dim=32)
    with pytest.raises(jaxae.JaxaeError, match=r"--arch conv does not match"):
        convert.match(torch_model().state_dict(), arch="conv")
    with pytest.raises(jaxae.JaxaeError, match=r"the file holds an MLP VAE's weights: give --variant vae --arch mlp"):
        convert.match(vae, variant="denoising")
    # the Python API takes the same settings as keywords
    model = jaxae.from_torch(torch_model().state_dict(), variant="denoising", hidden_dims=HIDDEN, latent_dim=LATENT)
    assert isinstance(model, jaxae.Autoencoder)


def test_other_layer_names_get_a_rename_line_that_works(tmp_path, capsys, batches):
    model = torch_model()
    names = {"encoder.0": "fc1", "encoder.2": "fc2", "encoder.4": "fc3", "decoder.0": "fc4"}
    names.update({"decoder.2": "fc5", "decoder.4": "fc6"})
    sd = {f"{names[k.rsplit('.', 1)[0]]}.{k.rsplit('.', 1)[1]}": v for k, v in model.state_dict().items()}
    torch.save(sd, tmp_path / "fc.pt")
    code = cli.main(["convert", str(tmp_path / "fc.pt"), "--out", str(tmp_path / "out")])
    err = one_line_error(capsys, code, "matches no layout jaxae converts (its keys: fc1.weight [64, 784], ")
    assert not (tmp_path / "out").exists()
    flags = err[err.index("--rename") :].split()
    assert flags[:2] == ["--rename", "fc1.=encoder.0."] and flags[-1] == "fc6.=decoder.4."
    summary = convert_cli(capsys, tmp_path / "fc.pt", tmp_path / "out", *flags, "--check")
    assert summary["passed"] and summary["inferred"] == {"arch": "mlp", "latent_dim": 16, "hidden_dims": [64, 32]}
    # the same in Python
    rename = dict(flag.split("=") for flag in flags[1::2])
    jax_model = jaxae.from_torch(tmp_path / "fc.pt", rename=rename)
    x = batches[1][0]
    with torch.no_grad():
        np.testing.assert_allclose(jax_model(jnp.asarray(x)), model(torch.from_numpy(x)).numpy(), atol=1e-6)
    code = cli.main(["convert", str(tmp_path / "fc.pt"), "--out", str(tmp_path / "o2"), "--rename", "fc9.=encoder.0."])
    one_line_error(capsys, code, "no key of")
    code = cli.main(["convert", str(tmp_path / "fc.pt"), "--out", str(tmp_path / "o2"), "--rename", "fc1"])
    one_line_error(capsys, code, "give OLD=NEW")
    assert not (tmp_path / "o2").exists()


# --- the optimizer: parity with torch -------------------------------------------------------------


def _migrate(tmp_path, capsys, model, opt):
    torch.save(general_checkpoint(model, opt), tmp_path / "run.pt")
    summary = convert_cli(capsys, tmp_path / "run.pt", tmp_path / "jax")
    return summary, *checkpoint.restore(tmp_path / "jax")


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_next_step_and_50_steps_match_torch(name, tmp_path, capsys, batches):
    make_opt, optimizer = OPTIMIZERS[name]
    model, opt, _ = torch_run(batches, make_opt, steps=5)
    summary, trainer, state, config = _migrate(tmp_path, capsys, model, opt)
    group = opt.state_dict()["param_groups"][0]
    assert summary["optimizer"]["step"] == 5 and summary["epoch"] == 2 and summary["step"] == 5
    assert (config.optimizer, config.lr, config.betas, config.eps, config.weight_decay) == (
        optimizer,
        group["lr"],
        tuple(group["betas"]),
        group["eps"],
        group["weight_decay"],
    )
    assert (int(state.step), int(state.epoch), config.hidden_dims, config.latent_dim) == (5, 2, HIDDEN, LATENT)

    u8, x = batches
    x_t = torch.from_numpy(x)
    step = jax.jit(trainer.train_step)
    jax_losses, torch_losses = [], []
    for i in range(5, 55):
        state, metrics = step(state, jnp.asarray(u8[i]))
        jax_losses.append(float(metrics["loss"]))
        torch_losses.append(torch_step(model, opt, x_t[i]))
        if i == 5:  # the first step from the migrated state
            assert jax_losses[0] == pytest.approx(torch_losses[0], rel=1e-6)
            got = convert.to_numpy_state_dict(state.params)
            for key, value in model.state_dict().items():
                np.testing.assert_allclose(got[key], value.numpy(), rtol=0, atol=1e-5, err_msg=key)
    np.testing.assert_allclose(jax_losses, torch_losses, rtol=1e-5)


@pytest.mark.parametrize("name", ["adam-l2", "adamw"])
def test_round_trip_torch_jaxae_torch_is_bit_exact(name, tmp_path, capsys, batches):
    make_opt, _ = OPTIMIZERS[name]
    model, opt, _ = torch_run(batches, make_opt, steps=3)
    _migrate(tmp_path, capsys, model, opt)
    code = cli.main(
        ["export", "--workdir", str(tmp_path / "jax"), "--out", str(tmp_path / "back.pt"), "--with-optimizer"]
    )
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and summary["epoch"] == 2
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    assert back["epoch"] == 2 and back["global_step"] == 3
    for key, value in model.state_dict().items():
        assert torch.equal(back["model_state_dict"][key], value), key
    sent, got = opt.state_dict(), back["optimizer_state_dict"]
    assert got["param_groups"] == sent["param_groups"]
    assert sorted(got["state"]) == sorted(sent["state"])
    for i, entry in sent["state"].items():
        for field in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(got["state"][i][field], entry[field]), (i, field)
    # and torch takes it as it is: a fresh model and optimizer load it and step on
    fresh = torch_model(seed=1)
    fresh.load_state_dict(back["model_state_dict"], strict=True)
    fresh_opt = make_opt(fresh.parameters())
    fresh_opt.load_state_dict(back["optimizer_state_dict"])
    x = torch.from_numpy(batches[1][9])
    assert torch_step(fresh, fresh_opt, x) == torch_step(model, opt, x)


@pytest.mark.slow
def test_cli_resume_continues_the_pytorch_run(tmp_path, capsys, batches):
    model, opt, _ = torch_run(batches, OPTIMIZERS["adamw"][0], steps=4)
    torch.save(general_checkpoint(model, opt, epoch=1), tmp_path / "run.pt")
    convert_cli(capsys, tmp_path / "run.pt", tmp_path / "jax")
    argv = ["train", "--workdir", str(tmp_path / "jax"), "--resume", "--epochs", "2", "--no-progress"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    capsys.readouterr()
    _, state, config = checkpoint.restore(tmp_path / "jax")
    # one more epoch of the 4,000-digit sample in batches of 256: 16 steps after torch's 4
    assert (int(state.epoch), int(state.step), config.optimizer, config.hidden_dims) == (2, 20, "adamw", HIDDEN)
    assert optax_count(state.opt_state) == 20
    # --init-from takes the sizes from the converted folder too
    argv = ["train", "--workdir", str(tmp_path / "tuned"), "--init-from", str(tmp_path / "jax"), "--epochs", "1"]
    assert cli.main([*argv, "--no-progress"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert checkpoint.restore(tmp_path / "tuned")[2].hidden_dims == HIDDEN


def optax_count(opt_state):
    import optax

    return int(optax.tree_utils.tree_get(opt_state, "count"))


# --- the parameter order of the file: kept both ways -----------------------------------------------


class _DecoderFirst(torch.nn.Module):
    """The document's layers and keys, the decoder registered first: its parameters() start with the decoder."""

    def __init__(self, hidden=(128, 64), latent=32):
        super().__init__()
        twin = torch_reference.MLPAutoencoder(784, hidden, latent)
        self.decoder, self.encoder = twin.decoder, twin.encoder

    def forward(self, x):
        return self.decoder(self.encoder(x))


def _decoder_first_groups(model):
    return [{"params": model.decoder.parameters()}, {"params": model.encoder.parameters()}]


def _named_reversed(model):
    return list(reversed(list(model.named_parameters())))


PARAMETER_ORDERS = {
    # (the module, the parameters an optimizer is built from)
    "decoder-registered-first": (_DecoderFirst, lambda m: m.parameters()),
    "decoder-registered-first-equal-shapes": (lambda: _DecoderFirst((64, 64), 64), lambda m: m.parameters()),
    "decoder-first-param-groups": (lambda: torch_model(), _decoder_first_groups),
    "named-parameters-reversed": (lambda: torch_model(), _named_reversed),
}


@pytest.mark.parametrize("name", sorted(PARAMETER_ORDERS))
def test_any_parameter_order_goes_to_jaxae_and_back_exactly(name, tmp_path, capsys, batches):
    make_model, parameters = PARAMETER_ORDERS[name]
    torch.manual_seed(0)
    model = make_model()
    opt = torch.optim.Adam(parameters(model), lr=1e-3)
    x = torch.from_numpy(batches[1])
    for i in range(3):
        torch_step(model, opt, x[i])
    torch.save(general_checkpoint(model, opt), tmp_path / "run.pt")
    convert_cli(capsys, tmp_path / "run.pt", tmp_path / "jax")
    # jaxae's moments are those torch holds for each named parameter
    _, state, _ = checkpoint.restore(tmp_path / "jax")
    by_param = {id(p): name for name, p in model.named_parameters()}
    sent = opt.state_dict()
    flat = [p for group in opt.param_groups for p in group["params"]]
    mu = convert.to_numpy_state_dict(optax.tree_utils.tree_get(state.opt_state, "mu"))
    for index, param in enumerate(flat):
        np.testing.assert_array_equal(mu[by_param[id(param)]], sent["state"][index]["exp_avg"].numpy())
    code = cli.main(
        ["export", "--workdir", str(tmp_path / "jax"), "--out", str(tmp_path / "back.pt"), "--with-optimizer"]
    )
    assert code == 0, capsys.readouterr()
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    assert list(back["model_state_dict"]) == list(model.state_dict())
    got = back["optimizer_state_dict"]
    assert got["param_groups"] == sent["param_groups"]
    for i, entry in sent["state"].items():
        for field in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(got["state"][i][field], entry[field]), (i, field)
    # a fresh model and optimizer built the same way load it and take the next step torch takes
    torch.manual_seed(1)
    fresh = make_model()
    fresh.load_state_dict(back["model_state_dict"], strict=True)
    fresh_opt = torch.optim.Adam(parameters(fresh), lr=1e-3)
    fresh_opt.load_state_dict(got)
    assert torch_step(fresh, fresh_opt, x[3]) == torch_step(model, opt, x[3])
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


@pytest.mark.parametrize("damage", ["not json", '{"state_dict_keys": ["encoder.0.weight"], "optimizer_groups": []}'])
def test_export_refuses_a_damaged_parameter_order_record(tmp_path, capsys, damage):
    torch.save(torch_model().state_dict(), tmp_path / "m.pt")
    convert_cli(capsys, tmp_path / "m.pt", tmp_path / "jax")
    (tmp_path / "jax" / convert.TORCH_LAYOUT_FILE).write_text(damage)
    code = cli.main(["export", "--workdir", str(tmp_path / "jax"), "--out", str(tmp_path / "back.pt")])
    one_line_error(capsys, code, "torch_layout.json")
    assert not (tmp_path / "back.pt").exists()


def test_parameter_groups_whose_shapes_fit_two_orders_are_refused(tmp_path, capsys):
    torch.manual_seed(0)
    model = torch_reference.MLPAutoencoder(784, (64,), 64)  # encoder.2 and decoder.0 are both 64x64
    groups = [model.encoder[2], model.decoder[0], model.encoder[0], model.decoder[2]]
    opt = torch.optim.Adam([{"params": m.parameters()} for m in groups])
    torch_step(model, opt, torch.rand(4, 784))
    torch.save(general_checkpoint(model, opt), tmp_path / "run.pt")
    code = cli.main(["convert", str(tmp_path / "run.pt"), "--out", str(tmp_path / "out")])
    one_line_error(capsys, code, "4 parameter groups fit the model's parameters in more than one order")
    assert not (tmp_path / "out").exists()


# --- refused: one line, exit 2, nothing written ---------------------------------------------------


def _saved(obj):
    return lambda p: torch.save(obj, p)


def _opt_state(make_opt, steps=1, model=None):
    model = model or torch_model()
    opt = make_opt(model.parameters())
    x = torch.rand(4, 784)
    for _ in range(steps):
        torch_step(model, opt, x)
    return model, opt


def _with(make_opt, **changes):
    model, opt = _opt_state(make_opt)
    ckpt = general_checkpoint(model, opt)
    ckpt.update(changes)
    return ckpt


def _other_model_optimizer():
    model, _ = _opt_state(lambda p: torch.optim.Adam(p))
    _, opt = _opt_state(lambda p: torch.optim.Adam(p), model=torch_reference.MLPAutoencoder(784, (64, 32), 8))
    return general_checkpoint(model, opt)


def _fewer_parameters():
    model, opt = _opt_state(lambda p: torch.optim.Adam(p))
    sd = opt.state_dict()
    sd["param_groups"][0]["params"] = sd["param_groups"][0]["params"][:-1]
    return {"model_state_dict": model.state_dict(), "optimizer_state_dict": sd}


def _two_groups():
    model = torch_model()
    params = list(model.parameters())
    opt = torch.optim.Adam([{"params": params[:6]}, {"params": params[6:], "lr": 1e-4}])
    torch_step(model, opt, torch.rand(2, 784))
    return general_checkpoint(model, opt)


def _cosine_run(batches, steps, t_max, *, per_epoch=False, eta_min=0.0):
    """Adam with CosineAnnealingLR(T_max) stepped after every optimizer step (or every 4th, as once an epoch)."""
    model = torch_model()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t_max, eta_min=eta_min)
    x = torch.from_numpy(batches[1])
    for i in range(steps):
        torch_step(model, opt, x[i])
        if not per_epoch or (i + 1) % 4 == 0:
            sched.step()
    return model, opt, sched, x


def test_a_torch_cosine_annealing_run_converts_to_a_cosine_schedule_and_continues_exactly(tmp_path, capsys, batches):
    model, opt, sched, x = _cosine_run(batches, steps=5, t_max=20)
    torch.save({**general_checkpoint(model, opt), "scheduler_state_dict": sched.state_dict()}, tmp_path / "run.pt")
    summary = convert_cli(capsys, tmp_path / "run.pt", tmp_path / "jax")
    assert "CosineAnnealingLR(T_max=20) carried" in " ".join(summary["notes"])
    trainer, state, config = checkpoint.restore(tmp_path / "jax")
    assert (config.lr_schedule, config.schedule_steps, config.lr) == ("cosine", 20, 2e-3)
    step = jax.jit(trainer.train_step)
    u8 = batches[0]
    jax_losses, torch_losses, torch_lrs = [], [], []
    for i in range(5, 20):  # to T_max (past it torch's cosine rises again, jaxae's stays at 0)
        state, metrics = step(state, jnp.asarray(u8[i]))
        jax_losses.append(float(metrics["loss"]))
        torch_lrs.append(opt.param_groups[0]["lr"])
        torch_losses.append(torch_step(model, opt, x[i]))
        sched.step()
    np.testing.assert_allclose(jax_losses, torch_losses, rtol=1e-5)
    from jaxae.train import learning_rate

    np.testing.assert_allclose([learning_rate(config, None, s) for s in range(5, 20)], torch_lrs, rtol=1e-5, atol=1e-11)
    got = convert.to_numpy_state_dict(state.params)
    for key, value in model.state_dict().items():
        np.testing.assert_allclose(got[key], value.numpy(), rtol=0, atol=2e-5, err_msg=key)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"per_epoch": True}, "stepped once per epoch, not after every optimizer step (Adam's step is 8)"),
        ({"eta_min": 1e-5}, "that decays to eta_min 1e-05; jaxae's cosine decays to 0"),
        ({"t_max": 4}, "past T_max, where torch's cosine rises again"),
    ],
    ids=["per-epoch", "eta-min", "past-t-max"],
)
def test_a_cosine_annealing_jaxae_cannot_continue_is_one_line(tmp_path, capsys, batches, kwargs, pattern):
    model, opt, sched, _ = _cosine_run(batches, steps=8, **{"t_max": 20, **kwargs})
    torch.save({**general_checkpoint(model, opt), "scheduler_state_dict": sched.state_dict()}, tmp_path / "run.pt")
    code = cli.main(["convert", str(tmp_path / "run.pt"), "--out", str(tmp_path / "jax")])
    one_line_error(capsys, code, pattern)
    assert not (tmp_path / "jax").exists()


def _scheduled(key="scheduler_state_dict", steps=1):
    """Adam after ``steps`` steps of StepLR(step_size=1, gamma=0.5), its state saved under ``key`` (None: not saved)."""
    model = torch_model()
    opt = torch.optim.Adam(model.parameters())
    scheduler = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    for _ in range(steps):
        torch_step(model, opt, torch.rand(4, 784))
        scheduler.step()
    ckpt = general_checkpoint(model, opt)
    if key is not None:
        ckpt[key] = scheduler.state_dict()
    return ckpt


@pytest.mark.parametrize(
    "make, pattern",
    [
        (lambda: _with(lambda p: torch.optim.Adam(p, amsgrad=True)), "amsgrad=True, which jaxae does not support"),
        (lambda: _with(lambda p: torch.optim.Adam(p, maximize=True)), "maximize=True"),
        (lambda: _with(lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)), "the optimizer state is SGD's;"),
        (lambda: _with(lambda p: torch.optim.RMSprop(p)), "RMSprop's"),
        (lambda: _with(lambda p: torch.optim.RMSprop(p, momentum=0.9)), "the optimizer state is RMSprop's;"),
        (lambda: _with(lambda p: torch.optim.NAdam(p)), "NAdam's"),
        (_scheduled, "learning-rate scheduler's state ('scheduler_state_dict')"),
        (lambda: _scheduled("sched", steps=3), "scheduler's state ('sched'): its learning rate followed a schedule"),
        (
            lambda: _scheduled(None, steps=3),
            "param_groups carry a scheduler's initial_lr (0.001; lr is now 0.000125)",
        ),
        (
            _other_model_optimizer,
            "exp_avg of parameter 4 (encoder.4.weight) has shape (8, 32) but the parameter has (16, 32)",
        ),
        (_fewer_parameters, "the optimizer holds 11 parameters but the model has 12"),
        (_two_groups, "parameter group 1 has its own lr"),
        (
            lambda: _with(lambda p: torch.optim.Adam(p), epoch=2**31),
            "its epoch is 2147483648, past the 2147483647 (2**31 - 1) a jaxae checkpoint counts",
        ),
        (
            lambda: _with(lambda p: torch.optim.Adam(p), global_step=2**40),
            "its step is 1099511627776, past the 2147483647",
        ),
        (lambda: _with(lambda p: torch.optim.Adam(p), epoch=2.7), "its epoch is 2.7, not a whole number"),
        (
            lambda: _with(lambda p: torch.optim.Adam(p), model_state_dict=None),
            "whose 'model_state_dict' holds None, not a model state_dict",
        ),
        (
            lambda: _with(lambda p: torch.optim.Adam(p), model_state_dict={}),
            "whose 'model_state_dict' holds an empty dict, not a model state_dict",
        ),
    ],
    ids=[
        "amsgrad",
        "maximize",
        "sgd",
        "rmsprop",
        "rmsprop-momentum",
        "nadam",
        "scheduler",
        "scheduler-under-another-key",
        "scheduler-not-saved",
        "other-model",
        "count",
        "groups",
        "epoch-past-int32",
        "step-past-int32",
        "fractional-epoch",
        "none-state-dict",
        "empty-state-dict",
    ],
)
def test_unsupported_or_mismatched_optimizer_state_is_one_line(tmp_path, capsys, make, pattern):
    torch.save(make(), tmp_path / "run.pt")
    code = cli.main(["convert", str(tmp_path / "run.pt"), "--out", str(tmp_path / "out")])
    one_line_error(capsys, code, pattern)
    assert not (tmp_path / "out").exists()


class _NoHidden(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.Sequential(torch.nn.Linear(784, 16))
        self.decoder = torch.nn.Sequential(torch.nn.Linear(16, 784), torch.nn.Sigmoid())


class _ConvChannels(torch.nn.Module):
    """The conv twin's layout with 8 and 16 channels instead of 16 and 32."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.encoder = nn.Sequential(nn.Conv2d(1, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU())
        self.code, self.project = nn.Linear(16 * 49, 32), nn.Linear(32, 16 * 49)
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(16, 8, 4, 2, 1), nn.ReLU(), nn.ConvTranspose2d(8, 1, 4, 2, 1), nn.Sigmoid()
        )

    def forward(self, x):
        h = self.encoder(x.reshape(-1, 1, 28, 28)).flatten(1)
        h = torch.relu(self.project(self.code(h))).reshape(-1, 16, 7, 7)
        return self.decoder(h).flatten(1)


@pytest.mark.parametrize(
    "module, pattern",
    [
        (_NoHidden, "is an MLP with no hidden layer (784-16, the decoder mirrored); jaxae's MLPs have at least one"),
    ],
)
def test_a_twin_layout_of_sizes_no_jaxae_model_has_is_named_so(tmp_path, capsys, module, pattern):
    torch.save(module().state_dict(), tmp_path / "m.pt")
    code = cli.main(["convert", str(tmp_path / "m.pt"), "--out", str(tmp_path / "out")])
    assert "--hidden-dims" not in one_line_error(capsys, code, pattern) and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_conv_model_of_other_channels_converts_with_them_read_off_its_tensors(tmp_path, capsys):
    # 8 and 16 channels (jaxae's default is 16, 32): refused before --conv-channels existed
    torch.manual_seed(0)
    module = _ConvChannels()
    torch.save(module.state_dict(), tmp_path / "m.pt")
    convert_cli(capsys, tmp_path / "m.pt", tmp_path / "out")
    _, state, config = checkpoint.restore(tmp_path / "out")
    assert (config.arch, config.conv_channels) == ("conv", (8, 16))
    x = torch.rand(4, 784)
    with torch.no_grad():
        want = module(x).numpy()
    trainer = build(config, (28, 28, 1))[0]
    got = np.asarray(trainer.model(state.params)(jnp.asarray(x.numpy())))
    assert np.abs(got - want).max() <= 1e-5


@pytest.mark.parametrize("key", ["sched", None])
def test_constant_lr_continues_a_scheduled_run_at_the_lr_it_reached(tmp_path, capsys, key):
    torch.save(_scheduled(key, steps=3), tmp_path / "run.pt")
    summary = convert_cli(capsys, tmp_path / "run.pt", tmp_path / "out", "--constant-lr")
    assert summary["optimizer"]["lr"] == 0.000125 and summary["optimizer"]["step"] == 3
    assert "not carried (--constant-lr): training continues at lr 0.000125, constant" in summary["notes"][-1]
    _, state, config = checkpoint.restore(tmp_path / "out")
    assert config.lr == 0.000125 and optax_count(state.opt_state) == 3


def test_no_optimizer_converts_the_weights_alone(tmp_path, capsys):
    torch.save(_scheduled(), tmp_path / "run.pt")
    summary = convert_cli(capsys, tmp_path / "run.pt", tmp_path / "out", "--no-optimizer")
    assert "optimizer" not in summary and "fresh Adam" in summary["notes"][-1]
    _, state, _ = checkpoint.restore(tmp_path / "out")
    assert (int(state.step), optax_count(state.opt_state)) == (0, 0)


def test_export_with_optimizer_refuses_safetensors(tmp_path, capsys):
    torch.save(torch_model().state_dict(), tmp_path / "m.pt")
    convert_cli(capsys, tmp_path / "m.pt", tmp_path / "jax")
    out = tmp_path / "m.safetensors"
    code = cli.main(["export", "--workdir", str(tmp_path / "jax"), "--out", str(out), "--with-optimizer"])
    one_line_error(capsys, code, "--with-optimizer writes a torch.save checkpoint")
    assert not out.exists()


def test_old_configs_without_optimizer_settings_load_with_adam_defaults():
    old = TrainConfig().to_dict()
    for key in ("optimizer", "betas", "eps", "weight_decay"):
        old.pop(key)
    config = TrainConfig.from_dict(old)
    assert (config.optimizer, config.betas, config.eps, config.weight_decay) == ("adam", (0.9, 0.999), 1e-8, 0.0)
    with pytest.raises(jaxae.JaxaeError, match="--betas must be two numbers in"):
        TrainConfig(betas=(0.9, 1.0)).validate()
    with pytest.raises(jaxae.JaxaeError, match="unknown --optimizer 'sgd'"):
        TrainConfig(optimizer="sgd").validate()


def test_optimizer_of_an_older_torch_needs_to_be_named_when_it_decays(tmp_path, capsys):
    model, opt = _opt_state(lambda p: torch.optim.AdamW(p, weight_decay=0.1))
    ckpt = general_checkpoint(model, opt)
    del ckpt["optimizer_state_dict"]["param_groups"][0]["decoupled_weight_decay"]  # as torch < 2.6 wrote it
    torch.save(ckpt, tmp_path / "old.pt")
    code = cli.main(["convert", str(tmp_path / "old.pt"), "--out", str(tmp_path / "out")])
    one_line_error(capsys, code, "give --optimizer adam or --optimizer adamw")
    assert not (tmp_path / "out").exists()
    summary = convert_cli(capsys, tmp_path / "old.pt", tmp_path / "out", "--optimizer", "adamw")
    assert summary["optimizer"]["optimizer"] == "adamw" and summary["optimizer"]["weight_decay"] == 0.1


def test_nonfinite_moments_and_contradicting_flags_are_one_line(tmp_path, capsys):
    model, opt = _opt_state(lambda p: torch.optim.Adam(p))
    ckpt = general_checkpoint(model, opt)
    ckpt["optimizer_state_dict"]["state"][3]["exp_avg_sq"][0] = float("nan")
    torch.save(ckpt, tmp_path / "nan.pt")
    code = cli.main(["convert", str(tmp_path / "nan.pt"), "--out", str(tmp_path / "out")])
    one_line_error(capsys, code, "(optimizer state): encoder.2.bias.exp_avg_sq has 1 NaN")
    torch.save(torch_reference.MLPVAE().state_dict(), tmp_path / "vae.pt")
    code = cli.main(["convert", str(tmp_path / "vae.pt"), "--out", str(tmp_path / "out"), "--variant", "vanilla"])
    one_line_error(capsys, code, "the file holds an MLP VAE's weights: give --variant vae --arch mlp")
    code = cli.main(["convert", str(tmp_path / "vae.pt"), "--out", str(tmp_path / "out"), "--hidden-dims", "64"])
    one_line_error(capsys, code, "--hidden-dims 64 does not match")
    assert not (tmp_path / "out").exists()


def test_lightning_epoch_without_loop_state_is_its_0_based_epoch_plus_one():
    model, opt = _opt_state(lambda p: torch.optim.Adam(p), steps=2)
    ckpt = {
        "epoch": 4,
        "global_step": 50,
        "state_dict": {f"net.{k}": v for k, v in model.state_dict().items()},
        "optimizer_states": [opt.state_dict()],
        "lr_schedulers": [],
    }
    found = convert.match(ckpt)
    assert (found.stripped, found.file.epoch, found.file.step) == ("net.", 5, 50)
    assert "0-based epoch 4" in found.file.notes[0]
    ckpt["optimizer_states"] = [opt.state_dict(), opt.state_dict()]
    with pytest.raises(jaxae.JaxaeError, match="holds 2 optimizers"):
        convert.match(ckpt)


# --- colour and non-square images -----------------------------------------------------------------
# PyTorch twins take NCHW images (an MLP their x.view(N, -1): (c, h, w) order), jaxae NHWC.


def nchw_flat(x_nhwc):
    return np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)).reshape(len(x_nhwc), -1)


def colour_twin(arch, image_shape, seed=0):
    torch.manual_seed(seed)
    if arch == "conv":
        return torch_reference.ConvAutoencoder(image_shape, latent_dim=LATENT)
    return torch_reference.MLPAutoencoder(math.prod(image_shape), HIDDEN, LATENT)


def colour_run(arch, image_shape, steps=3, batch=8):
    """A PyTorch run on random colour images: the model, its Adam, the uint8 NHWC batches."""
    model = colour_twin(arch, image_shape)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3, betas=(0.8, 0.95), eps=1e-6)
    u8 = np.random.default_rng(0).integers(0, 256, (steps + 1, batch, *image_shape), dtype=np.uint8)
    for i in range(steps):
        torch_step(model, opt, torch.from_numpy(nchw_flat(NORMALIZATIONS["unit"].table[u8[i]])))
    return model, opt, u8


@pytest.mark.parametrize("arch, image_shape", [("mlp", (16, 16, 3)), ("conv", (8, 16, 3))])
def test_colour_adam_state_converts_exactly_and_takes_torch_s_next_step(arch, image_shape):
    model, opt, u8 = colour_run(arch, image_shape)
    settings = convert.optimizer_settings(opt.state_dict(), "run.pt")
    config = TrainConfig(arch=arch, hidden_dims=HIDDEN, latent_dim=LATENT, **settings)
    trainer, state = build(config, image_shape)
    state_dict = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    params = convert.params_from_torch(state_dict, state.params, "vanilla", arch=arch, image_shape=image_shape)
    links = convert.links_for(convert.get_twin("vanilla", arch), params, image_shape)
    opt_state, step = convert.opt_state_from_torch(opt.state_dict(), list(state_dict), links, trainer.tx, params, "run")
    assert step == 3
    # back to torch bit for bit
    back = convert.torch_optimizer_state_dict(opt_state, links, config)
    for i, entry in opt.state_dict()["state"].items():
        for field in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(back["state"][i][field], entry[field]), (i, field)
    # a misplaced moment would move its weight by ~lr: the next step tells
    state = state.replace(params=params, opt_state=opt_state, step=jnp.asarray(3, jnp.int32))
    state, metrics = jax.jit(trainer.train_step)(state, jnp.asarray(u8[3]))
    torch_loss = torch_step(model, opt, torch.from_numpy(nchw_flat(NORMALIZATIONS["unit"].table[u8[3]])))
    assert float(metrics["loss"]) == pytest.approx(torch_loss, rel=1e-6)
    got = convert.to_numpy_state_dict(state.params, "vanilla", arch, image_shape)
    for key, value in model.state_dict().items():
        np.testing.assert_allclose(got[key], value.numpy(), rtol=0, atol=1e-6, err_msg=key)


# conv is slow (a conv run, conversion both ways); test_colour's colour conv round trip stays fast
@pytest.mark.parametrize("arch", [pytest.param("conv", marks=pytest.mark.slow), "mlp"])
def test_cli_converts_a_colour_run_and_exports_it_back_exactly(arch, tmp_path, capsys):
    image_shape = (16, 16, 3)
    model, opt, _ = colour_run(arch, image_shape, steps=2)
    torch.save(general_checkpoint(model, opt), tmp_path / "run.pt")
    run, out = str(tmp_path / "run.pt"), str(tmp_path / "jax")
    takes = "3-channel images of (H/4)*(W/4) = 16 (16x16x3?)" if arch == "conv" else "768 inputs (16x16x3?)"
    # the default dataset's digits are 28x28x1: the model does not take them
    code = cli.main(["convert", run, "--out", out])
    one_line_error(capsys, code, f"takes {takes} but the mnist-sample images are 28x28x1; give --dataset with the")
    code = cli.main(["convert", run, "--out", out, "--image-shape", "16,16,3", "--check"])
    one_line_error(capsys, code, "--check runs on the mnist-sample test images, which are 28x28x1, but --image-shape")
    with pytest.raises(SystemExit) as exited:
        cli.main(["convert", run, "--out", out, "--image-shape", "16,16"])
    one_line_error(capsys, exited.value.code, "argument --image-shape: expected H,W,C")
    away = str(tmp_path / "elsewhere")  # a --dataset that is not at hand: --image-shape alone decides
    code = cli.main(["convert", run, "--out", out, "--image-shape", "16,16,1", "--dataset", away])
    one_line_error(capsys, code, f"takes {takes} but --image-shape is 16x16x1")
    # a run converted for the sample's 28x28x1 digits must not record a 16x16x3 model
    code = cli.main(["convert", run, "--out", out, "--image-shape", "16,16,3", "--dataset", "mnist-sample"])
    one_line_error(capsys, code, "--image-shape is 16x16x3 but the mnist-sample images, which the converted run is")
    assert not (tmp_path / "jax").exists()

    # a colour IDX folder: what --dataset reads the image shape and the --check images from
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (24, *image_shape), dtype=np.uint8)
    labels = np.zeros(12, np.int32)
    jaxae.data.write_idx_folder(tmp_path / "colour", train=(images[:12], labels), test=(images[12:], labels))
    summary = convert_cli(capsys, run, out, "--dataset", str(tmp_path / "colour"), "--check")
    assert summary["passed"] and summary["image_shape"] == [16, 16, 3] and summary["examples"] == 12
    assert summary["max_abs_diff_outputs"] <= 1e-6 and summary["optimizer"]["step"] == 2
    # without the dataset at hand, --image-shape says it
    summary = convert_cli(capsys, run, tmp_path / "jax2", "--image-shape", "16,16,3", "--dataset", away)
    assert summary["image_shape"] == [16, 16, 3] and "from --image-shape" in summary["notes"][-1]
    # --image-shape alone records no dataset: evaluate and train --resume are given one
    alone = str(tmp_path / "jax3")
    summary = convert_cli(capsys, run, alone, "--image-shape", "16,16,3")
    assert "no dataset recorded: give --dataset" in summary["notes"][-1]
    assert json.loads((tmp_path / "jax3" / "config.json").read_text())["dataset"] is None
    code = cli.main(["evaluate", "--workdir", alone])
    one_line_error(capsys, code, "no dataset given: pass --dataset")
    assert cli.main(["evaluate", "--workdir", alone, "--dataset", str(tmp_path / "colour")]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["dataset"] == str(tmp_path / "colour") and evaluated["step"] == 2
    code = cli.main(["evaluate", "--workdir", alone, "--dataset", "mnist-sample"])
    one_line_error(capsys, code, "holds a model for 16x16x3 images, not 28x28x1")
    more = rng.integers(0, 256, (256 + 12, *image_shape), dtype=np.uint8)  # a full batch of the default 256
    big = jaxae.data.write_idx_folder(
        tmp_path / "colour-256", train=(more[:256], np.zeros(256, np.int32)), test=(more[256:], labels)
    )
    assert cli.main(["train", "--workdir", alone, "--resume", "--epochs", "3", "--dataset", str(big)]) == 0
    capsys.readouterr()
    assert json.loads((tmp_path / "jax3" / "config.json").read_text())["dataset"] == str(big)
    assert cli.main(["evaluate", "--workdir", alone]) == 0  # the run's dataset now
    assert json.loads(capsys.readouterr().out)["dataset"] == str(big)

    code = cli.main(["export", "--workdir", out, "--out", str(tmp_path / "back.pt"), "--with-optimizer"])
    exported = json.loads(capsys.readouterr().out)
    assert code == 0 and exported["image_shape"] == [16, 16, 3]
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    for key, value in model.state_dict().items():
        assert torch.equal(back["model_state_dict"][key], value), key
    for i, entry in opt.state_dict()["state"].items():
        for field in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(back["optimizer_state_dict"]["state"][i][field], entry[field]), (i, field)


def test_cli_converts_a_non_square_conv_run_and_exports_it_back_exactly(tmp_path, capsys):
    # A conv model's tensors cannot tell 16x8 from 8x16 images: the dataset's shape decides,
    # and the checkpoint keeps it so that export writes the same tensors back.
    image_shape = (16, 8, 3)
    model, opt, _ = colour_run("conv", image_shape, steps=2)
    torch.save(general_checkpoint(model, opt), tmp_path / "run.pt")
    images = np.random.default_rng(6).integers(0, 256, (16, *image_shape), dtype=np.uint8)
    labels = np.zeros(8, np.int32)
    jaxae.data.write_idx_folder(tmp_path / "colour", train=(images[:8], labels), test=(images[8:], labels))
    out = tmp_path / "jax"
    summary = convert_cli(capsys, str(tmp_path / "run.pt"), out, "--dataset", str(tmp_path / "colour"), "--check")
    assert summary["passed"] and summary["image_shape"] == [16, 8, 3]
    assert checkpoint.read_meta(out)[1]["input_shape"] == [16, 8, 3]
    code = cli.main(["export", "--workdir", str(out), "--out", str(tmp_path / "back.pt")])
    assert code == 0 and json.loads(capsys.readouterr().out)["image_shape"] == [16, 8, 3]
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    for key, value in model.state_dict().items():
        assert torch.equal(back[key], value), key
