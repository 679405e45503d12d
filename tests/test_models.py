import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxae
from jaxae.errors import JaxaeError
from jaxae.models import VAE, Autoencoder, ConvAutoencoder, ConvVAE


def _layers(module):
    return [layer for layer in module.layers if isinstance(layer, nnx.Linear)]


def test_structure_mirrors_torch_sequential_indices():
    model = Autoencoder(rngs=nnx.Rngs(0))
    enc = model.encoder.layers
    dec = model.decoder.layers
    # torch: encoder = Linear, ReLU, Linear, ReLU, Linear; decoder = ..., Linear, Sigmoid.
    assert [i for i, layer in enumerate(enc) if isinstance(layer, nnx.Linear)] == [0, 2, 4]
    assert [i for i, layer in enumerate(dec) if isinstance(layer, nnx.Linear)] == [0, 2, 4]
    assert enc[1] is jax.nn.relu and dec[5] is jax.nn.sigmoid
    shapes = [layer.kernel[...].shape for layer in _layers(model.encoder) + _layers(model.decoder)]
    assert shapes == [(784, 128), (128, 64), (64, 32), (32, 64), (64, 128), (128, 784)]


def test_torch_init_matches_torch_linear_statistics():
    torch = pytest.importorskip("torch")
    model = Autoencoder(rngs=nnx.Rngs(1))
    torch.manual_seed(0)
    for ours in _layers(model.encoder) + _layers(model.decoder):
        fan_in, fan_out = ours.kernel[...].shape
        ref = torch.nn.Linear(fan_in, fan_out)
        bound = 1.0 / math.sqrt(fan_in)
        for mine, theirs in ((ours.kernel[...], ref.weight), (ours.bias[...], ref.bias)):
            mine = np.asarray(mine).ravel()
            theirs = theirs.detach().numpy().ravel()
            assert np.abs(mine).max() <= bound
            # U(-b, b): std b/sqrt(3), mean 0; compare with torch's own draw.
            tol = 4 * bound / math.sqrt(3) / math.sqrt(min(mine.size, theirs.size))
            assert abs(mine.std() - theirs.std()) < max(tol, 0.15 * bound)
            assert abs(mine.mean()) < 4 * bound / math.sqrt(mine.size)
            # the spread really reaches the bound, as a uniform does (a normal init would not)
            if mine.size > 1000:
                assert np.abs(mine).max() > 0.99 * bound


def test_flax_init_is_lecun_normal_with_zero_bias():
    model = Autoencoder(init="flax", rngs=nnx.Rngs(0))
    first = model.encoder.layers[0]
    assert np.all(np.asarray(first.bias[...]) == 0)
    std = float(np.asarray(first.kernel[...]).std())
    assert abs(std - 1 / math.sqrt(784)) < 0.1 / math.sqrt(784)


def test_unknown_init_is_a_clear_error():
    with pytest.raises(jaxae.JaxaeError, match="unknown init"):
        Autoencoder(init="xavier", rngs=nnx.Rngs(0))


def test_shapes_and_output_range():
    model = Autoencoder(rngs=nnx.Rngs(0))
    x = jax.random.uniform(jax.random.key(0), (5, 28, 28, 1))
    z = model.encode(x)
    y = model(x)
    assert z.shape == (5, 32)
    assert y.shape == (5, 784)
    assert float(y.min()) > 0 and float(y.max()) < 1
    np.testing.assert_allclose(model(x.reshape(5, 784)), y)


@pytest.mark.slow
def test_configurable_sizes():
    model = Autoencoder(100, (50, 20, 10), 4, rngs=nnx.Rngs(0))
    assert model.encode(jnp.ones((3, 100))).shape == (3, 4)
    assert model(jnp.ones((3, 100))).shape == (3, 100)


@pytest.mark.parametrize("shape", [(784,), (3, 783), (2, 28, 27, 1)])
def test_wrong_input_shape_is_a_clear_error(shape):
    model = Autoencoder(rngs=nnx.Rngs(0))
    with pytest.raises(jaxae.JaxaeError, match="expected a batch"):
        model(jnp.ones(shape))


@pytest.mark.parametrize("cls", [Autoencoder, VAE])
def test_mlps_take_an_image_shape_and_its_flattened_images(cls):
    model = cls((16, 12, 3), (8,), 4, rngs=nnx.Rngs(0))
    assert model.image_shape == (16, 12, 3) and model.input_dim == 576
    x = jax.random.uniform(jax.random.key(1), (2, 16, 12, 3))
    np.testing.assert_array_equal(model(x), model(x.reshape(2, -1)))
    assert model(x).shape == (2, 576)
    with pytest.raises(JaxaeError, match=r"\[N, 576\]"):
        model(jnp.zeros((2, 16, 16, 3)))
    # the same number of values in another shape would be read as this shape's pixels
    with pytest.raises(JaxaeError, match=r"takes 16x12x3 images .* got a batch of shape \(2, 12, 16, 3\)"):
        model(jnp.zeros((2, 12, 16, 3)))


