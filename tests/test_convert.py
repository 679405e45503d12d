"""The PyTorch converter: numerical parity against real PyTorch, round trips, and safe loading.

Parity runs in fp32 on the CPU on both sides, with JAX's matmuls at "highest" precision.
Every (variant, arch) with a PyTorch twin (jaxae.TWINS) gets the parity and round-trip tests,
and so does the sparse variant's second code activation (sparsity="kl": a Sigmoid code).
"""

import collections
import copy
import dataclasses
import json
import os
import pickle
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

import jaxae
from jaxae import checkpoint, cli, convert, torch_reference
from jaxae.data import NORMALIZATIONS, get_normalization
from jaxae.loop import init_params_from
from jaxae.models import gaussian_sample
from jaxae.train import TrainConfig, build

DOCUMENT_KEYS = [
    f"{part}.{i}.{kind}" for part in ("encoder", "decoder") for i in (0, 2, 4) for kind in ("weight", "bias")
]


def _case(variant, arch, **settings):
    return pytest.param(
        TrainConfig(variant=variant, arch=arch, **settings), id="-".join([variant, arch, *map(str, settings.values())])
    )


TWIN_CONFIGS = [_case(v, a) for v, a in jaxae.TWINS] + [_case("sparse", "mlp", sparsity="kl")]
# Twins with the document's layout (same keys and shapes) can load the weights PyTorch trained.
DOCUMENT_LAYOUT = {"vanilla", "denoising", "sparse"}


@pytest.fixture(autouse=True)
def fp32_torch():
    torch.set_default_dtype(torch.float32)
    with jax.default_matmul_precision("highest"):
        yield


def torch_twin(config=None, seed=0):
    config = config or TrainConfig()
    torch.manual_seed(seed)
    return jaxae.TWINS[(config.variant, config.arch)].torch_module(config, (28, 28, 1))


def batch_size_for(config):
    # conv models compile and run slower on the CPU: a smaller batch keeps their tests short
    return 64 if config.arch == "conv" else 256


def fixed_keys(n, seed=11):
    """Per-example keys, as the train step draws them, fixed so both frameworks see the same noise."""
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.key(seed), jnp.arange(n))


def fixed_noise(config, objective, x, keys):
    """The randomness of the variant's loss, drawn by jaxae from ``keys``, for the torch side."""
    if config.variant == "denoising":
        return {"noisy": np.array(objective.corrupt(jnp.asarray(x), keys))}
    if config.variant == "vae":
        zeros = jnp.zeros((len(x), config.latent_dim), jnp.float32)
        return {"eps": np.array(jax.vmap(gaussian_sample)(keys, zeros, zeros))}  # mean 0, std 1: eps itself
    if config.variant == "iwae":  # as objectives._iw_log_weights_lse draws its K samples per image
        shape = (config.iwae_samples, config.latent_dim)
        return {"eps": np.array(jax.vmap(lambda k: jax.random.normal(k, shape))(keys))}
    return {}


def fixed_share(config, module, keys):
    """The VQ-VAE's restart draw, as its objective makes it from the per-example keys: ``[B, P]``."""
    if config.variant != "vqvae":
        return None
    positions = 1 if config.arch == "mlp" else module.feature_shape[1] * module.feature_shape[2]
    size = config.codebook_size
    return torch.from_numpy(np.array(jax.vmap(lambda k: jax.random.randint(k, (positions,), 0, size))(keys)))


def torch_loss(config, module, x, noise):
    """The variant's training loss in PyTorch, on the twin, with jaxae's noise."""
    return torch_reference.variant_loss(module, x, config, **{k: torch.from_numpy(v) for k, v in noise.items()})


def torch_views(module, x):
    """What the forward parity compares: the reconstruction and the code (or the VAE's heads)."""
    xt = torch.from_numpy(x)
    with torch.no_grad():
        views = {"reconstruction": module(xt)}
        if hasattr(module, "encode_distribution"):
            views["mean"], views["logvar"] = module.encode_distribution(xt)
        else:
            # the document's class has no encode(): its encoder gives the code
            views["code"] = getattr(module, "encode", module.encoder)(xt)
    return {k: v.numpy() for k, v in views.items()}


@jax.jit
def flax_views(model, x):
    views = {"reconstruction": model(x)}
    if hasattr(model, "encode_distribution"):
        views["mean"], views["logvar"] = model.encode_distribution(x)
    else:
        views["code"] = model.encode(x)
    return views


def normalized(images_u8, preset):
    """What torchvision's ToTensor + Normalize give, flattened: float32 [N, 784]."""
    return NORMALIZATIONS[preset].table[images_u8.reshape(len(images_u8), -1)]


def numpy_state_dict(module):
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def max_abs_diffs(a, b):
    assert list(a) == list(b)
    return {k: float(np.max(np.abs(np.asarray(a[k], np.float64) - np.asarray(b[k], np.float64)))) for k in a}


def batch_order(n, steps, batch_size, seed=0):
    """A fixed batch order both frameworks follow: per-epoch permutations, as a DataLoader draws them."""
    rng = np.random.default_rng(seed)
    epochs = -(-steps * batch_size // n)
    return np.concatenate([rng.permutation(n) for _ in range(epochs)])[: steps * batch_size].reshape(steps, batch_size)


# --- the reference model ------------------------------------------------------------------------


def test_reference_model_is_the_document_s():
    model = torch_reference.Autoencoder()
    assert list(model.state_dict()) == DOCUMENT_KEYS
    kinds = [type(m).__name__ for m in (*model.encoder, *model.decoder)]
    assert kinds == ["Linear", "ReLU", "Linear", "ReLU", "Linear"] + [
        "Linear",
        "ReLU",
        "Linear",
        "ReLU",
        "Linear",
        "Sigmoid",
    ]
    shapes = [tuple(v.shape) for k, v in model.state_dict().items() if k.endswith("weight")]
    assert shapes == [(128, 784), (64, 128), (32, 64), (64, 32), (128, 64), (784, 128)]
    # the sized twin builds the same layers in the same order: same seed, same weights
    torch.manual_seed(3)
    a = torch_reference.Autoencoder().state_dict()
    torch.manual_seed(3)
    b = torch_reference.MLPAutoencoder().state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert isinstance(torch_twin(), torch_reference.Autoencoder)


def _layers(sequential):
    return [
        (type(m).__name__, *((m.kernel_size[0], m.stride[0], m.padding[0]) if hasattr(m, "kernel_size") else ()))
        for m in sequential
    ]


def test_twins_are_the_modules_a_pytorch_user_writes():
    linear_keys = ["{}.weight", "{}.bias"]
    seq = lambda part, idx: [k.format(f"{part}.{i}") for i in idx for k in linear_keys]  # noqa: E731
    head = lambda *names: [k.format(n) for n in names for k in linear_keys]  # noqa: E731
    expected_keys = {
        ("vanilla", "mlp"): DOCUMENT_KEYS,
        ("denoising", "mlp"): DOCUMENT_KEYS,
        ("sparse", "mlp"): DOCUMENT_KEYS,
        ("vae", "mlp"): seq("encoder", (0, 2)) + head("mean", "logvar") + seq("decoder", (0, 2, 4)),
        ("vanilla", "conv"): seq("encoder", (0, 2)) + head("code", "project") + seq("decoder", (0, 2)),
        ("denoising", "conv"): seq("encoder", (0, 2)) + head("code", "project") + seq("decoder", (0, 2)),
        ("vae", "conv"): seq("encoder", (0, 2)) + head("mean", "logvar", "project") + seq("decoder", (0, 2)),
    }
    for arch in ("mlp", "conv"):  # the IWAE trains the VAE's model
        expected_keys[("iwae", arch)] = expected_keys[("vae", arch)]
    # the VQ-VAE: the vanilla model's layers, with the codebook and its EMA statistics as buffers
    quantizer = ["quantizer.codebook", "quantizer.ema_count", "quantizer.ema_sum"]
    expected_keys[("vqvae", "mlp")] = DOCUMENT_KEYS + quantizer
    expected_keys[("vqvae", "conv")] = expected_keys[("vanilla", "conv")] + quantizer
    assert set(expected_keys) == set(jaxae.TWINS)
    for (variant, arch), keys in expected_keys.items():
        twin = torch_twin(TrainConfig(variant=variant, arch=arch))
        assert list(twin.state_dict()) == keys, (variant, arch)
        # the codebook is state the EMA sets, not a parameter the optimizer steps
        assert [name for name, _ in twin.named_buffers()] == [k for k in keys if k.startswith("quantizer.")]

    # the sparse variant's code activation sits at encoder index 5, as in jaxae.models.Autoencoder
    for sparsity, activation in (("l1", "ReLU"), ("kl", "Sigmoid")):
        encoder = torch_twin(TrainConfig(variant="sparse", sparsity=sparsity)).encoder
        assert [name for name, *_ in _layers(encoder)] == ["Linear", "ReLU", "Linear", "ReLU", "Linear", activation]
    vae = torch_twin(TrainConfig(variant="vae"))
    assert _layers(vae.encoder) == [("Linear",), ("ReLU",), ("Linear",), ("ReLU",)]
    assert [name for name, *_ in _layers(vae.decoder)] == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]  # logits
    assert (vae.mean.in_features, vae.mean.out_features, vae.logvar.out_features) == (64, 32, 32)
    # conv: Conv2d(k3, s2, p1) down, ConvTranspose2d(k4, s2, p1) up, 28 -> 14 -> 7 -> 14 -> 28
    for variant in ("vanilla", "vae"):
        conv = torch_twin(TrainConfig(variant=variant, arch="conv"))
        assert _layers(conv.encoder) == [("Conv2d", 3, 2, 1), ("ReLU",), ("Conv2d", 3, 2, 1), ("ReLU",)]
        assert _layers(conv.decoder) == [("ConvTranspose2d", 4, 2, 1), ("ReLU",), ("ConvTranspose2d", 4, 2, 1)]
        assert (conv.project.in_features, conv.project.out_features) == (32, 32 * 7 * 7)
        with torch.no_grad():
            x = torch.rand(2, 784)
            assert conv(x).shape == (2, 784) and conv.encode(x).shape == (2, 32)
            assert torch.equal(conv(x), conv(x.reshape(2, 1, 28, 28)))  # NCHW in, flat out


