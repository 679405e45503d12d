import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxae
from jaxae.data import write_idx
from jaxae.loop import fit
from jaxae.train import TrainConfig, build


@pytest.fixture
def compile_counter():
    """Counts XLA backend compilations while the test runs (catches silent recompiles)."""
    events = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            events.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    yield events
    jax.monitoring.unregister_event_duration_listener(listener)


def _images(ds):
    return jnp.asarray(ds.images.reshape(len(ds), -1))


def test_a_few_epochs_lower_the_loss(sample_train, sample_test):
    trainer, state = build(TrainConfig(epochs=3), 784)
    train, test = _images(sample_train), _images(sample_test)
    before = float(trainer.jit_evaluate(state, test)["loss"])
    for _ in range(3):
        state, _ = trainer.jit_train_epoch(state, train, batch_size=256)
    after = float(trainer.jit_evaluate(state, test)["loss"])
    assert after < 0.6 * before
    assert int(state.epoch) == 3 and int(state.step) == 3 * 16  # ceil(4000 / 256) steps per epoch


def test_no_recompilation_after_first_epoch(sample_train, sample_test, compile_counter):
    trainer, state = build(TrainConfig(), 784)
    train, test = _images(sample_train), _images(sample_test)
    state, _ = trainer.jit_train_epoch(state, train, batch_size=256)
    trainer.jit_evaluate(state, test)
    compiled_during_first = len(compile_counter)
    assert compiled_during_first >= 2
    for _ in range(3):
        state, metrics = trainer.jit_train_epoch(state, train, batch_size=256)
        jax.block_until_ready(trainer.jit_evaluate(state, test))
    assert len(compile_counter) == compiled_during_first


def test_every_example_once_per_epoch_and_order_changes(sample_train):
    trainer, state = build(TrainConfig(), 784)
    ids, mask = trainer.epoch_batches(state, 1000, 256)
    assert ids.shape == (4, 256) and float(mask.sum()) == 1000
    real = np.asarray(ids)[np.asarray(mask) > 0]
    assert sorted(real.tolist()) == list(range(1000))
    ids2, _ = trainer.epoch_batches(state.replace(epoch=state.epoch + 1), 1000, 256)
    assert not np.array_equal(np.asarray(ids), np.asarray(ids2))


def test_masked_padding_equals_the_smaller_batch(sample_train):
    """The padded last batch gives exactly the update PyTorch's smaller last batch gives."""
    model = jaxae.Autoencoder(rngs=nnx.Rngs(0))
    trainer, state = jaxae.create_train_state(model, optax.adam(1e-3))
    batch = jnp.asarray(sample_train.images[:40])
    padded = jnp.concatenate([batch, jnp.asarray(sample_train.images[100:124])])
    mask = jnp.concatenate([jnp.ones(40), jnp.zeros(24)])
    s1, m1 = trainer.train_step(state, batch)
    s2, m2 = trainer.train_step(state, padded, mask)
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-6)
    # One Adam step moves a parameter by lr * m / (sqrt(v) + eps), about lr where the gradient is
    # far above eps. Where it is near eps (1e-8), the rounding of the two sums (one over 40 rows,
    # one over 64 with 24 masked) moves that parameter's step by a fraction of lr: 1e-7 was seen on
    # an AMD EPYC. A padded row that counted would move steps by a good part of lr (1e-3).
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_train_step_matches_manual_adam_on_mse(sample_train):
    model = jaxae.Autoencoder(rngs=nnx.Rngs(3))
    trainer, state = jaxae.create_train_state(model, optax.adam(1e-3))
    batch = jnp.asarray(sample_train.images[:32])
    x = batch.reshape(32, -1).astype(jnp.float32) / 255.0

    def loss(params):
        return jnp.mean((trainer.model(params)(x) - x) ** 2)

    grads = jax.grad(loss)(state.params)
    tx = optax.adam(1e-3)
    updates, _ = tx.update(grads, tx.init(state.params), state.params)
    expected = optax.apply_updates(state.params, updates)
    loss_before = float(loss(state.params))
    new, metrics = trainer.jit_train_step(state, batch)
    np.testing.assert_allclose(metrics["loss"], loss_before, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(new.params), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert int(new.step) == 1


def test_evaluate_is_deterministic_and_exact_mean(sample_test):
    trainer, state = build(TrainConfig(), 784)
    test = _images(sample_test)
    a = trainer.jit_evaluate(state, test, batch_size=300)  # 1000 = 3*300 + 100: exercises padding
    b = trainer.jit_evaluate(state, test, batch_size=1000)
    np.testing.assert_allclose(a["mse"], b["mse"], rtol=1e-6)
    x = test.astype(jnp.float32) / 255.0
    direct = jnp.mean((trainer.model(state.params)(x) - x) ** 2)
    np.testing.assert_allclose(a["mse"], direct, rtol=1e-5)


def test_encode_helper(sample_test):
    trainer, state = build(TrainConfig(), 784)
    codes = jaxae.encode(trainer, state, sample_test.images[:250], batch_size=100)
    assert codes.shape == (250, 32)
    direct = trainer.model(state.params).encode(sample_test.images[:250].reshape(250, -1) / 255.0)
    np.testing.assert_allclose(codes, direct, atol=1e-6)


def test_fit_seed_reproducible_and_seed_sensitive(idx_folder):
    cfg = TrainConfig(dataset=str(idx_folder), epochs=2, batch_size=64)
    a = fit(cfg, progress=False).history
    b = fit(cfg, progress=False).history
    c = fit(TrainConfig(dataset=str(idx_folder), epochs=2, batch_size=64, seed=1), progress=False).history
    assert [r["train_loss"] for r in a] == [r["train_loss"] for r in b]
    assert a[-1]["train_loss"] != c[-1]["train_loss"]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"epochs": 0}, "--epochs must be positive"),
        ({"batch_size": -1}, "--batch-size must be positive"),
        ({"lr": float("nan")}, "--lr must be a finite number"),
        ({"lr": -1e-3}, "--lr must be a positive number"),
        ({"variant": "gan"}, "unknown variant 'gan'"),
        ({"normalize": "zscore"}, "unknown normalisation"),
        ({"batch_size": 100_000}, "larger than the 4000-image train split"),
    ],
)
def test_bad_settings_are_clear_errors(change, message):
    # A setting no run can use is refused as the config is made; one that only the data shows is wrong, by fit.
    with pytest.raises(jaxae.JaxaeError, match=message):
        fit(TrainConfig(**change), progress=False)