def test_conv_models_take_any_sides_divisible_by_4_and_any_channels():
    model = ConvVAE((16, 8, 3), latent_dim=4, rngs=nnx.Rngs(0))
    assert model(jnp.zeros((2, 16, 8, 3))).shape == (2, 16 * 8 * 3)
    with pytest.raises(JaxaeError, match=r"takes 16x8x3 images"):
        model(jnp.zeros((2, 8, 16, 3)))
    with pytest.raises(JaxaeError, match=r"divisible by 4, got 18x8"):
        ConvAutoencoder((18, 8, 3), rngs=nnx.Rngs(0))


# -- the conv layers' lowerings ------------------------------------------------------------------


def _layer_grads(layer, x):
    """The layer's output and the gradients of a fixed scalar of it by kernel, bias and input."""
    graphdef, params = nnx.split(layer)
    probe = jax.random.normal(jax.random.key(7), jax.eval_shape(lambda: layer(x)).shape)

    def scalar(params, x):
        return jnp.sum(nnx.merge(graphdef, params)(x) * probe)

    # Compiled whole: run op by op, each of the patches' slices is compiled on its own (8 s a layer).
    return jax.jit(lambda params, x: (nnx.merge(graphdef, params)(x), jax.grad(scalar, argnums=(0, 1))(params, x)))(
        params, x
    )


@pytest.mark.parametrize(
    ("cls", "in_ch", "out_ch", "shape"),
    [
        (jaxae.models.Conv2x, 1, 16, (3, 28, 28)),
        (jaxae.models.Conv2x, 16, 32, (2, 14, 10)),
        (jaxae.models.Conv2x, 3, 5, (2, 7, 9)),  # odd sides: ceil(side / 2) outputs
        (jaxae.models.ConvTranspose2x, 32, 16, (2, 7, 7)),  # the gathering form (phases)
        (jaxae.models.ConvTranspose2x, 16, 1, (3, 14, 14)),  # the scattering form (4 * out <= in)
        (jaxae.models.ConvTranspose2x, 16, 3, (2, 6, 10)),
        (jaxae.models.ConvTranspose2x, 3, 5, (2, 5, 3)),
    ],
)
def test_patches_and_native_lowerings_give_the_same_outputs_and_gradients(cls, in_ch, out_ch, shape):
    n, h, w = shape
    x = jax.random.normal(jax.random.key(1), (n, h, w, in_ch))
    native = cls(in_ch, out_ch, init="torch", rngs=nnx.Rngs(0), lowering="native")
    patches = cls(in_ch, out_ch, init="torch", rngs=nnx.Rngs(0), lowering="patches")
    (y_native, g_native), (y_patches, g_patches) = _layer_grads(native, x), _layer_grads(patches, x)
    assert y_native.shape == y_patches.shape
    np.testing.assert_allclose(y_patches, y_native, atol=2e-5, rtol=0)
    for a, b in zip(jax.tree.leaves(g_patches), jax.tree.leaves(g_native), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-4 * max(1.0, float(jnp.max(jnp.abs(b)))), rtol=0)


def test_transposed_conv_matches_torch_conv_transpose2d():
    torch = pytest.importorskip("torch")
    for in_ch, out_ch in ((32, 16), (16, 1), (4, 3)):
        layer = jaxae.models.ConvTranspose2x(in_ch, out_ch, init="torch", rngs=nnx.Rngs(0), lowering="patches")
        x = np.array(jax.random.normal(jax.random.key(2), (2, 6, 5, in_ch)))
        twin = torch.nn.ConvTranspose2d(in_ch, out_ch, 4, stride=2, padding=1)
        with torch.no_grad():
            twin.weight.copy_(torch.from_numpy(np.asarray(layer.kernel[...]).transpose(3, 2, 0, 1).copy()))
            twin.bias.copy_(torch.from_numpy(np.array(layer.bias[...])))
            expected = twin(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
        np.testing.assert_allclose(np.asarray(nnx.jit(lambda m, x: m(x))(layer, x)), expected, atol=1e-5, rtol=0)


def test_auto_lowering_is_patches_on_cpu_and_a_bad_lowering_is_a_clear_error():
    assert jaxae.models.resolve_lowering("auto") == ("patches" if jax.default_backend() == "cpu" else "native")
    with pytest.raises(JaxaeError, match=r"unknown conv lowering 'cudnn'; choose one of auto, native, patches"):
        ConvAutoencoder(lowering="cudnn", rngs=nnx.Rngs(0))


@pytest.mark.slow
def test_a_conv_model_gives_the_same_numbers_under_either_lowering():
    x = jax.random.uniform(jax.random.key(3), (4, 12, 8, 3))
    for cls in (ConvAutoencoder, ConvVAE):
        ys = [cls((12, 8, 3), latent_dim=6, lowering=lo, rngs=nnx.Rngs(0))(x) for lo in ("native", "patches")]
        np.testing.assert_allclose(ys[1], ys[0], atol=1e-5, rtol=0)