def test_import_jaxae_does_not_import_torch_and_says_how_to_install_it(tmp_path):
    torch.save(torch_reference.Autoencoder().state_dict(), tmp_path / "m.pt")
    convert.save_state_dict(numpy_state_dict(torch_reference.Autoencoder()), tmp_path / "m.safetensors", "safetensors")
    code = f"""
import sys
import jaxae, jaxae.cli, jaxae.convert, jaxae.torch_reference
assert not [m for m in sys.modules if m == "torch" or m.startswith("torch.")], "torch imported"
sys.modules["torch"] = None  # from here on, `import torch` fails as if it were not installed
model = jaxae.from_torch({str(tmp_path / "m.safetensors")!r})  # safetensors needs no torch
assert model(jaxae.load_dataset("mnist-sample", "test").images[:3].reshape(3, -1) / 255.0).shape == (3, 784)
for call in (lambda: jaxae.from_torch({str(tmp_path / "m.pt")!r}), lambda: jaxae.torch_reference.Autoencoder):
    try:
        call()
    except jaxae.JaxaeError as e:
        print(e)
    else:
        raise SystemExit("no error")
sys.exit(jaxae.cli.main(["convert", {str(tmp_path / "m.pt")!r}, "--out", {str(tmp_path / "out")!r}]))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout.count("pip install 'jaxae[torch]'") == 2, proc.stdout
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "pip install 'jaxae[torch]'" in proc.stderr
    assert not (tmp_path / "out").exists()


# --- parity with real PyTorch -----------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_pair(sample_train):
    """100 steps of Adam(1e-3) on MSE in both frameworks from the same weights and batch order."""
    with jax.default_matmul_precision("highest"):
        return _train_both(sample_train, "unit")


def _adam_state_from_torch(opt_state, reference, optimizer, template):
    """optax.adam's state holding torch.optim.Adam's moments and step count."""
    names = {p: k for k, p in reference.named_parameters()}
    moments = {"exp_avg": {}, "exp_avg_sq": {}}
    count = 0
    for p, name in names.items():
        state = optimizer.state.get(p, {})
        count = int(state["step"]) if state else 0
        for key in moments:
            moments[key][name] = state[key].numpy() if state else np.zeros(tuple(p.shape), np.float32)
    mu, nu = (convert.params_from_torch(moments[key], template) for key in ("exp_avg", "exp_avg_sq"))
    return (opt_state[0]._replace(count=jnp.asarray(count, jnp.int32), mu=mu, nu=nu), *opt_state[1:])


def _train_both(sample_train, preset, steps=100, batch_size=256):
    order = batch_order(len(sample_train), steps, batch_size)
    reference = torch_twin(seed=1)
    initial = numpy_state_dict(reference)
    # jaxae's own train step: uint8 batch in, normalisation inside, optax.adam.
    trainer, start = jaxae.create_train_state(jaxae.from_torch(initial), optax.adam(1e-3), "vanilla", preset)
    images = jnp.asarray(sample_train.images.reshape(len(sample_train), -1))
    step_without_donation = jax.jit(trainer.train_step)

    opt = torch.optim.Adam(reference.parameters(), lr=1e-3)
    torch_losses, forced_diffs = [], []
    for ids in order:
        # jaxae's step taken from exactly torch's current weights and Adam moments
        params = convert.params_from_torch(numpy_state_dict(reference), start.params)
        forced = start.replace(
            params=params, opt_state=_adam_state_from_torch(start.opt_state, reference, opt, start.params)
        )
        forced, _ = step_without_donation(forced, images[ids])

        x = torch.from_numpy(normalized(sample_train.images[ids], preset))
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(reference(x), x)
        loss.backward()
        opt.step()
        torch_losses.append(loss.item())
        forced_diffs.append(
            max(max_abs_diffs(convert.to_numpy_state_dict(forced.params), numpy_state_dict(reference)).values())
        )

    state, jax_losses = start, []
    for ids in order:
        state, metrics = trainer.jit_train_step(state, images[ids])
        jax_losses.append(float(metrics["loss"]))
    return {
        "initial": initial,
        "torch_final": numpy_state_dict(reference),
        "jax_final": convert.to_numpy_state_dict(state.params),
        "torch_losses": np.array(torch_losses),
        "jax_losses": np.array(jax_losses),
        "forced_step_diffs": np.array(forced_diffs),
    }


FORWARD_CASES = [
    pytest.param(case.values[0], weights, id=f"{case.id}-{weights}")
    for case in TWIN_CONFIGS
    for weights in ("fresh", "trained")
    if weights == "fresh" or (case.values[0].variant in DOCUMENT_LAYOUT and case.values[0].arch == "mlp")
]
# The preset only scales the inputs: the conv twins, slow to compile, take the gradient and
# Adam tests with one (and the forward test with both).
LOSS_CASES = [
    pytest.param(case.values[0], preset, id=f"{case.id}-{preset}")
    for case in TWIN_CONFIGS
    for preset in ("unit", "seed")
    if case.values[0].arch == "mlp" or preset == "unit"
]


@pytest.mark.parametrize("preset", ["unit", "seed"])
@pytest.mark.parametrize("config, weights", FORWARD_CASES)
def test_forward_outputs_match_on_the_whole_test_split(config, weights, preset, sample_test, trained_pair):
    config = dataclasses.replace(config, normalize=preset)
    reference = torch_twin(config)
    if weights == "trained":
        # trained on [0, 1] inputs: trained on [-1, 1] the outputs collapse to ~0 (see README)
        reference.load_state_dict({k: torch.from_numpy(v) for k, v in trained_pair["torch_final"].items()})
    x = normalized(sample_test.images, preset)
    assert x.shape == (1000, 784) and x.dtype == np.float32
    expected = torch_views(reference, x)
    model = jaxae.from_torch(reference.state_dict(), config=config)
    got = jax.device_get(flax_views(model, jnp.asarray(x)))
    assert sorted(got) == sorted(expected) and len(got) == (3 if jaxae.get_variant(config.variant).variational else 2)
    for name in expected:
        assert got[name].shape == expected[name].shape and got[name].dtype == np.float32, name
        # 1e-6, relative where values exceed 1: float32 rounding scales with them (trained codes reach ~5)
        tolerance = 1e-6 * max(1.0, float(np.max(np.abs(expected[name]))))
        diff = float(np.max(np.abs(got[name] - expected[name])))
        assert diff <= tolerance, (name, diff, tolerance)
        # the values vary 1000x more than the tolerance: the models really compute, and the same thing
        assert np.std(expected[name]) > 1e-3, name
    assert got["reconstruction"].shape == (1000, 784)

    report = jaxae.parity_report(numpy_state_dict(reference), model, sample_test.images, config)
    assert report["passed"] and report["examples"] == 1000
    assert (report["variant"], report["arch"]) == (config.variant, config.arch)
    diff = float(np.max(np.abs(got["reconstruction"] - expected["reconstruction"])))
    assert report["max_abs_diff_outputs"] == pytest.approx(diff, abs=1e-9)
    assert report["max_abs_diff_parameters"] == 0.0 and list(report["max_abs_diff_per_parameter"]) == list(
        reference.state_dict()
    )
    assert report["mse_torch"] == pytest.approx(report["mse_flax"], rel=1e-5)


def _variant_loss_setup(config, images):
    """Normalised inputs, the variant's objective, and its noise fixed for both frameworks."""
    x = normalized(images, config.normalize)
    objective = jaxae.get_variant(config.variant).build_objective(config, get_normalization(config.normalize))
    keys = fixed_keys(len(x))
    return x, objective, keys, fixed_noise(config, objective, x, keys)


def float64_gradients(config, reference, x, noise):
    """The gradients of the twin's loss in float64 (a copy of ``reference``, the same noise): the
    measure of either framework's float32 rounding."""
    exact = copy.deepcopy(reference).double()
    exact.zero_grad()
    noise64 = {k: v.astype(np.float64) for k, v in noise.items()}
    torch_loss(config, exact, torch.from_numpy(np.asarray(x, np.float64)), noise64).backward()
    return {k: p.grad.numpy() for k, p in exact.named_parameters()}


@pytest.mark.parametrize("config, preset", LOSS_CASES)
def test_gradients_of_the_variant_loss_match(config, preset, sample_train):
    config = dataclasses.replace(config, normalize=preset)
    reference = torch_twin(config, seed=2)
    x, objective, keys, noise = _variant_loss_setup(config, sample_train.images[: batch_size_for(config)])
    torch_loss(config, reference, torch.from_numpy(x), noise).backward()
    expected = {k: p.grad.numpy() for k, p in reference.named_parameters()}

    model = jaxae.from_torch(reference.state_dict(), config=config)
    graphdef, params = nnx.split(model)

    @jax.jit
    def grads(params, x, keys):
        return jax.grad(lambda p: jnp.mean(objective.loss(nnx.merge(graphdef, p), x, keys)[0]))(params)

    got = convert.to_numpy_state_dict(
        nnx.to_pure_dict(grads(params, jnp.asarray(x), keys)), config.variant, config.arch
    )
    # state no gradient trains (the VQ-VAE's codebook, torch buffers) gets none
    buffers = set(got) - set(expected)
    assert buffers == {k for k, _ in reference.named_buffers()}
    assert all(not np.any(got[k]) for k in buffers), buffers
    got = {k: got[k] for k in expected}
    diffs = max_abs_diffs(got, expected)
    # 1e-5, relative where a parameter's gradients exceed 1: the VAE's loss is a sum over the
    # 784 pixels (nats per image), its decoder's bias gradients reach ~270, and PyTorch against
    # itself with the batch rows permuted differs by 6e-5 there
    scale = {k: max(1.0, float(np.abs(g).max())) for k, g in expected.items()}
    # Where PyTorch's own float32 rounding exceeds that bar (the IWAE's softmax-weighted sums: on
    # an AMD EPYC the conv IWAE's last bias gradient, 268, is 3.5e-3 off the float64 loss's in
    # PyTorch and 8e-7 off in jaxae), the bar is that rounding: jaxae within 4x of PyTorch's
    # distance to the float64 gradients, as in the three-stage test below.
    exact = float64_gradients(config, reference, x, noise)
    rounding, to_exact = max_abs_diffs(expected, exact), max_abs_diffs(got, exact)
    assert all(diffs[k] <= 1e-5 * scale[k] or to_exact[k] <= 4 * rounding[k] + 1e-7 for k in diffs), {
        k: (diffs[k], scale[k], to_exact[k], rounding[k]) for k in diffs
    }
    assert all(np.abs(g).max() > 0 for g in expected.values())  # every parameter gets a gradient