# Every entry point that takes images refuses anything but uint8: floats cast to int would index
# the normalisation table as near-black pixels and return plausible nonsense.
_ENTRY_POINTS = {
    "encode": lambda t, s, x: jaxae.encode(t, s, x),
    "train_step": lambda t, s, x: t.train_step(s, x),
    "jit_train_step": lambda t, s, x: t.jit_train_step(s, x),
    "train_epoch": lambda t, s, x: t.train_epoch(s, x, 4),
    "jit_train_epoch": lambda t, s, x: t.jit_train_epoch(s, x, batch_size=4),
    "evaluate": lambda t, s, x: t.evaluate(s, x, 4),
    "jit_evaluate": lambda t, s, x: t.jit_evaluate(s, x, batch_size=4),
    "jit_encode": lambda t, s, x: t.jit_encode(s.params, x),
}


@pytest.mark.parametrize("entry", sorted(_ENTRY_POINTS))
@pytest.mark.parametrize("dtype", ["float32", "int32"])
def test_images_that_are_not_uint8_are_refused(sample_test, entry, dtype):
    trainer, state = build(TrainConfig(hidden_dims=(16,), latent_dim=4), 784)
    pixels = sample_test.images[:8].reshape(8, -1)
    images = pixels / 255.0 if dtype == "float32" else pixels
    images = jnp.asarray(images, dtype)
    with pytest.raises(jaxae.JaxaeError, match=rf"images must be uint8 pixels 0\.\.255, got dtype {dtype}.*astype"):
        _ENTRY_POINTS[entry](trainer, state, images)
    if entry.startswith("jit_") or entry == "encode":  # (the eager forms run the same code, op by op: slow)
        # the same pixels as uint8 go through
        jax.block_until_ready(_ENTRY_POINTS[entry](trainer, state, jnp.asarray(pixels)))


@pytest.mark.parametrize("setting", ["lr", "noise_std", "mask_prob", "sparsity_weight", "sparsity_target", "beta"])
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_float_settings_are_refused(setting, value):
    flag = "--" + setting.replace("_", "-")
    with pytest.raises(jaxae.JaxaeError, match=f"{flag} must be a finite number, got {value}"):
        TrainConfig(**{setting: value}).validate()


@pytest.mark.parametrize("seed", [-1, 2**32, 2**64, 2**70, 1.5])
def test_seeds_outside_32_bits_are_refused(seed):
    with pytest.raises(jaxae.JaxaeError, match=r"--seed must be an integer from 0 to 4294967295"):
        TrainConfig(seed=seed).validate()
    with pytest.raises(jaxae.JaxaeError, match=r"--seed must be an integer from 0 to 4294967295"):
        jaxae.create_train_state(jaxae.Autoencoder(rngs=nnx.Rngs(0)), optax.adam(1e-3), seed=seed)


def test_largest_seed_gives_its_own_key():
    # Below the bound every seed is distinct: JAX would alias 2**32 to 0, which is why it is the bound.
    _, a = build(TrainConfig(seed=2**32 - 1, hidden_dims=(16,), latent_dim=4), 784)
    _, b = build(TrainConfig(seed=0, hidden_dims=(16,), latent_dim=4), 784)
    assert not np.array_equal(np.asarray(a.rng), np.asarray(b.rng))


