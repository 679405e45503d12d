"""The VQ-VAE (``--variant vqvae``): the quantiser, its EMA codebook through the train step,
resume and sweeps, the CLI, and bad input. Its PyTorch twin is in test_convert (every TWINS
entry) and its strategies in test_parallel."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxae import cli, models
from jaxae.loop import fit
from jaxae.objectives import codebook_summary, get_variant
from jaxae.sweep import fit_sweep, sweep_configs
from jaxae.train import TrainConfig, build, create_train_state

SMALL = {"variant": "vqvae", "hidden_dims": (32,), "latent_dim": 4, "codebook_size": 16}


def _one_line_error(capsys, code, needle):
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and needle in err[0], err


def test_the_quantizer_picks_the_nearest_code_and_passes_no_gradient():
    q = models.VectorQuantizer(16, 3, rngs=nnx.Rngs(0))
    q.codebook[...] = jax.random.normal(jax.random.key(1), (16, 3))
    z = jax.random.normal(jax.random.key(2), (5, 7, 3))
    index, z_q = q(z)
    book = np.asarray(q.codebook[...], np.float64)
    expected = np.argmin(((np.asarray(z, np.float64)[..., None, :] - book) ** 2).sum(-1), axis=-1)
    assert index.shape == (5, 7) and np.array_equal(np.asarray(index), expected)
    np.testing.assert_array_equal(np.asarray(z_q), book[expected].astype(np.float32))
    graphdef, state = nnx.split(q)
    grads = jax.grad(lambda s: jnp.sum(nnx.merge(graphdef, s)(z)[1]))(state)
    assert all(not np.any(g) for g in jax.tree.leaves(grads))


def test_the_ema_update_is_the_formula_with_dead_codes_restarted():
    rng = np.random.default_rng(0)
    k, d, decay, eps = 6, 2, 0.9, 1e-5
    q = models.VectorQuantizer(k, d, decay=decay, eps=eps, rngs=nnx.Rngs(0))
    count0 = np.array([5.0, 0.5, 3.0, 0.2, 2.0, 0.1], np.float32)
    sum0 = rng.normal(size=(k, d)).astype(np.float32)
    q.ema_count[...], q.ema_sum[...] = jnp.asarray(count0), jnp.asarray(sum0)
    counts = np.array([4.0, 0.0, 1.0, 0.0, 3.0, 0.0], np.float32)
    sums = rng.normal(size=(k, d)).astype(np.float32)
    share_sum = rng.normal(size=(k, d)).astype(np.float32)
    share_count = np.array([2.0, 3.0, 1.0, 0.0, 1.0, 2.0], np.float32)
    q.update(jnp.asarray(counts), jnp.asarray(sums), restart=(jnp.asarray(share_sum), jnp.asarray(share_count)))

    count = decay * count0 + (1 - decay) * counts
    total = decay * sum0 + (1 - decay) * sums
    dead = (count < models.DEAD_CODE_COUNT) & (share_count > 0)
    assert dead.tolist() == [False, True, False, False, False, True]  # code 3 has no share to restart from
    count[dead] = 1.0
    total[dead] = share_sum[dead] / share_count[dead, None]
    n = count.sum()
    smoothed = (count + eps) / (n + k * eps) * n
    np.testing.assert_allclose(np.asarray(q.ema_count[...]), count, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(q.ema_sum[...]), total, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(q.codebook[...]), total / smoothed[:, None], rtol=1e-5)


def test_codebook_summary_perplexity_and_dead_codes():
    uniform = codebook_summary({"usage": jnp.full((8,), 1 / 8), "mse": jnp.float32(0.1)})
    assert float(uniform["perplexity"]) == pytest.approx(8.0, rel=1e-6) and float(uniform["dead_codes"]) == 0
    one = codebook_summary({"usage": jnp.array([0.0, 1.0, 0.0, 0.0])})
    assert float(one["perplexity"]) == pytest.approx(1.0) and float(one["dead_codes"]) == 3
    assert "usage" not in one and float(uniform["mse"]) == pytest.approx(0.1)


def _step(config, images, mask, ids):
    trainer, state = build(config, (28, 28, 1))
    return trainer.jit_train_step(state, jnp.asarray(images), jnp.asarray(mask), jnp.asarray(ids))


def test_padded_rows_move_neither_the_weights_nor_the_codebook(sample_train):
    config = TrainConfig(**SMALL)
    real = sample_train.images[:5]
    garbage = np.full((3, *real.shape[1:]), 255, np.uint8)
    padded, metrics = _step(config, np.concatenate([real, garbage]), [1.0] * 5 + [0.0] * 3, np.arange(8))
    alone, reference = _step(config, real, [1.0] * 5, np.arange(5))
    for a, b in zip(jax.tree.leaves(padded.params), jax.tree.leaves(alone.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-7)
    assert float(metrics["loss"]) == pytest.approx(float(reference["loss"]), rel=1e-6)
    # and the codebook did move: the step set it from the batch
    _, fresh = build(config, (28, 28, 1))
    assert not np.allclose(padded.params["quantizer"]["codebook"], fresh.params["quantizer"]["codebook"])


def test_the_straight_through_gradient_trains_the_encoder_without_a_commitment_term(sample_train):
    config = TrainConfig(**{**SMALL, "commitment_weight": 0.0})
    trainer, state = build(config, (28, 28, 1))
    x = trainer.normalization(jnp.asarray(sample_train.images[:16]).reshape(16, -1))
    objective = get_variant("vqvae").build_objective(config, trainer.normalization)
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.key(0), jnp.arange(16))
    grads = jax.grad(lambda p: jnp.mean(objective.loss(trainer.model(p), x, keys)[0]))(state.params)
    assert np.abs(grads["encoder"]["layers"][0]["kernel"]).max() > 0  # through the quantiser
    assert all(not np.any(g) for g in jax.tree.leaves(grads["quantizer"]))


@pytest.mark.slow
def test_codes_decode_to_the_reconstruction_and_samples_are_images(sample_train):
    model = models.ConvVQVAE((28, 28, 1), codebook_size=32, rngs=nnx.Rngs(0))
    x = jnp.asarray(sample_train.images[:4], jnp.float32) / 255
    codes = model.codes(x)
    assert codes.shape == (4, 49) and codes.dtype.kind == "i" and int(codes.max()) < 32
    np.testing.assert_allclose(np.asarray(model.decode_codes(codes)), np.asarray(model(x)), atol=1e-6)
    assert model.encode(x).shape == (4, 49 * 32)
    for prior in ("frequencies", "uniform"):
        samples = model.sample(jax.random.key(0), 3, prior)
        assert samples.shape == (3, 784) and 0 <= float(samples.min()) and float(samples.max()) <= 1


@pytest.mark.slow
def test_resume_is_exact_with_the_codebook(tmp_path, idx_folder):
    config = TrainConfig(**{**SMALL, "dataset": str(idx_folder), "batch_size": 64})
    full = fit(dataclasses.replace(config, epochs=3), tmp_path / "full", progress=False, figures=False)
    fit(dataclasses.replace(config, epochs=1), tmp_path / "split", progress=False, figures=False)
    resumed = fit(dataclasses.replace(config, epochs=3), tmp_path / "split", progress=False, resume=True, figures=False)
    for a, b in zip(jax.tree.leaves(resumed.state.params), jax.tree.leaves(full.state.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert resumed.history[-1]["test_loss"] == full.history[-1]["test_loss"]
    assert resumed.history[-1]["test_perplexity"] == full.history[-1]["test_perplexity"]


@pytest.mark.slow
def test_each_swept_model_is_its_train_run(idx_folder):
    base = TrainConfig(**{**SMALL, "dataset": str(idx_folder), "batch_size": 64, "epochs": 2})
    configs = sweep_configs(base, codebook_decay=[0.9, 0.99], commitment_weight=[0.25, 1.0])
    result = fit_sweep(configs, None, progress=False)
    for config, history in zip(result.configs, result.histories, strict=True):
        reference = fit(config, progress=False, figures=False, events=False).history
        for key in ("test_loss", "test_perplexity", "test_dead_codes", "train_loss"):
            np.testing.assert_allclose(history[-1][key], reference[-1][key], atol=1e-5, err_msg=key)


@pytest.mark.slow
def test_cli_trains_the_conv_vqvae_exports_it_and_the_export_checks(tmp_path, capsys):
    # 3 epochs of the embedded sample at batch 64 (the default 256 gives 72 steps in all, too few
    # for any conv model here to reach 0.06: the vanilla conv ends at 0.072)
    workdir = tmp_path / "vq"
    args = ["train", "--variant", "vqvae", "--arch", "conv", "--epochs", "3", "--batch-size", "64"]
    assert cli.main([*args, "--workdir", str(workdir), "--no-progress"]) == 0
    final = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert final["test_perplexity"] > 1.5 and final["test_mse"] <= 0.06, final
    assert 0 <= final["test_dead_codes"] < 512
    assert (workdir / "samples.png").stat().st_size > 0 and (workdir / "samples_uniform.png").stat().st_size > 0
    assert json.loads((workdir / "config.json").read_text())["codebook_size"] == 512

    assert cli.main(["evaluate", "--workdir", str(workdir)]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["test_mse"] == pytest.approx(final["test_mse"], rel=1e-6)

    pt = tmp_path / "vq.pt"
    assert cli.main(["export", "--workdir", str(workdir), "--out", str(pt)]) == 0
    capsys.readouterr()
    out = tmp_path / "back"
    code = cli.main(["convert", str(pt), "--out", str(out), "--variant", "vqvae", "--arch", "conv", "--check"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["passed"] and report["max_abs_diff_outputs"] <= 1e-5, report
    assert report["max_abs_diff_parameters"] == 0
    assert {"quantizer.codebook", "quantizer.ema_count", "quantizer.ema_sum"} <= set(
        report["max_abs_diff_per_parameter"]
    )


@pytest.mark.slow
def test_the_mlp_vqvae_trains(tmp_path, capsys):
    args = ["train", "--variant", "vqvae", "--epochs", "1", "--no-progress", "--workdir", str(tmp_path / "mlp")]
    assert cli.main(args) == 0
    final = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert final["test_perplexity"] > 1.5 and np.isfinite(final["test_loss"]), final


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--codebook-size", "0"], "--codebook-size"),
        (["--codebook-size", "-3"], "--codebook-size"),
        (["--commitment-weight", "-1"], "--commitment-weight"),
        (["--codebook-decay", "1"], "--codebook-decay"),
    ],
)
def test_bad_vqvae_settings_are_one_line_exit_2(flags, needle, tmp_path, capsys):
    code = cli.main(["train", "--variant", "vqvae", "--workdir", str(tmp_path / "w"), *flags])
    _one_line_error(capsys, code, needle)
    assert not (tmp_path / "w").exists()


def test_a_users_own_module_with_a_quantizer_trains_on_the_objective(sample_train):
    """The objective asks for ``encode_latent``, ``decode`` and ``quantizer``: a user's model has them."""

    class Tiny(nnx.Module):
        def __init__(self, rngs):
            self.enc = nnx.Linear(784, 2 * 3, rngs=rngs)
            self.dec = nnx.Linear(2 * 3, 784, rngs=rngs)
            self.quantizer = models.VectorQuantizer(8, 3, rngs=rngs)

        def encode_latent(self, x):
            return self.enc(x.reshape(x.shape[0], -1)).reshape(x.shape[0], 2, 3)

        def decode(self, z):
            return jax.nn.sigmoid(self.dec(z))

        def __call__(self, x):
            return self.decode(self.quantizer(self.encode_latent(x))[1].reshape(x.shape[0], -1))

    trainer, state = create_train_state(Tiny(nnx.Rngs(0)), optax.adam(1e-3), "vqvae", image_shape=(28, 28, 1))
    before = np.asarray(state.params["quantizer"]["codebook"]).copy()
    state, metrics = trainer.jit_train_step(state, jnp.asarray(sample_train.images[:32]))
    assert np.isfinite(float(metrics["loss"])) and float(metrics["perplexity"]) >= 1
    assert not np.allclose(np.asarray(state.params["quantizer"]["codebook"]), before)