@pytest.mark.parametrize("config, preset", LOSS_CASES)
def test_one_adam_step_matches_torch_optim_adam(config, preset, sample_train):
    config = dataclasses.replace(config, normalize=preset)
    reference = torch_twin(config, seed=4)
    before = numpy_state_dict(reference)
    batch = sample_train.images[256 : 256 + batch_size_for(config)]
    x, objective, keys, noise = _variant_loss_setup(config, batch)
    opt = torch.optim.Adam(reference.parameters(), lr=1e-3)
    loss = torch_loss(config, reference, torch.from_numpy(x), noise)
    loss.backward()
    gradients = {k: p.grad.numpy().copy() for k, p in reference.named_parameters()}
    # what no gradient trains (the VQ-VAE's EMA codebook), from the same draws as jaxae's
    torch_reference.update_state(reference, torch.from_numpy(x), config, share=fixed_share(config, reference, keys))
    opt.step()

    # jaxae's own train step (uint8 batch in, normalisation inside, optax.adam), its noise fixed
    fixed = dataclasses.replace(objective, loss=lambda model, x, _: objective.loss(model, x, keys))
    model = jaxae.from_torch(before, config=config)
    trainer, state = jaxae.create_train_state(model, optax.adam(1e-3), fixed, preset)
    state, metrics = trainer.jit_train_step(state, jnp.asarray(batch))
    after = convert.to_numpy_state_dict(state.params, config.variant, config.arch)
    stepped = numpy_state_dict(reference)
    if (config.variant, config.arch) == ("vanilla", "mlp"):
        diffs = max_abs_diffs(after, stepped)
        assert max(diffs.values()) <= 1e-6, diffs  # README's figure for the document's model
    # Adam's first step is lr * g / (|g| + eps): for a gradient within ~100 eps (1e-6) of zero it
    # divides the gradient's rounding by eps = 1e-8, and the step differs visibly (PyTorch against
    # itself with the batch rows permuted: up to 4.9e-6, README). Everywhere else: 1e-6. The
    # IWAE's gradients are sums weighted by a softmax over K samples, whose rounding is about 10x
    # the VAE's: "near zero" is 10x wider there. A gradient below eps itself is its own rounding,
    # and its step anything up to lr: there only the step's bound holds.
    near_zero = 1e-5 if config.variant == "iwae" else 1e-6
    for k in set(stepped) - set(gradients):  # buffers: the EMA codebook, set alike
        assert np.abs(after[k].astype(np.float64) - stepped[k]).max() <= 1e-6 * max(1.0, np.abs(stepped[k]).max()), k
    for k in gradients:
        diff = np.abs(after[k].astype(np.float64) - stepped[k])
        firm = np.abs(gradients[k]) >= near_zero
        assert diff[firm].max(initial=0.0) <= 1e-6, (k, diff[firm].max())
        above_eps = np.abs(gradients[k]) >= 1e-8 * near_zero / 1e-6
        assert diff[above_eps].max(initial=0.0) <= 1e-4, (k, diff.max())  # a tenth of lr
        assert diff.max() <= 2e-3 + 1e-6, (k, diff.max())  # two steps of lr: opposite signs at most
        assert above_eps.any(), k
        # A fresh VQ-VAE's first decoder layer reads codes of the codebook's initial scale (1/K),
        # so all its gradients are below 1e-6: it is held to the bounds above, not this one.
        assert firm.any() or (config.variant, k) == ("vqvae", "decoder.0.weight"), k
    assert float(metrics["loss"]) == pytest.approx(loss.item(), rel=1e-6)
    # the step really moved the weights (by about lr), so the comparison means something
    moved = max_abs_diffs(numpy_state_dict(reference), before)
    assert min(moved.values()) > 5e-4


@pytest.mark.parametrize(
    "settings",
    [
        {"variant": "vae", "likelihood": "gaussian", "beta": 0.5, "normalize": "seed"},
        {"variant": "denoising", "mask_prob": 0.3, "noise_std": 0.2},
        {"variant": "sparse", "sparsity": "kl", "sparsity_weight": 0.5, "sparsity_target": 0.1},
    ],
    ids=["vae-gaussian", "denoising-masked", "sparse-kl-weighted"],
)
def test_torch_variant_loss_is_jaxae_s_objective(settings, sample_train):
    config = TrainConfig(**settings)
    reference = torch_twin(config, seed=9)
    x, objective, keys, noise = _variant_loss_setup(config, sample_train.images[:128])
    model = jaxae.from_torch(reference.state_dict(), config=config)
    expected = float(jnp.mean(objective.loss(model, jnp.asarray(x), keys)[0]))
    with torch.no_grad():
        assert torch_loss(config, reference, torch.from_numpy(x), noise).item() == pytest.approx(expected, rel=1e-6)
        # its own draws (for training in PyTorch) give a loss of the same size
        torch.manual_seed(0)
        drawn = torch_reference.variant_loss(reference, torch.from_numpy(x), config).item()
    assert drawn == pytest.approx(expected, rel=0.05)


def test_100_step_training_trajectories_match(trained_pair):
    run = trained_pair
    rel = np.abs(run["jax_losses"] - run["torch_losses"]) / run["torch_losses"]
    assert rel.max() <= 1e-4, rel.max()
    # Every one of the 100 steps, taken from torch's weights and Adam moments, lands where torch's does.
    assert run["forced_step_diffs"].max() <= 1e-6, run["forced_step_diffs"].max()
    # Run freely, the two trajectories stay within 1e-4 except where a ReLU input sits within
    # rounding of 0 and flips: a few weights then differ more, as they do between two PyTorch
    # runs from weights 1 ulp apart (README, "Coming from PyTorch").
    diff = np.concatenate([np.abs(run["jax_final"][k] - run["torch_final"][k]).ravel() for k in run["torch_final"]])
    assert np.mean(diff <= 1e-4) >= 0.99, np.mean(diff <= 1e-4)
    assert diff.max() <= 1e-2, diff.max()
    travelled = np.sqrt(sum(np.sum(np.square(run["torch_final"][k] - run["initial"][k])) for k in run["initial"]))
    assert np.sqrt(np.sum(np.square(diff))) <= 1e-2 * travelled
    # training happened: the loss fell and the weights moved far beyond the tolerance
    assert run["torch_losses"][-1] < 0.7 * run["torch_losses"][0]
    assert max(max_abs_diffs(run["torch_final"], run["initial"]).values()) > 1e-2


# --- round trips ----------------------------------------------------------------------------------


@pytest.mark.parametrize("config", TWIN_CONFIGS)
def test_torch_to_flax_to_torch_is_exact(config, tmp_path):
    variant, arch = config.variant, config.arch
    reference = torch_twin(config, seed=5)
    original = reference.state_dict()
    back = jaxae.to_torch_state_dict(jaxae.from_torch(original, config=config), variant, arch)
    assert list(back) == list(original)
    for k in original:
        assert back[k].dtype == torch.float32 and back[k].is_contiguous()
        assert torch.equal(back[k], original[k]), k
    fresh = torch_twin(config, seed=6)
    assert str(fresh.load_state_dict(back, strict=True)) == "<All keys matched successfully>"

    # and through files of each kind
    for name, save in (
        ("m.pt", lambda p: torch.save(original, p)),
        ("m.pth", lambda p: torch.save(original, p)),
        ("m.safetensors", lambda p: convert.save_state_dict(numpy_state_dict(reference), p, "safetensors")),
    ):
        save(tmp_path / name)
        again = jaxae.to_torch_state_dict(jaxae.from_torch(tmp_path / name, variant, arch=arch), variant, arch)
        assert all(torch.equal(again[k], original[k]) for k in original), name


@pytest.mark.parametrize("config", TWIN_CONFIGS)
def test_flax_to_torch_to_flax_is_exact(config):
    model = jaxae.get_variant(config.variant).build_model(config, 784, nnx.Rngs(7))
    state_dict = jaxae.to_torch_state_dict(model, config.variant, config.arch)
    assert list(state_dict) == list(torch_twin(config).state_dict())
    restored = jaxae.from_torch(state_dict, config=config)
    a, b = nnx.to_pure_dict(nnx.state(model)), nnx.to_pure_dict(nnx.state(restored))
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_from_torch_accepts_dicts_checkpoints_and_other_sizes(tmp_path, sample_test):
    reference = torch_reference.Autoencoder()
    x = sample_test.images[:7].reshape(7, -1).astype(np.float32) / 255
    with torch.no_grad():
        expected = reference(torch.from_numpy(x)).numpy()
    sources = [numpy_state_dict(reference), {"epoch": 3, "model_state_dict": reference.state_dict()}]
    torch.save(sources[1], tmp_path / "ckpt.pt")
    for source in [*sources, tmp_path / "ckpt.pt", str(tmp_path / "ckpt.pt")]:
        model = jaxae.from_torch(source)
        assert isinstance(model, jaxae.Autoencoder)
        np.testing.assert_allclose(model(jnp.asarray(x)), expected, atol=1e-6)

    config = TrainConfig(hidden_dims=(256, 100, 48), latent_dim=16)
    other = torch_twin(config)
    assert list(other.state_dict())[-1] == "decoder.6.bias"
    model = jaxae.from_torch(other.state_dict(), config=config)
    assert model.encode(jnp.asarray(x)).shape == (7, 16)
    with torch.no_grad():
        np.testing.assert_allclose(model(jnp.asarray(x)), other(torch.from_numpy(x)).numpy(), atol=1e-6)
    # the sizes are in the tensors: no flags needed, and flags given are checked against them
    inferred = jaxae.from_torch(other.state_dict())
    assert inferred.encode(jnp.asarray(x)).shape == (7, 16)
    with pytest.raises(
        jaxae.JaxaeError, match=r"--hidden-dims 128,64 does not match .*its tensors give --hidden-dims 256,100,48"
    ):
        jaxae.from_torch(other.state_dict(), hidden_dims=(128, 64))
    wider = torch_twin(TrainConfig(hidden_dims=(256, 64)))
    with pytest.raises(jaxae.JaxaeError, match=r"--latent-dim 16 does not match .*its tensors give --latent-dim 32"):
        jaxae.from_torch(wider.state_dict(), latent_dim=16)