def _tiny_idx_folder(folder, h, w):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 64), ("t10k", 16)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, h, w), dtype=np.uint8))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", np.arange(n, dtype=np.uint8) % 10)
    return folder


def test_images_too_small_for_the_model_and_figures_fail_before_training(tmp_path):
    # 1x1 images used to train, then crash while drawing the figures.
    cfg = TrainConfig(dataset=str(_tiny_idx_folder(tmp_path / "data", 1, 1)), epochs=1, batch_size=16)
    with pytest.raises(jaxae.DataError, match="images are 1x1; jaxae needs images of at least 8x8"):
        fit(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("variant, arch, h, w", [("vanilla", "mlp", 8, 8), ("vae", "mlp", 8, 12)])
def test_smallest_allowed_images_train_and_draw_their_figures(tmp_path, variant, arch, h, w):
    data = _tiny_idx_folder(tmp_path / "data", h, w)
    cfg = TrainConfig(
        variant=variant, arch=arch, dataset=str(data), epochs=1, batch_size=16, hidden_dims=(16,), latent_dim=4
    )
    fit(cfg, tmp_path / "run", progress=False)
    figures = ["reconstructions.png", "loss.png"] + (["samples.png"] if variant == "vae" else [])
    for name in figures:
        assert (tmp_path / "run" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


@pytest.mark.parametrize("change", [{"latent_dim": 99_999_999_999}, {"hidden_dims": (10**9, 64)}])
def test_a_model_too_large_for_memory_is_refused_before_allocating(change):
    with pytest.raises(jaxae.JaxaeError, match=r"the model has [\d,]+ parameters: training needs at least .* GiB"):
        build(TrainConfig(**change), 784)


@pytest.mark.parametrize("variant", ["vanilla", "vae"])
def test_a_model_with_nan_parameters_has_nan_metrics(sample_test, variant):
    # XLA:CPU fuses a matmul with the ReLU after it into a kernel that maps NaN to 0, so before
    # this check a model whose weights were all NaN evaluated to a finite, plausible loss.
    trainer, state = build(TrainConfig(variant=variant), (28, 28, 1))
    poisoned = jax.tree_util.tree_map(lambda p: jnp.full_like(p, jnp.nan), state.params)
    metrics = jax.device_get(trainer.jit_evaluate(state.replace(params=poisoned), _images(sample_test)[:200]))
    assert metrics and all(np.isnan(v) for v in metrics.values()), metrics
    one_inf = jax.tree_util.tree_map(lambda p: p, state.params)
    leaves, treedef = jax.tree_util.tree_flatten(one_inf)
    leaves[-1] = leaves[-1].at[0].set(jnp.inf)
    metrics = jax.device_get(
        trainer.jit_evaluate(
            state.replace(params=jax.tree_util.tree_unflatten(treedef, leaves)), _images(sample_test)[:200]
        )
    )
    assert all(np.isnan(v) for v in metrics.values()), metrics
    healthy = jax.device_get(trainer.jit_evaluate(state, _images(sample_test)[:200]))
    assert all(np.isfinite(v) for v in healthy.values())


def test_padding_rows_whose_metric_is_not_finite_count_for_nothing():
    """A device's block of a split ends in zero rows (RowShards); a metric that is infinite on an
    all-zero image, such as the log of its mean, must not turn the mean over the real rows NaN
    (before: the padding's -inf was multiplied by a mask of 0)."""
    trainer, state = build(TrainConfig(), (8, 8, 1))
    real = np.random.default_rng(0).integers(1, 256, (5, 64), dtype=np.uint8)
    block = jnp.asarray(np.concatenate([real, np.zeros((3, 64), np.uint8)]))

    black = trainer.normalization(np.zeros(1, np.uint8))[0]

    def log_lit(model, x, keys):  # log of the count of pixels that are not black: -inf on a zero image
        return {"log_lit": jnp.log(jnp.sum(x > black, axis=1).astype(jnp.float32))}

    means = trainer.mean_over(state, block, log_lit, batch_size=4, rows=5)
    np.testing.assert_allclose(float(means["log_lit"]), np.log(64), rtol=1e-6)


def test_fit_shows_its_progress_bar_when_asked_and_not_otherwise(capsys, sample_train, sample_test):
    """fit(progress=True) showed no bar: the flag's name was reused for a resumed epoch's position."""
    train, test = (sample_train.images[:256], None), (sample_test.images[:64], None)
    config = TrainConfig(epochs=1, batch_size=128)
    fit(config, progress=True, train=train, test=test, figures=False)
    assert "1/1" in capsys.readouterr().err
    fit(config, progress=False, train=train, test=test, figures=False)
    assert "1/1" not in capsys.readouterr().err