def test_key_map_registry():
    with pytest.raises(jaxae.JaxaeError, match="unknown variant 'gan'"):
        jaxae.from_torch({}, "gan")
    with pytest.raises(
        jaxae.JaxaeError, match=r"the sparse variant with --arch conv has no PyTorch twin.*vae \(mlp, conv\)"
    ):
        convert.get_twin("sparse", "conv")
    # every (variant, arch) the trainer builds has a twin
    assert set(jaxae.TWINS) == {(v.name, a) for v in jaxae.VARIANTS.values() for a in v.archs}
    params = nnx.to_pure_dict(nnx.state(jaxae.Autoencoder(rngs=nnx.Rngs(0))))
    links = convert.links_for(jaxae.TWINS[("vanilla", "mlp")], params)
    assert [link.torch_key for link in links] == DOCUMENT_KEYS
    assert links[0].flax_path == ("encoder", "layers", 0, "kernel") and links[0].to_flax == (1, 0)
    broken = convert.TorchTwin("vanilla", lambda p, shape: links[:-1], convert.TWINS[("vanilla", "mlp")].torch_module)
    with pytest.raises(jaxae.JaxaeError, match="the vanilla mlp key map does not cover .*decoder/layers/4/bias"):
        convert.links_for(broken, params)
    # a VAE's parameters given as a vanilla model's: a clear error, not a KeyError
    vae = jaxae.get_variant("vae").build_model(TrainConfig(variant="vae"), 784, nnx.Rngs(0))
    with pytest.raises(jaxae.JaxaeError, match="does not cover .*logvar/bias.*give the variant and arch"):
        jaxae.to_torch_state_dict(vae)

    # conv: the Linear layers beside the flatten reorder PyTorch's (c, h, w) features to Flax's (h, w, c)
    conv = jaxae.get_variant("vae").build_model(TrainConfig(variant="vae", arch="conv"), 784, nnx.Rngs(0))
    links = {
        link.torch_key: link
        for link in convert.links_for(jaxae.TWINS[("vae", "conv")], nnx.to_pure_dict(nnx.state(conv)))
    }
    assert links["encoder.0.weight"].to_flax == (2, 3, 1, 0) and links["decoder.2.weight"].to_flax == (2, 3, 1, 0)
    assert (links["mean.weight"].chw, links["mean.weight"].chw_axis, links["mean.bias"].chw) == ((32, 7, 7), 1, None)
    assert (links["project.weight"].chw, links["project.weight"].chw_axis) == ((32, 7, 7), 0)
    assert links["project.bias"].chw == (32, 7, 7)
    chw = np.arange(32 * 7 * 7, dtype=np.float32).reshape(32, 7, 7)  # feature (c, h, w) holds its torch index
    np.testing.assert_array_equal(links["project.bias"].torch_to_flax(chw.ravel()), chw.transpose(1, 2, 0).ravel())
    weight = np.random.default_rng(0).normal(size=(32, 32 * 7 * 7)).astype(np.float32)
    link = links["mean.weight"]
    np.testing.assert_array_equal(link.flax_to_torch(link.torch_to_flax(weight)), weight)


def test_init_params_from_a_checkpoint_with_a_fresh_optimizer(tmp_path):
    trainer, state = build(TrainConfig(seed=1), 784)
    trainer0, trained = build(TrainConfig(seed=9), 784)
    trained, _ = trainer0.jit_train_step(trained, jnp.zeros((8, 784), jnp.uint8))
    checkpoint.save(tmp_path, trained, TrainConfig(seed=9))
    started = init_params_from(tmp_path, trainer, state)
    for a, b in zip(jax.tree.leaves(started.params), jax.tree.leaves(trained.params), strict=True):
        np.testing.assert_array_equal(a, b)
    assert int(started.step) == 0 and int(trained.step) == 1
    assert all(float(jnp.abs(leaf).max()) == 0 for leaf in jax.tree.leaves(started.opt_state) if leaf.ndim)
    trainer2, other = build(TrainConfig(hidden_dims=(128, 48)), 784)
    with pytest.raises(
        jaxae.JaxaeError, match=r"\['decoder'\]\['layers'\]\[0\]\['bias'\]: \(64,\) there, \(48,\) here"
    ):
        init_params_from(tmp_path, trainer2, other)


# --- any image shape: colour and non-square images ------------------------------------------------

# Small sizes keep these fast; the (c, h, w) <-> (h, w, c) reorder is what they prove.
SHAPE_SIZES = {"hidden_dims": (24, 12), "latent_dim": 6}
IMAGE_SHAPES = [(16, 16, 3), (8, 16, 3), (12, 8, 1)]


def nchw_flat(x_nhwc):
    """A PyTorch user's batch: the NHWC images as NCHW, flattened (c, h, w) as ``x.view(N, -1)``."""
    return np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)).reshape(len(x_nhwc), -1)


def nhwc_flat(y_chw, image_shape):
    """The twin's flat (c, h, w) outputs in jaxae's (h, w, c) order."""
    h, w, c = image_shape
    return y_chw.reshape(len(y_chw), c, h, w).transpose(0, 2, 3, 1).reshape(len(y_chw), -1)


@pytest.mark.parametrize("image_shape", IMAGE_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("config", TWIN_CONFIGS)
def test_any_image_shape_converts_exactly_both_ways(config, image_shape):
    config = dataclasses.replace(config, **SHAPE_SIZES)
    variant, arch = config.variant, config.arch
    twin = jaxae.TWINS[(variant, arch)]
    # Flax -> torch: the twin computes what the Flax model does, each on its own layout
    model = jaxae.get_variant(variant).build_model(config, image_shape, nnx.Rngs(3))
    state_dict = jaxae.to_torch_state_dict(model, variant, arch, image_shape=image_shape)
    module = twin.torch_module(config, image_shape)
    assert str(module.load_state_dict(state_dict, strict=True)) == "<All keys matched successfully>"
    x = np.random.default_rng(1).random((5, *image_shape), dtype=np.float32)  # NHWC
    got = jax.device_get(flax_views(model, jnp.asarray(x)))
    expected = torch_views(module, nchw_flat(x))
    expected["reconstruction"] = nhwc_flat(expected["reconstruction"], image_shape)
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=0, atol=1e-5, err_msg=name)
        assert np.std(expected[name]) > 1e-3, name  # the models compute something that varies
    # torch -> Flax gives the exact parameters back
    back = jaxae.from_torch(state_dict, config=config, image_shape=image_shape)
    a, b = nnx.to_pure_dict(nnx.state(model)), nnx.to_pure_dict(nnx.state(back))
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for p, q in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(p, q)
    # and a twin PyTorch initialised goes to Flax and back bit for bit
    torch.manual_seed(4)
    original = twin.torch_module(config, image_shape).state_dict()
    again = jaxae.to_torch_state_dict(
        jaxae.from_torch(original, config=config, image_shape=image_shape), variant, arch, image_shape=image_shape
    )
    assert list(again) == list(original) and all(torch.equal(again[k], original[k]) for k in original)


def test_one_channel_images_keep_today_s_layout():
    # for C = 1 the (c, h, w) and (h, w, c) orders are one order: the weights are copied as they are
    reference = torch_reference.MLPAutoencoder(12 * 8, (24, 12), 6)
    model = jaxae.from_torch(reference.state_dict(), image_shape=(12, 8, 1))
    kernel = np.asarray(model.encoder.layers[0].kernel[...])
    np.testing.assert_array_equal(kernel, reference.state_dict()["encoder.0.weight"].numpy().T)
    # for C = 3 the image-facing weights are reordered: pixel (h, w, c) of jaxae is (c, h, w) of torch
    colour = torch_reference.MLPAutoencoder(8 * 12 * 3, (24, 12), 6)
    weight = colour.state_dict()["encoder.0.weight"].numpy()  # [24, 3 * 8 * 12], (c, h, w) inputs
    model = jaxae.from_torch(colour.state_dict(), image_shape=(8, 12, 3))
    kernel = np.asarray(model.encoder.layers[0].kernel[...])  # [(h, w, c), 24]
    np.testing.assert_array_equal(kernel.reshape(8, 12, 3, 24), weight.reshape(24, 3, 8, 12).transpose(2, 3, 1, 0))
    out_w = colour.state_dict()["decoder.4.weight"].numpy()  # [3 * 8 * 12, 24]
    out_k = np.asarray(model.decoder.layers[4].kernel[...])  # [24, (h, w, c)]
    np.testing.assert_array_equal(out_k.reshape(24, 8, 12, 3), out_w.reshape(3, 8, 12, 24).transpose(3, 1, 2, 0))


def _one_line(excinfo, *parts):
    message = str(excinfo.value)
    assert "\n" not in message and all(part in message for part in parts), message


def test_match_takes_the_image_shape_the_tensors_leave_open_and_checks_a_given_one():
    colour = torch_reference.MLPAutoencoder(32 * 32 * 3, (24, 12), 6).state_dict()
    with pytest.raises(jaxae.JaxaeError) as e:
        convert.match(colour)
    _one_line(e, "takes 3072 inputs (32x32x3?)", "give the image shape (--image-shape H,W,C", "e.g. 32,32,3")
    found = convert.match(colour, image_shape=(32, 32, 3))
    assert found.image_shape == (32, 32, 3) and found.input_dim == 3072
    assert "32x32x3 images, 3072-24-12-6" in found.description
    wide = convert.match(colour, image_shape=[48, 64, 1])  # the tensors allow it: the user says so
    assert wide.image_shape == (48, 64, 1)
    with pytest.raises(jaxae.JaxaeError) as e:
        convert.match(colour, image_shape=(28, 28, 1))
    _one_line(e, "takes 3072 inputs (32x32x3?) but the image shape given is 28x28x1")
    with pytest.raises(jaxae.JaxaeError) as e:
        convert.match(colour, input_dim=3072)  # the older keyword: a size, not a shape
    _one_line(e, "input_dim 3072 does not say the image shape")
    with pytest.raises(jaxae.JaxaeError) as e:
        convert.match(colour, image_shape=(32, 32))
    _one_line(e, "image_shape must be (H, W, C)")
    with pytest.raises(jaxae.JaxaeError) as e:
        jaxae.from_torch(colour, image_shape=(32, 32, 3), input_dim=784)
    _one_line(e, "input_dim 784 and image_shape (32, 32, 3) disagree")
    # a square one-channel input is read as before, and input_dim still works
    document = torch_reference.Autoencoder().state_dict()
    assert convert.match(document).image_shape == (28, 28, 1)
    assert convert.match(document, input_dim=784).image_shape == (28, 28, 1)
    with pytest.raises(jaxae.JaxaeError, match="takes inputs of 784 values, not 3072"):
        convert.match(document, input_dim=3072)

    # conv: only the tutorial's 28x28x1 is taken untold; square features are a hint, not an answer
    # (64 feature positions come from 32x32 or from 16x64 images)
    assert convert.match(torch_reference.ConvAutoencoder().state_dict()).image_shape == (28, 28, 1)
    square = torch_reference.ConvAutoencoder((16, 16, 3), latent_dim=6).state_dict()
    with pytest.raises(jaxae.JaxaeError) as e:
        convert.match(square)
    _one_line(e, "takes 3-channel images of (H/4)*(W/4) = 16 (16x16x3?); give the image shape")
    assert convert.match(square, image_shape=(16, 16, 3)).image_shape == (16, 16, 3)
    # a square one-channel MLP input other than 784 may be a colour image: 576 = 24x24x1 = 16x12x3
    with pytest.raises(jaxae.JaxaeError) as e:
        convert.match(torch_reference.MLPAutoencoder(576, (24,), 6).state_dict())
    _one_line(e, "takes 576 inputs (24x24x1?); give the image shape")
    with pytest.raises(jaxae.JaxaeError) as e:
        convert.match(colour, image_shape=(3, 32, 32))  # channels first, as torch holds images
    _one_line(e, "image_shape 3x32x32", "channels-first", "np.transpose")
    wide = torch_reference.ConvVAE((16, 12, 3), latent_dim=6).state_dict()
    with pytest.raises(jaxae.JaxaeError) as e:
        convert.match(wide)
    _one_line(e, "takes 3-channel images of (H/4)*(W/4) = 12", "--image-shape H,W,C")
    found = convert.match(wide, image_shape=(16, 12, 3))
    assert found.image_shape == (16, 12, 3) and "16x12x3 images" in found.description
    for bad in [(16, 12, 1), (20, 12, 3), (18, 12, 3)]:  # channels; feature positions; sides not divisible by 4
        with pytest.raises(jaxae.JaxaeError) as e:
            convert.match(wide, image_shape=bad)
        _one_line(e, "takes 3-channel images of (H/4)*(W/4) = 12", f"given is {'x'.join(map(str, bad))}")


def test_params_without_an_image_shape_are_read_only_when_unambiguous():
    config = TrainConfig(**SHAPE_SIZES)
    params = nnx.to_pure_dict(nnx.state(jaxae.get_variant("vanilla").build_model(config, (16, 16, 3), nnx.Rngs(0))))
    with pytest.raises(jaxae.JaxaeError) as e:
        jaxae.to_torch_state_dict(params)
    _one_line(e, "the vanilla mlp model takes 768 inputs (16x16x3?); give its image_shape")
    with pytest.raises(jaxae.JaxaeError) as e:
        convert.to_numpy_state_dict(params, image_shape=(16, 16, 1))
    _one_line(e, "takes 768 inputs (16x16x3?) but image_shape is 16x16x1")
    links = convert.links_for(jaxae.TWINS[("vanilla", "mlp")], params, (16, 16, 3))
    assert (links[0].chw, links[0].chw_axis, links[-2].chw, links[-1].chw) == ((3, 16, 16), 1, (3, 16, 16), (3, 16, 16))
    # a conv module carries its image shape: non-square features need nothing more
    conv = jaxae.get_variant("vae").build_model(TrainConfig(variant="vae", arch="conv"), (8, 16, 3), nnx.Rngs(0))
    conv_params = nnx.to_pure_dict(nnx.state(conv))
    links = {link.torch_key: link for link in convert.links_for(jaxae.TWINS[("vae", "conv")], conv_params, (8, 16, 3))}
    assert links["mean.weight"].chw == (32, 2, 4) and links["project.bias"].chw == (32, 2, 4)
    assert list(jaxae.to_torch_state_dict(conv, "vae", "conv")) == list(links)
    with pytest.raises(jaxae.JaxaeError) as e:
        jaxae.to_torch_state_dict(conv_params, "vae", "conv")
    _one_line(e, "takes 3-channel images of (H/4)*(W/4) = 8; give its image_shape")
    with pytest.raises(jaxae.JaxaeError) as e:
        jaxae.to_torch_state_dict(conv, "vae", "conv", image_shape=(16, 8, 3))
    _one_line(e, "does not match the model's, (8, 16, 3)")


@pytest.mark.parametrize("variant, arch, image_shape", [("vanilla", "mlp", (16, 16, 3)), ("vae", "conv", (8, 16, 3))])
def test_parity_report_feeds_each_framework_its_own_layout(variant, arch, image_shape):
    config = TrainConfig(variant=variant, arch=arch, **SHAPE_SIZES)
    torch.manual_seed(2)
    module = jaxae.TWINS[(variant, arch)].torch_module(config, image_shape)
    state_dict = numpy_state_dict(module)
    model = jaxae.from_torch(state_dict, config=config, image_shape=image_shape)
    images = np.random.default_rng(3).integers(0, 256, (9, *image_shape), dtype=np.uint8)
    report = jaxae.parity_report(state_dict, model, images, config)
    assert report["passed"] and report["max_abs_diff_parameters"] == 0.0, report
    assert report["max_abs_diff_outputs"] <= 1e-6 and report["mse_torch"] == pytest.approx(report["mse_flax"], rel=1e-6)
    # the report's torch side is what a PyTorch user computes on NCHW images
    x = images.astype(np.float32) / np.float32(255)
    with torch.no_grad():
        y = nhwc_flat(module(torch.from_numpy(nchw_flat(x))).numpy(), image_shape)
    assert report["mse_torch"] == pytest.approx(
        float(np.mean(np.square(y.astype(np.float64) - x.reshape(9, -1)))), rel=1e-6
    )
    h, w, c = image_shape
    with pytest.raises(jaxae.JaxaeError) as e:
        jaxae.parity_report(
            state_dict, model, np.zeros((2, w, h, c) if arch == "conv" else (2, h, w, 1), np.uint8), config
        )
    assert "\n" not in str(e.value)


# --- the command line -------------------------------------------------------------------------------


def _one_line_error(capsys, code, pattern):
    captured = capsys.readouterr()
    assert code == 2, captured
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("jaxae: error: ") and pattern in lines[0], lines[0]
    assert "Traceback" not in captured.err


def test_cli_convert_check_evaluate_export_and_fine_tune(tmp_path, capsys, trained_pair, sample_test, idx_folder):
    weights = trained_pair["torch_final"]
    reference = torch_reference.Autoencoder()
    reference.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    torch.save(reference.state_dict(), tmp_path / "model.pt")
    out = tmp_path / "converted"

    assert cli.main(["convert", str(tmp_path / "model.pt"), "--out", str(out), "--check"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] and report["dataset"] == "mnist-sample" and report["examples"] == 1000
    assert report["max_abs_diff_outputs"] <= 1e-6 and report["max_abs_diff_parameters"] == 0
    assert set(report["max_abs_diff_per_parameter"]) == set(DOCUMENT_KEYS)
    assert json.loads((out / "parity.json").read_text())["passed"]

    # evaluate sees the torch model's test MSE
    assert cli.main(["evaluate", "--workdir", str(out)]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    x = torch.from_numpy(normalized(sample_test.images, "unit"))
    with torch.no_grad():
        torch_mse = torch.nn.functional.mse_loss(reference(x), x).item()
    assert evaluated["test_mse"] == pytest.approx(torch_mse, rel=1e-5)
    assert evaluated["step"] == 0

    # export gives back the same state_dict, in both formats, loadable with strict=True
    for name, extra in (("back.pt", []), ("back.safetensors", []), ("st.bin", ["--format", "safetensors"])):
        assert cli.main(["export", "--workdir", str(out), "--out", str(tmp_path / name), *extra]) == 0
        capsys.readouterr()
        loaded = jaxae.read_state_dict(tmp_path / name)
        assert sorted(loaded) == sorted(DOCUMENT_KEYS)  # safetensors stores keys sorted
        fresh = torch_reference.Autoencoder()
        fresh.load_state_dict({k: torch.from_numpy(v) for k, v in loaded.items()}, strict=True)
        assert all(torch.equal(fresh.state_dict()[k], reference.state_dict()[k]) for k in DOCUMENT_KEYS), name
    assert list(torch.load(tmp_path / "back.pt", weights_only=True)) == DOCUMENT_KEYS

    # fine-tuning starts from the converted weights: with a negligible lr nothing moves
    run = tmp_path / "finetune"
    args = ["train", "--init-from", str(out), "--dataset", "mnist-sample", "--epochs", "1", "--no-progress"]
    assert cli.main([*args, "--lr", "1e-12", "--workdir", str(run)]) == 0
    tuned = json.loads(capsys.readouterr().out)
    assert tuned["test_mse"] == pytest.approx(torch_mse, rel=1e-5)
    # and with the document's lr it keeps improving on them, far below a fresh start
    assert (
        cli.main(
            [
                "train",
                "--init-from",
                str(out),
                "--dataset",
                str(idx_folder),
                "--epochs",
                "1",
                "--batch-size",
                "64",
                "--no-progress",
                "--workdir",
                str(tmp_path / "ft2"),
            ]
        )
        == 0
    )
    tuned = json.loads(capsys.readouterr().out)
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
                "--no-progress",
                "--workdir",
                str(tmp_path / "scratch"),
            ]
        )
        == 0
    )
    scratch = json.loads(capsys.readouterr().out)
    assert tuned["test_mse"] < 0.8 * scratch["test_mse"]


@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_cli_convert_check_a_vae(arch, tmp_path, capsys, sample_test):
    reference = torch_twin(TrainConfig(variant="vae", arch=arch), seed=8)
    torch.save(reference.state_dict(), tmp_path / "vae.pt")
    out = tmp_path / "converted"
    # without the right --variant/--arch: one line saying what the file holds
    what = {"mlp": "--variant vae", "conv": "--variant vae --arch conv"}[arch]
    code = cli.main(["convert", str(tmp_path / "vae.pt"), "--out", str(out), "--variant", "vanilla"])
    _one_line_error(capsys, code, f"VAE's weights: give {what}")
    assert not out.exists()

    assert cli.main(["convert", str(tmp_path / "vae.pt"), "--out", str(out), *what.split(), "--check"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] and (report["variant"], report["arch"], report["examples"]) == ("vae", arch, 1000)
    assert report["max_abs_diff_outputs"] <= 1e-6 and report["max_abs_diff_parameters"] == 0
    assert list(report["max_abs_diff_per_parameter"]) == list(reference.state_dict())
    assert json.loads((out / "config.json").read_text())["arch"] == arch
    # evaluate rebuilds the VAE from the checkpoint: PyTorch's posterior-mean reconstruction error
    assert cli.main(["evaluate", "--workdir", str(out)]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    x = torch.from_numpy(normalized(sample_test.images, "unit"))
    with torch.no_grad():
        torch_mse = torch.nn.functional.mse_loss(reference(x), x).item()
    assert evaluated["test_mse_pixels"] == pytest.approx(torch_mse, rel=1e-5)

    assert cli.main(["export", "--workdir", str(out), "--out", str(tmp_path / "back.pt")]) == 0
    assert json.loads(capsys.readouterr().out)["variant"] == "vae"
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    assert list(back) == list(reference.state_dict())
    assert all(torch.equal(back[k], v) for k, v in reference.state_dict().items())


def test_cli_convert_sparse_takes_the_code_activation_it_was_trained_with(tmp_path, capsys, sample_test):
    # A KL-sparse model has a Sigmoid code: its state_dict is the document's, so only --sparsity
    # tells the converter which code activation the model applies (and --check cannot tell).
    reference = torch_twin(TrainConfig(variant="sparse", sparsity="kl"), seed=3)
    torch.save(reference.state_dict(), tmp_path / "sparse.pt")
    x = normalized(sample_test.images[:100], "unit")
    with torch.no_grad():
        expected = reference(torch.from_numpy(x)).numpy()
    for sparsity, matches in (("kl", True), ("l1", False)):
        out = tmp_path / sparsity
        args = [
            "convert",
            str(tmp_path / "sparse.pt"),
            "--variant",
            "sparse",
            "--sparsity",
            sparsity,
            "--out",
            str(out),
        ]
        assert cli.main(args) == 0
        capsys.readouterr()
        trainer, state, config = checkpoint.restore(out)
        assert (config.variant, config.sparsity) == ("sparse", sparsity)
        diff = np.max(np.abs(np.asarray(trainer.model(state.params)(jnp.asarray(x))) - expected))
        assert (diff <= 1e-6) == matches and (diff > 1e-3) != matches, (sparsity, diff)


def test_cli_check_failure_exits_1_and_writes_nothing(tmp_path, capsys, monkeypatch):
    torch.save(torch_reference.Autoencoder().state_dict(), tmp_path / "model.pt")
    real = convert.torch_outputs
    monkeypatch.setattr(convert.parity, "torch_outputs", lambda *a, **k: real(*a, **k) + np.float32(1e-3))
    code = cli.main(["convert", str(tmp_path / "model.pt"), "--out", str(tmp_path / "out"), "--check"])
    captured = capsys.readouterr()
    assert code == 1
    report = json.loads(captured.out)
    assert not report["passed"] and report["max_abs_diff_outputs"] == pytest.approx(1e-3, rel=1e-3)
    assert captured.err.startswith("jaxae: parity check failed") and "nothing written" in captured.err
    assert not (tmp_path / "out").exists()


def test_cli_convert_refuses_an_existing_checkpoint_folder_and_bad_flags(tmp_path, capsys):
    torch.save(torch_reference.Autoencoder().state_dict(), tmp_path / "model.pt")
    out = tmp_path / "out"
    assert cli.main(["convert", str(tmp_path / "model.pt"), "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["tensors"] == 12 and summary["variant"] == "vanilla"
    code = cli.main(["convert", str(tmp_path / "model.pt"), "--out", str(out)])
    _one_line_error(capsys, code, "already holds checkpoints")
    code = cli.main(["convert", str(tmp_path / "model.pt"), "--out", str(tmp_path / "o2"), "--tolerance", "-1"])
    _one_line_error(capsys, code, "--tolerance must be a non-negative number")
    code = cli.main(["convert", str(tmp_path / "model.pt"), "--out", str(tmp_path / "o2"), "--variant", "gan"])
    _one_line_error(capsys, code, "unknown variant 'gan'")
    assert not (tmp_path / "o2").exists()
    code = cli.main(["export", "--workdir", str(tmp_path / "nothing"), "--out", str(tmp_path / "x.pt")])
    _one_line_error(capsys, code, "no checkpoints in")
    code = cli.main(["export", "--workdir", str(out), "--out", str(tmp_path)])
    _one_line_error(capsys, code, "is a folder")
    code = cli.main(
        ["train", "--init-from", str(tmp_path / "nothing"), "--epochs", "1", "--workdir", str(tmp_path / "t")]
    )
    _one_line_error(capsys, code, "no checkpoints in")
    code = cli.main(
        ["train", "--init-from", str(out), "--latent-dim", "8", "--epochs", "1", "--workdir", str(tmp_path / "t")]
    )
    _one_line_error(capsys, code, "(32, 64) there, (8, 64) here")
    assert not (tmp_path / "t").exists()


# --- bad and hostile files ------------------------------------------------------------------------


class _RunsCode:
    """Unpickling this runs code: it creates the file ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def _document_state_dict():
    return torch_reference.Autoencoder().state_dict()


def _write(tmp_path, name, make):
    path = tmp_path / name
    make(path)
    return path


def _hostile_zip(path, marker):
    torch.save({**_document_state_dict(), "payload": _RunsCode(marker)}, path)


def _hostile_pickle(path, marker):
    with open(path, "wb") as f:
        pickle.dump({"encoder.0.weight": _RunsCode(marker)}, f, protocol=2)


@pytest.mark.parametrize("make_hostile", [_hostile_zip, _hostile_pickle])
def test_a_pickle_that_would_run_code_is_refused_and_not_run(tmp_path, capsys, make_hostile):
    # The payload is live: an unsafe load does run it.
    live = tmp_path / "live-marker"
    make_hostile(tmp_path / "live.pt", live)
    try:
        torch.load(tmp_path / "live.pt", weights_only=False)
    except RuntimeError:
        pass  # torch's legacy reader runs the payload, then finds no magic number
    assert live.exists()

    marker = tmp_path / "marker"
    make_hostile(tmp_path / "hostile.pt", marker)
    code = cli.main(["convert", str(tmp_path / "hostile.pt"), "--out", str(tmp_path / "out"), "--check"])
    _one_line_error(capsys, code, "refused to load")
    assert not marker.exists()
    assert not (tmp_path / "out").exists()
    with pytest.raises(jaxae.JaxaeError, match="refused to load"):
        jaxae.from_torch(tmp_path / "hostile.pt")
    assert not marker.exists()


def test_hostile_file_in_a_real_process(tmp_path):
    marker = tmp_path / "marker"
    _hostile_zip(tmp_path / "hostile.pt", marker)
    proc = subprocess.run(
        [sys.executable, "-m", "jaxae", "convert", str(tmp_path / "hostile.pt"), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONWARNINGS": "default"},
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "refused to load" in proc.stderr and "exec" in proc.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()


def _truncated(path):
    torch.save(_document_state_dict(), path)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def _without(key):
    return lambda p: torch.save({k: v for k, v in _document_state_dict().items() if k != key}, p)


def _with_extra(p):
    torch.save({**_document_state_dict(), "encoder.6.weight": torch.zeros(3, 3)}, p)


def _wrong_shape(p):
    sd = _document_state_dict()
    sd["decoder.2.weight"] = torch.zeros(128, 60)
    torch.save(sd, p)


def _ints(p):
    sd = _document_state_dict()
    sd["encoder.0.bias"] = torch.zeros(128, dtype=torch.int64)
    torch.save(sd, p)


def _truncated_safetensors(p):
    convert.save_state_dict(numpy_state_dict(torch_reference.Autoencoder()), p, "safetensors")
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) - 1000])


@pytest.mark.parametrize(
    "name, make, pattern",
    [
        ("missing.pt", None, "does not exist"),
        ("empty.pt", lambda p: p.write_bytes(b""), "neither a PyTorch file"),
        ("text.pt", lambda p: p.write_text("not a model at all\n"), "neither a PyTorch file"),
        ("image.pth", lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100)), "neither a PyTorch file"),
        ("truncated.pt", _truncated, "cannot read"),
        ("truncated.safetensors", _truncated_safetensors, "cannot read"),
        (
            "whole-model.pt",
            lambda p: torch.save(torch.nn.Linear(2, 2), p),
            "it references torch.nn.modules.linear.Linear",
        ),
        ("list.pt", lambda p: torch.save([torch.zeros(2)], p), "holds a list, not a state_dict"),
        ("missing-key.pt", _without("decoder.4.bias"), "missing keys: decoder.4.bias"),
        ("extra-key.pt", _with_extra, "unexpected keys: encoder.6.weight"),
        (
            "wrong-shape.pt",
            _wrong_shape,
            "decoder.2.weight has shape (128, 60) but the vanilla model (28x28x1 images, 784-128-64-32) needs (128, 64)",
        ),
        ("ints.pt", _ints, "encoder.0.bias holds torch.int64 values"),
    ],
)
def test_bad_files_are_one_line_errors_and_write_nothing(tmp_path, capsys, name, make, pattern):
    path = tmp_path / name
    if make is not None:
        make(path)
    code = cli.main(["convert", str(path), "--out", str(tmp_path / "out"), "--check"])
    _one_line_error(capsys, code, pattern)
    assert not (tmp_path / "out").exists()


# --- non-finite weights ---------------------------------------------------------------------------


def _nonfinite_state_dict():
    """The document's weights with 3 NaN and 1 Inf in encoder.0.weight (100352 values)."""
    state_dict = _document_state_dict()
    weight = state_dict["encoder.0.weight"]
    weight[0, :3] = float("nan")
    weight[5, 7] = float("-inf")
    return state_dict


def _save_nonfinite(path):
    if path.suffix == ".safetensors":
        convert.save_state_dict({k: v.numpy() for k, v in _nonfinite_state_dict().items()}, path, "safetensors")
    else:
        torch.save(_nonfinite_state_dict(), path)


@pytest.mark.parametrize("name", ["nan.pt", "nan.safetensors"])
def test_nonfinite_weights_are_refused_naming_the_tensor_unless_allowed(tmp_path, capsys, name):
    path = tmp_path / name
    _save_nonfinite(path)
    message = "encoder.0.weight has 3 NaN and 1 Inf of 100352 values"
    code = cli.main(["convert", str(path), "--out", str(tmp_path / "out"), "--normalize", "unit"])
    _one_line_error(capsys, code, message)
    assert not (tmp_path / "out").exists()
    with pytest.raises(jaxae.JaxaeError, match=message):
        jaxae.from_torch(path)
    with pytest.raises(jaxae.JaxaeError, match=message):
        jaxae.read_state_dict(path)

    # the opt-out: the weights arrive as they are
    model = jaxae.from_torch(path, allow_nonfinite=True)
    assert int(np.isnan(np.asarray(model.encoder.layers[0].kernel[...])).sum()) == 3
    assert cli.main(["convert", str(path), "--out", str(tmp_path / "out"), "--allow-nonfinite"]) == 0
    assert json.loads(capsys.readouterr().out)["tensors"] == 12
    _, state, _ = checkpoint.restore(tmp_path / "out")
    assert int(np.isinf(np.asarray(state.params["encoder"]["layers"][0]["kernel"])).sum()) == 1


def test_nonfinite_message_says_how_to_opt_out_and_covers_mappings_and_float64_overflow(tmp_path, capsys):
    torch.save(_nonfinite_state_dict(), tmp_path / "nan.pt")
    code = cli.main(["convert", str(tmp_path / "nan.pt"), "--out", str(tmp_path / "out")])
    _one_line_error(capsys, code, "Pass --allow-nonfinite")
    # a mapping enters through the same reader
    with pytest.raises(jaxae.JaxaeError, match="the state_dict: encoder.0.weight has 3 NaN and 1 Inf"):
        jaxae.from_torch(_nonfinite_state_dict())
    # float64 beyond float32's range is Inf once converted, and is counted as such
    state_dict = {k: v.double() for k, v in _document_state_dict().items()}
    state_dict["decoder.4.bias"][:2] = 1e300
    with pytest.raises(jaxae.JaxaeError, match=r"decoder.4.bias has 2 Inf of 784 values;"):
        jaxae.read_state_dict(state_dict)
    # several tensors: each named, the line stays one line
    state_dict = _nonfinite_state_dict()
    for key in ("encoder.2.bias", "decoder.0.weight", "decoder.2.bias"):
        state_dict[key][0] = float("nan")
    with pytest.raises(jaxae.JaxaeError) as caught:
        jaxae.read_state_dict(state_dict)
    assert "encoder.2.bias has " in str(caught.value) and "and 1 more" in str(caught.value)
    assert "\n" not in str(caught.value)


# --- never overwrite ------------------------------------------------------------------------------


@pytest.mark.slow
def test_convert_refuses_to_overwrite_an_earlier_conversion_unless_forced(tmp_path, capsys):
    torch.save(_document_state_dict(), tmp_path / "model.pt")
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("the user's config\n")
    code = cli.main(["convert", str(tmp_path / "model.pt"), "--out", str(out)])
    _one_line_error(capsys, code, f"--out {out} already holds config.json, which convert would overwrite")
    assert (out / "config.json").read_text() == "the user's config\n"
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]

    (out / "config.json").unlink()
    (out / "parity.json").write_text("the user's report\n")
    code = cli.main(["convert", str(tmp_path / "model.pt"), "--out", str(out)])
    _one_line_error(capsys, code, "already holds parity.json")
    assert (out / "parity.json").read_text() == "the user's report\n"

    # --force replaces them; a parity.json that no longer describes the weights goes
    (out / "config.json").write_text("the user's config\n")
    assert cli.main(["convert", str(tmp_path / "model.pt"), "--out", str(out), "--force"]) == 0
    capsys.readouterr()
    assert json.loads((out / "config.json").read_text())["variant"] == "vanilla"
    assert not (out / "parity.json").exists()

    # without --force an earlier conversion is kept; with it, it is replaced, whole
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    code = cli.main(["convert", str(tmp_path / "model.pt"), "--out", str(out)])
    _one_line_error(capsys, code, "which convert never replaces (not even with --force)")
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before
    torch.manual_seed(5)
    torch.save(torch_reference.MLPVAE().state_dict(), tmp_path / "vae.pt")
    assert cli.main(["convert", str(tmp_path / "vae.pt"), "--out", str(out), "--force", "--check"]) == 0
    capsys.readouterr()
    assert json.loads((out / "config.json").read_text())["variant"] == "vae"
    assert (out / "parity.json").exists() and checkpoint.complete_steps(out) == [0]
    _, state, config = checkpoint.restore(out)
    assert config.variant == "vae" and "mean" in state.params
    assert [p.name for p in tmp_path.iterdir() if ".jaxae-" in p.name] == []  # nothing left beside it

    # a run trained there is never replaced, --force or not
    assert cli.main(["train", "--workdir", str(out), "--resume", "--epochs", "1", "--no-progress"]) == 0
    capsys.readouterr()
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    code = cli.main(["convert", str(tmp_path / "model.pt"), "--out", str(out), "--force"])
    _one_line_error(capsys, code, "which convert never replaces (not even with --force)")
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before

    (tmp_path / "a-file").write_text("x")
    for target in (tmp_path / "a-file", tmp_path / "a-file" / "out"):
        code = cli.main(["convert", str(tmp_path / "model.pt"), "--out", str(target)])
        _one_line_error(capsys, code, f"{tmp_path / 'a-file'} is a file, not a folder")
    assert (tmp_path / "a-file").read_text() == "x"


@pytest.fixture
def converted(tmp_path, capsys):
    """A checkpoint folder converted from the document's fresh weights."""
    torch.save(_document_state_dict(), tmp_path / "model.pt")
    assert cli.main(["convert", str(tmp_path / "model.pt"), "--out", str(tmp_path / "converted")]) == 0
    capsys.readouterr()
    return tmp_path / "converted"


def test_export_refuses_to_overwrite_a_file_unless_forced(tmp_path, capsys, converted):
    original = tmp_path / "model.pt"
    before = original.read_bytes()
    code = cli.main(["export", "--workdir", str(converted), "--out", str(original)])
    _one_line_error(capsys, code, f"--out {original} already exists; give a new file name, or pass --force")
    assert original.read_bytes() == before
    # refused before the checkpoint is even looked at
    code = cli.main(["export", "--workdir", str(tmp_path / "nothing"), "--out", str(original)])
    _one_line_error(capsys, code, "already exists")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted", "model.pt"]  # no temporary left

    (tmp_path / "other.safetensors").write_bytes(b"keep")
    code = cli.main(["export", "--workdir", str(converted), "--out", str(tmp_path / "other.safetensors")])
    _one_line_error(capsys, code, "already exists")
    assert (tmp_path / "other.safetensors").read_bytes() == b"keep"

    assert cli.main(["export", "--workdir", str(converted), "--out", str(original), "--force"]) == 0
    capsys.readouterr()
    assert list(jaxae.read_state_dict(original)) == DOCUMENT_KEYS


def test_save_state_dict_keeps_a_file_that_appears_while_it_writes(tmp_path, monkeypatch):
    # The check before the write cannot see a file created during it; the final hard link does.
    path = tmp_path / "model.pt"
    real_save = torch.save

    def save_while_someone_writes(obj, f):
        real_save(obj, f)
        path.write_bytes(b"someone else's")

    monkeypatch.setattr(torch, "save", save_while_someone_writes)
    with pytest.raises(jaxae.JaxaeError, match="already exists"):
        convert.save_state_dict(numpy_state_dict(torch_reference.Autoencoder()), path)
    assert path.read_bytes() == b"someone else's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


# --- unwritable export paths ----------------------------------------------------------------------


def test_export_to_a_path_under_a_file_or_to_a_folder_is_one_line(tmp_path, capsys, converted):
    (tmp_path / "notes.txt").write_text("x")
    for out, pattern in (
        (tmp_path / "notes.txt" / "model.pt", "notes.txt is a file, not a folder"),
        (tmp_path / "notes.txt" / "deeper" / "model.pt", "notes.txt is a file, not a folder"),
        (tmp_path, "is a folder; give a file name"),
    ):
        code = cli.main(["export", "--workdir", str(converted), "--out", str(out)])
        _one_line_error(capsys, code, pattern)
    assert (tmp_path / "notes.txt").read_text() == "x"


@pytest.mark.parametrize(
    "patch, pattern",
    [
        # a read-only location: mkstemp is where the OS says so (root ignores chmod, so the errno is raised here)
        ("mkstemp", "Read-only file system"),
        # a full disk: torch's zip writer raises RuntimeError, not OSError
        ("torch.save", "PytorchStreamWriter failed writing file"),
    ],
)
def test_export_to_an_unwritable_location_is_one_line_and_leaves_nothing(
    tmp_path, capsys, monkeypatch, converted, patch, pattern
):
    import errno
    import tempfile

    if patch == "mkstemp":

        def read_only(*args, **kwargs):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))

        monkeypatch.setattr(tempfile, "mkstemp", read_only)
    else:

        def full_disk(obj, f):
            open(f, "wb").write(b"partial")
            raise RuntimeError("[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed writing file")

        monkeypatch.setattr(torch, "save", full_disk)
    out = tmp_path / "exported" / "model.pt"
    code = cli.main(["export", "--workdir", str(converted), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"jaxae: error: cannot write --out {out}: ") and pattern in err, err
    assert not out.exists() and (not out.parent.exists() or not list(out.parent.iterdir()))


def _read_only_mount_works(where):
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o ro tmpfs {where} && ! touch {where}/x"],
        capture_output=True,
    )
    return probe.returncode == 0


@pytest.mark.slow
def test_export_onto_a_read_only_mount_in_a_real_process(tmp_path, converted):
    # Root ignores chmod, so a real read-only file system: a tmpfs mounted ro in a private mount namespace.
    ro = tmp_path / "ro"
    ro.mkdir()
    if not _read_only_mount_works(ro):
        pytest.skip("needs unshare -m and mount (root); the monkeypatched EROFS test covers the message")
    out = ro / "model.pt"
    command = (
        f"mount -t tmpfs -o ro tmpfs {ro} && exec {sys.executable} -m jaxae export --workdir {converted} --out {out}"
    )
    proc = subprocess.run(["unshare", "-m", "sh", "-c", command], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"jaxae: error: cannot write --out {out}: Read-only file system"), proc.stderr


def test_convert_onto_a_read_only_mount_is_one_line_before_any_work(tmp_path, converted):
    ro = tmp_path / "ro"
    ro.mkdir()
    if not _read_only_mount_works(ro):
        pytest.skip("needs unshare -m and mount (root); test_convert_into_an_unwritable_folder covers it without")
    command = (
        f"mount -t tmpfs -o ro tmpfs {ro} && exec {sys.executable} -m jaxae convert {tmp_path / 'model.pt'} "
        f"--out {ro / 'converted'}"
    )
    proc = subprocess.run(["unshare", "-m", "sh", "-c", command], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "Traceback" not in proc.stderr
    assert "cannot be written (Read-only file system)" in proc.stderr, proc.stderr


def test_convert_into_an_unwritable_folder_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch, converted):
    import errno
    import tempfile as tempfile_module

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile_module, "TemporaryFile", read_only)
    out = tmp_path / "elsewhere" / "converted"
    code = cli.main(["convert", str(tmp_path / "model.pt"), "--out", str(out)])
    _one_line_error(capsys, code, f"--out {out} cannot be written (Read-only file system)")
    assert not out.parent.exists()


# --- property-based: untrusted files give a state_dict or a JaxaeError, never anything else --------

import io  # noqa: E402
import struct  # noqa: E402
import tempfile  # noqa: E402
import zipfile  # noqa: E402

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SUFFIXES = st.sampled_from([".pt", ".pth", ".bin", ".safetensors"])


def _small_state_dict():
    return collections.OrderedDict(
        [("encoder.0.weight", torch.arange(6, dtype=torch.float32).reshape(3, 2)), ("encoder.0.bias", torch.ones(3))]
    )


def _torch_bytes(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _safetensors_bytes(header, data=b""):
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


VALID_TORCH = _torch_bytes(_small_state_dict())
VALID_LEGACY = None  # filled lazily: torch's legacy (non-zip) format
VALID_SAFETENSORS = _safetensors_bytes(
    {
        "__metadata__": {"format": "pt"},
        "encoder.0.bias": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]},
        "encoder.0.weight": {"dtype": "F32", "shape": [3, 2], "data_offsets": [12, 36]},
    },
    np.ones(3, np.float32).tobytes() + np.arange(6, dtype=np.float32).tobytes(),
)


def _read_is_a_state_dict_or_a_jaxae_error(data: bytes, suffix: str):
    """Writes ``data`` as ``x{suffix}`` and reads it: a float32 state_dict or a JaxaeError, nothing else."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "x" + suffix)
        with open(path, "wb") as f:
            f.write(data)
        try:
            state_dict = convert.read_state_dict(path)
        except jaxae.JaxaeError as e:
            assert "\n" not in str(e), str(e)
            return None
    assert isinstance(state_dict, dict)
    assert all(isinstance(k, str) and v.dtype == np.float32 and np.isfinite(v).all() for k, v in state_dict.items())
    return state_dict


def test_the_fuzz_seeds_are_read():
    # the mutations below start from files the reader does accept
    for data, suffix in ((VALID_TORCH, ".pt"), (VALID_SAFETENSORS, ".safetensors")):
        state_dict = _read_is_a_state_dict_or_a_jaxae_error(data, suffix)
        assert state_dict is not None and sorted(state_dict) == ["encoder.0.bias", "encoder.0.weight"]
        np.testing.assert_array_equal(state_dict["encoder.0.weight"], np.arange(6).reshape(3, 2))


@FUZZ
@given(
    data=st.one_of(
        st.binary(max_size=512),
        st.builds(lambda tail: b"PK\x03\x04" + tail, st.binary(max_size=512)),
        st.builds(lambda tail: b"\x80" + tail, st.binary(max_size=512)),
        st.builds(
            lambda n, tail: struct.pack("<Q", n) + b"{" + tail, st.integers(0, 2**64 - 1), st.binary(max_size=256)
        ),
    ),
    suffix=SUFFIXES,
)
def test_any_bytes_are_a_state_dict_or_a_jaxae_error(data, suffix):
    _read_is_a_state_dict_or_a_jaxae_error(data, suffix)


@FUZZ
@given(
    seed=st.sampled_from(["torch", "safetensors"]),
    cut=st.integers(0, 10**6),
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), max_size=8),
    suffix=SUFFIXES,
)
def test_truncated_and_bit_flipped_files_are_a_state_dict_or_a_jaxae_error(seed, cut, flips, suffix):
    data = bytearray(VALID_TORCH if seed == "torch" else VALID_SAFETENSORS)
    for position, mask in flips:
        data[position % len(data)] ^= mask
    _read_is_a_state_dict_or_a_jaxae_error(bytes(data[: cut % (len(data) + 1)]), suffix)


_DTYPES = st.sampled_from(["F32", "F16", "BF16", "F64", "I64", "I32", "U8", "BOOL", "F8_E4M3", "C64", "X", ""])
_DIMS = st.lists(st.one_of(st.integers(0, 8), st.integers(-3, 2**63)), max_size=4)
_OFFSETS = st.lists(st.one_of(st.integers(0, 64), st.integers(-5, 2**64)), min_size=0, max_size=3)


@FUZZ
@given(
    entries=st.dictionaries(
        st.sampled_from(["encoder.0.weight", "encoder.0.bias", "", "__metadata__", "x" * 300, "a\nb"]),
        st.one_of(
            st.fixed_dictionaries({"dtype": _DTYPES, "shape": _DIMS, "data_offsets": _OFFSETS}),
            st.dictionaries(st.sampled_from(["dtype", "shape", "data_offsets"]), st.integers() | st.text(max_size=4)),
            st.none(),
        ),
        max_size=3,
    ),
    data=st.binary(max_size=64),
)
def test_safetensors_headers_that_lie_are_a_state_dict_or_a_jaxae_error(entries, data):
    _read_is_a_state_dict_or_a_jaxae_error(_safetensors_bytes(entries, data), ".safetensors")


def _torch_members():
    with zipfile.ZipFile(io.BytesIO(VALID_TORCH)) as archive:
        return [(info.filename, archive.read(info.filename)) for info in archive.infolist()]


TORCH_MEMBERS = _torch_members()


@FUZZ
@given(
    member=st.integers(0, len(TORCH_MEMBERS) - 1),
    how=st.sampled_from(["replace", "truncate", "flip", "extend"]),
    payload=st.binary(max_size=64),
    position=st.integers(0, 10**6),
)
def test_a_torch_zip_with_a_corrupted_member_is_a_state_dict_or_a_jaxae_error(member, how, payload, position):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for i, (name, content) in enumerate(TORCH_MEMBERS):
            if i == member:
                if how == "replace":
                    content = payload
                elif how == "truncate":
                    content = content[: position % (len(content) + 1)]
                elif how == "flip" and content:
                    flipped = bytearray(content)
                    flipped[position % len(content)] ^= (payload[:1] or b"\xff")[0] or 0xFF
                    content = bytes(flipped)
                else:
                    content = content + payload
            archive.writestr(name, content)
    _read_is_a_state_dict_or_a_jaxae_error(buffer.getvalue(), ".pt")


@settings(max_examples=100, deadline=None)
@given(
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), max_size=4),
    suffix=SUFFIXES,
)
def test_mutated_hostile_pickles_never_run_their_payload(tmp_path_factory, flips, suffix):
    folder = tmp_path_factory.mktemp("hostile")
    marker = folder / "marker"
    for make in (_hostile_zip, _hostile_pickle):
        make(folder / "seed.pt", marker)
        data = bytearray((folder / "seed.pt").read_bytes())
        for position, mask in flips:
            data[position % len(data)] ^= mask
        _read_is_a_state_dict_or_a_jaxae_error(bytes(data), suffix)
        assert not marker.exists()


_TENSOR_KINDS = {
    "float32": lambda: torch.ones(2, 3),
    "float16": lambda: torch.ones(4, dtype=torch.float16),
    "bfloat16": lambda: torch.ones(4, dtype=torch.bfloat16),
    "float8": lambda: torch.ones(4).to(torch.float8_e4m3fn),
    "float64-overflow": lambda: torch.full((2,), 1e300, dtype=torch.float64),
    "nan": lambda: torch.tensor([0.0, float("nan")]),
    "int64": lambda: torch.arange(3),
    "bool": lambda: torch.ones(2, dtype=torch.bool),
    "complex": lambda: torch.ones(2, dtype=torch.complex64),
    "qint8": lambda: torch.quantize_per_tensor(torch.ones(3), 0.1, 0, torch.qint8),
    "sparse-coo": lambda: torch.eye(3).to_sparse(),
    "sparse-csr": lambda: torch.eye(3).to_sparse_csr(),
    "meta": lambda: torch.empty(2, device="meta"),
    "strided-view": lambda: torch.ones(4, 4)[:, 1],
    "scalar": lambda: torch.tensor(1.5),
    "empty": lambda: torch.empty(0, 5),
    "parameter": lambda: torch.nn.Parameter(torch.ones(2)),
}
_VALUES = st.recursive(
    st.sampled_from(sorted(_TENSOR_KINDS)).map(lambda kind: _TENSOR_KINDS[kind]())
    | st.none()
    | st.integers(-3, 3)
    | st.text(max_size=3),
    lambda inner: st.lists(inner, max_size=2) | st.dictionaries(st.text(max_size=5), inner, max_size=2),
    max_leaves=4,
)


@pytest.mark.filterwarnings("ignore:.*(Sparse CSR|quantize_per_tensor).*:UserWarning")
@FUZZ
@given(
    contents=st.dictionaries(
        st.sampled_from(["encoder.0.weight", "state_dict", "model_state_dict", "model", "epoch"])
        | st.integers(0, 3)
        | st.text(max_size=4),
        _VALUES,
        max_size=4,
    )
)
def test_what_torch_save_can_hold_is_a_state_dict_or_a_jaxae_error(contents):
    # Sparse, meta and nested tensors once escaped as TypeError / NotImplementedError.
    _read_is_a_state_dict_or_a_jaxae_error(_torch_bytes(contents), ".pt")


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["vanilla", "iwae"])
def test_a_three_stage_conv_twin_matches_outputs_and_gradients(variant):
    # --conv-channels 8,16,32 on 32x32x3: the twin has one Conv2d / ConvTranspose2d per stage
    config = TrainConfig(variant=variant, arch="conv", conv_channels=(8, 16, 32), iwae_samples=3)
    shape = (32, 32, 3)
    torch.manual_seed(5)
    reference = jaxae.TWINS[(variant, "conv")].torch_module(config, shape)
    convs = [type(m).__name__ for m in (*reference.encoder, *reference.decoder) if hasattr(m, "weight")]
    assert convs == ["Conv2d"] * 3 + ["ConvTranspose2d"] * 3
    assert reference.project.out_features == 32 * 4 * 4
    model = jaxae.from_torch(reference.state_dict(), config=config, image_shape=shape)
    images = np.random.default_rng(0).integers(0, 256, (16, *shape), dtype=np.uint8)
    x_nhwc = normalized(images, "unit")
    x_nchw = np.ascontiguousarray(x_nhwc.reshape(16, *shape).transpose(0, 3, 1, 2).reshape(16, -1))
    with torch.no_grad():
        expected = reference(torch.from_numpy(x_nchw)).numpy().reshape(16, 3, 32, 32).transpose(0, 2, 3, 1)
    got = np.asarray(model(jnp.asarray(x_nhwc))).reshape(16, *shape)
    assert np.abs(got - expected).max() <= 1e-6
    # one training loss and its gradient, with jaxae's noise on both sides
    objective = jaxae.get_variant(variant).build_objective(config, get_normalization("unit"))
    keys = fixed_keys(16)
    noise = fixed_noise(config, objective, x_nhwc, keys)
    torch_loss(config, reference, torch.from_numpy(x_nchw), noise).backward()
    graphdef, params = nnx.split(model)
    grads = jax.jit(jax.grad(lambda p: jnp.mean(objective.loss(nnx.merge(graphdef, p), jnp.asarray(x_nhwc), keys)[0])))
    got = convert.to_torch_state_dict(nnx.to_pure_dict(grads(params)), variant, "conv", image_shape=shape)
    expected = {k: p.grad.numpy() for k, p in reference.named_parameters()}
    # The bar is PyTorch's own float32 rounding, measured against the same loss in float64: the
    # loss sums 3072 values per image of random pixels (about 2,000 nats), and its rounding
    # reaches every gradient through the IWAE's softmax weights.
    rounding = max_abs_diffs(expected, float64_gradients(config, reference, x_nchw, noise))
    diffs = max_abs_diffs({k: np.asarray(v) for k, v in got.items()}, expected)
    assert all(diffs[k] <= 4 * rounding[k] + 1e-7 for k in diffs), {k: (diffs[k], rounding[k]) for k in diffs}
    assert all(np.abs(g).max() > 0 for g in expected.values())  # every parameter gets a gradient
