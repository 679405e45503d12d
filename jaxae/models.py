"""Flax NNX modules: the document's autoencoder and its relatives. No training code here.

Attribute structure mirrors the PyTorch modules (``encoder``/``decoder`` sequences whose
layer indices match ``nn.Sequential``'s), so converting weights is a rename plus a
transpose. ``init="torch"`` reproduces ``torch.nn.Linear``'s default initialisation
(weights and biases uniform in +-1/sqrt(fan_in)); ``init="flax"`` keeps Flax's defaults
(LeCun-normal weights, zero biases).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxae.data import shape_text
from jaxae.errors import JaxaeError

INITS = ("torch", "flax")


@runtime_checkable
class AutoencoderModel(Protocol):
    """The contract of a model jaxae trains: its own (:class:`Autoencoder`, :class:`ConvAutoencoder`)
    and any NNX module of yours given to :func:`jaxae.fit` or :func:`jaxae.create_train_state`.

    Inputs are normalised images flattened to ``[B, D]`` with ``D = H * W * C`` (the row-major
    flattening of ``[B, H, W, C]``): a conv model reshapes them itself. An ``image_shape``
    attribute ``(H, W, C)`` lets jaxae check the shape before training and save it with the
    checkpoint.

    - ``model(x)``: the reconstruction, ``[B, D]``, in the units of ``x``.
    - ``encode(x)``: the code, ``[B, latent]`` (the probe and figures use it).
    - ``decode(z)``: codes back to ``[B, D]`` (the sparse objective reconstructs through it).
    """

    def __call__(self, x: jax.Array) -> jax.Array: ...

    def encode(self, x: jax.Array) -> jax.Array: ...

    def decode(self, z: jax.Array) -> jax.Array: ...


@runtime_checkable
class VariationalModel(AutoencoderModel, Protocol):
    """The contract of a model for the ``vae`` objective: :class:`AutoencoderModel`, plus

    - ``encode_distribution(x)``: ``(mean, logvar)`` of the diagonal Gaussian q(z|x), each ``[B, latent]``;
    - ``decode_logits(z)``: the pixel likelihood's logits (Bernoulli) or means (Gaussian), ``[B, D]``;
    - optionally ``sample(key, n)``: ``n`` images from the prior, ``[n, D]``, for ``samples.png``.
    """

    def encode_distribution(self, x: jax.Array) -> tuple[jax.Array, jax.Array]: ...

    def decode_logits(self, z: jax.Array) -> jax.Array: ...


# torch.nn.Linear draws W ~ kaiming_uniform(a=sqrt(5)), i.e. U(-b, b) with b = 1/sqrt(fan_in);
# variance_scaling(1/3, fan_in, uniform) has limit sqrt(3 * (1/3) / fan_in): the same bound.
torch_kernel_init = jax.nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_bias_init(fan_in: int):
    """torch's bias default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def linear(
    in_features: int,
    out_features: int,
    *,
    init: str,
    rngs: nnx.Rngs,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
) -> nnx.Linear:
    """An ``nnx.Linear`` initialised like ``torch.nn.Linear`` (``init="torch"``) or like Flax.

    ``dtype``: the compute dtype (``None``: that of the inputs and parameters); ``param_dtype``:
    the parameters' dtype, as ``nnx.Linear`` takes them."""
    precision = {"dtype": dtype, "param_dtype": param_dtype}
    if init == "torch":
        return nnx.Linear(
            in_features,
            out_features,
            kernel_init=torch_kernel_init,
            bias_init=torch_bias_init(in_features),
            rngs=rngs,
            **precision,
        )
    if init == "flax":
        return nnx.Linear(in_features, out_features, rngs=rngs, **precision)
    raise JaxaeError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")


def mlp_layers(
    dims: Sequence[int], *, init: str, rngs: nnx.Rngs, dtype: Any = None, param_dtype: Any = jnp.float32
) -> list:
    """Linear, ReLU, Linear, ..., Linear: the layer list of one of the document's Sequentials."""
    layers: list = []
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        if i:
            layers.append(jax.nn.relu)
        layers.append(linear(d_in, d_out, init=init, rngs=rngs, dtype=dtype, param_dtype=param_dtype))
    return layers


def check_dtypes(dtype: Any, param_dtype: Any) -> None:
    """Refuses, in one line, a compute or parameter dtype that is not floating point."""
    for name, value in (("dtype", dtype), ("param_dtype", param_dtype)):
        if value is None and name == "dtype":
            continue
        try:
            ok = jnp.issubdtype(jnp.dtype(value), jnp.floating)
        except TypeError:
            ok = False
        if not ok:
            raise JaxaeError(f"{name} must be a floating-point dtype such as float32 or bfloat16, got {value!r}")


def output(y: jax.Array, dtype: Any) -> jax.Array:
    """A model's output for its objective: float32 when the model computes in a lower ``dtype``,
    so every loss is computed in float32 (mixed precision); unchanged otherwise."""
    return y if dtype is None else y.astype(jnp.float32)


def image_shape_of(input_shape: int | Sequence[int]) -> tuple[int, ...]:
    """``(H, W, C)`` from an image shape, or from a flat size (square, one channel; ``(D,)`` when
    ``D`` is not a square: a flat size alone cannot tell ``32x32x3`` from ``3072`` pixels in a row)."""
    if isinstance(input_shape, int):
        side = math.isqrt(input_shape)
        return (side, side, 1) if side * side == input_shape else (input_shape,)
    return tuple(input_shape)


def flatten_images(x: jax.Array, input_dim: int, image_shape: Sequence[int] | None = None) -> jax.Array:
    """``[N, H, W, C]`` or ``[N, H * W * C]`` -> ``[N, H * W * C]`` (flattened in ``(h, w, c)``
    order), with a clear error for anything else.

    Images ``[N, H', W', C']`` of another shape are refused even when ``H' * W' * C'`` is the
    model's input size: a model for 32x16x3 images would read 16x32x3 ones without complaint, and
    compute nonsense. Flat inputs are taken as they are (their shape says nothing more).
    """
    if x.ndim < 1 or math.prod(x.shape[1:]) != input_dim or x.ndim == 1:
        raise JaxaeError(
            f"expected a batch of inputs of shape [N, {input_dim}] (or [N, H, W, C] with "
            f"H*W*C = {input_dim}), got shape {tuple(x.shape)}"
        )
    if image_shape is not None and len(image_shape) == 3 and x.ndim == 4 and tuple(x.shape[1:]) != tuple(image_shape):
        raise JaxaeError(
            f"the model takes {shape_text(image_shape)} images ([N, {', '.join(map(str, image_shape))}]), "
            f"got a batch of shape {tuple(x.shape)}"
        )
    return x.reshape(x.shape[0], input_dim)


CODE_ACTIVATIONS = {"linear": None, "relu": jax.nn.relu, "sigmoid": jax.nn.sigmoid}


class Autoencoder(nnx.Module):
    """The document's MLP autoencoder.

    Encoder ``784-128-64-32`` with ReLU between layers (the code is linear); decoder
    ``32-64-128-784`` with ReLU between layers and a final Sigmoid. ``encoder.layers[i]``
    corresponds to the PyTorch ``encoder[i]`` (ReLUs sit at the odd indices, as there).

    Args:
        input_dim: the image shape ``(H, W, C)``, or the flattened image size (``784`` is taken
            as 28x28x1). Inputs are ``[N, H, W, C]`` or ``[N, H * W * C]`` flattened in
            ``(h, w, c)`` order; outputs are flat.
        hidden_dims: encoder hidden widths; the decoder mirrors them.
        latent_dim: code size.
        init: ``"torch"`` (``torch.nn.Linear`` defaults) or ``"flax"``.
        code_activation: ``"linear"`` (the document's), or ``"relu"`` / ``"sigmoid"`` appended
            to the encoder (the sparse variant: a code that can be exactly zero, or a rate in
            (0, 1)); it holds no parameters, so weight conversion is unchanged.
        dtype: the compute dtype, e.g. ``jnp.bfloat16`` (``None``: float32, as the parameters);
            codes and reconstructions come out in float32 either way, so losses are float32.
        param_dtype: the parameters' dtype (float32; the optimizer state follows it).
        rngs: parameter rngs.
    """

    def __init__(
        self,
        input_dim: int | Sequence[int] = 784,
        hidden_dims: Sequence[int] = (128, 64),
        latent_dim: int = 32,
        *,
        init: str = "torch",
        code_activation: str = "linear",
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        check_dtypes(dtype, param_dtype)
        if code_activation not in CODE_ACTIVATIONS:
            raise JaxaeError(
                f"unknown code activation {code_activation!r}; choose one of {', '.join(CODE_ACTIVATIONS)}"
            )
        self.image_shape = image_shape_of(input_dim)
        input_dim = self.input_dim = math.prod(self.image_shape)
        self.latent_dim = latent_dim
        self.dtype = dtype
        dims = (input_dim, *hidden_dims, latent_dim)
        layer = {"init": init, "rngs": rngs, "dtype": dtype, "param_dtype": param_dtype}
        encoder = mlp_layers(dims, **layer)
        if CODE_ACTIVATIONS[code_activation] is not None:
            encoder.append(CODE_ACTIVATIONS[code_activation])
        self.encoder = nnx.Sequential(*encoder)
        self.decoder = nnx.Sequential(*mlp_layers(dims[::-1], **layer), jax.nn.sigmoid)

    def encode(self, x: jax.Array) -> jax.Array:
        """Images ``[N, H, W, C]`` (or flat ``[N, H * W * C]``) -> codes ``[N, latent_dim]``."""
        return output(self.encoder(flatten_images(x, self.input_dim, self.image_shape)), self.dtype)

    def decode(self, z: jax.Array) -> jax.Array:
        """Codes ``[N, latent_dim]`` -> flat reconstructions ``[N, H * W * C]`` in (0, 1)."""
        return output(self.decoder(z), self.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.decode(self.encode(x))


def gaussian_sample(key: jax.Array, mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """The reparameterised sample ``mean + exp(logvar / 2) * eps``."""
    return mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)


class VAE(nnx.Module):
    """A variational autoencoder with the document's MLP sizes.

    ``encoder`` (``784-128-64`` with ReLU) feeds two heads, ``mean`` and ``logvar``
    (``64 -> 32`` each) of a diagonal Gaussian q(z|x); ``decoder`` (``32-64-128-784``, ReLU
    between layers) outputs logits of the pixel likelihood, so losses can use a numerically
    stable sigmoid cross-entropy. ``decode`` applies the Sigmoid. ``dtype`` and ``param_dtype``
    as :class:`Autoencoder`'s: the posterior and the logits come out in float32.
    """

    def __init__(
        self,
        input_dim: int | Sequence[int] = 784,
        hidden_dims: Sequence[int] = (128, 64),
        latent_dim: int = 32,
        *,
        init: str = "torch",
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        check_dtypes(dtype, param_dtype)
        self.image_shape = image_shape_of(input_dim)  # as Autoencoder's input_dim
        input_dim = self.input_dim = math.prod(self.image_shape)
        self.latent_dim = latent_dim
        self.dtype = dtype
        layer = {"init": init, "rngs": rngs, "dtype": dtype, "param_dtype": param_dtype}
        trunk = (input_dim, *hidden_dims)
        self.encoder = nnx.Sequential(*mlp_layers(trunk, **layer), jax.nn.relu)
        self.mean = linear(trunk[-1], latent_dim, **layer)
        self.logvar = linear(trunk[-1], latent_dim, **layer)
        self.decoder = nnx.Sequential(*mlp_layers((latent_dim, *hidden_dims[::-1], input_dim), **layer))

    def encode_distribution(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """q(z|x) as ``(mean, logvar)``, each ``[N, latent_dim]``."""
        h = self.encoder(flatten_images(x, self.input_dim, self.image_shape))
        return output(self.mean(h), self.dtype), output(self.logvar(h), self.dtype)

    def encode(self, x: jax.Array) -> jax.Array:
        """The posterior mean: the deterministic code used for features and figures."""
        return self.encode_distribution(x)[0]

    def decode_logits(self, z: jax.Array) -> jax.Array:
        return output(self.decoder(z), self.dtype)

    def decode(self, z: jax.Array) -> jax.Array:
        return jax.nn.sigmoid(self.decode_logits(z))

    def __call__(self, x: jax.Array) -> jax.Array:
        """Reconstruction from the posterior mean (no sampling), in (0, 1)."""
        return self.decode(self.encode(x))

    def sample(self, key: jax.Array, n: int) -> jax.Array:
        """``n`` images decoded from the prior N(0, I), in (0, 1)."""
        return self.decode(jax.random.normal(key, (n, self.latent_dim)))


# -- convolutional option -------------------------------------------------------------------
#
# Each conv layer has two lowerings with the same parameters and the same numbers (within float
# rounding), chosen by ``lowering``:
#
# - ``"native"``: ``lax.conv_general_dilated`` / ``lax.conv_transpose``, which cuDNN and the TPU's
#   convolution units run far faster than anything written around them;
# - ``"patches"``: slices and matrix products. Inside the epoch's ``lax.scan`` XLA's CPU backend
#   runs the gradients of a native convolution with more than one channel 3-5x slower than this
#   form (measured here with jax 0.10.2), while slices and dots keep their fast paths.
#
# ``"auto"`` (the default) is ``"patches"`` on CPU and ``"native"`` elsewhere, decided when the
# step is traced. The parameters keep the layouts of ``nnx.Conv`` / ``nnx.ConvTranspose``, so
# weight conversion does not depend on the lowering.

LOWERINGS = ("auto", "native", "patches")
_NHWC = ("NHWC", "HWIO", "NHWC")


def resolve_lowering(lowering: str) -> str:
    """``"native"`` or ``"patches"``: what ``lowering`` means on the default backend."""
    if lowering not in LOWERINGS:
        raise JaxaeError(f"unknown conv lowering {lowering!r}; choose one of {', '.join(LOWERINGS)}")
    if lowering == "auto":
        return "patches" if jax.default_backend() == "cpu" else "native"
    return lowering


def conv3x3(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """A 3x3 convolution with padding 1 of NHWC ``x`` by an HWIO ``kernel`` (cross-correlation,
    as ``torch.nn.Conv2d`` and ``lax.conv_general_dilated``), as patches times a matrix."""
    n, h, w, c = x.shape
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    patches = jnp.concatenate(
        [
            xp[:, ky : ky + stride * (ho - 1) + 1 : stride, kx : kx + stride * (wo - 1) + 1 : stride, :]
            for ky in range(3)
            for kx in range(3)
        ],
        axis=-1,
    )  # [N, Ho, Wo, 9 * C], ordered (ky, kx, c) like the kernel's reshape below
    return patches @ kernel.reshape(9 * c, kernel.shape[-1])


def _conv_inits(init: str, fan_in: int):
    if init == "torch":
        return torch_kernel_init, torch_bias_init(fan_in)
    if init == "flax":
        return jax.nn.initializers.lecun_normal(), jax.nn.initializers.zeros
    raise JaxaeError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")


class Conv2x(nnx.Module):
    """``torch.nn.Conv2d(in_ch, out_ch, 3, stride=2, padding=1)``: halves H and W.

    ``kernel`` is ``[3, 3, in, out]`` (``nnx.Conv``'s layout; torch's weight ``[out, in, 3, 3]``
    transposed by ``(2, 3, 1, 0)``), ``bias`` is ``[out]``. ``lowering``: see :data:`LOWERINGS`.
    ``dtype``/``param_dtype``: the compute and parameter dtypes, as ``nnx.Conv`` takes them.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        *,
        init: str,
        rngs: nnx.Rngs,
        lowering: str = "auto",
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
    ):
        resolve_lowering(lowering)
        kernel_init, bias_init = _conv_inits(init, in_ch * 9)
        self.lowering, self.dtype = lowering, dtype
        self.kernel = nnx.Param(kernel_init(rngs.params(), (3, 3, in_ch, out_ch), param_dtype))
        self.bias = nnx.Param(bias_init(rngs.params(), (out_ch,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x, kernel, bias = nnx.nn.dtypes.promote_dtype((x, self.kernel[...], self.bias[...]), dtype=self.dtype)
        if resolve_lowering(self.lowering) == "native":
            y = jax.lax.conv_general_dilated(x, kernel, (2, 2), ((1, 1), (1, 1)), dimension_numbers=_NHWC)
        else:
            y = conv3x3(x, kernel, 2)
        return y + bias


def conv(in_ch: int, out_ch: int, **layer: Any) -> Conv2x:
    """``torch.nn.Conv2d(in_ch, out_ch, 3, stride=2, padding=1)`` (see :class:`Conv2x` for ``layer``)."""
    return Conv2x(in_ch, out_ch, **layer)


# A 4x4, stride-2, padding-1 transposed convolution writes output row o = 2i - 1 + k from input
# row i through kernel row k. So output row 2m + a (phase a) takes, as (kernel row, input row
# m + shift): even rows (3, -1) and (1, 0); odd rows (2, 0) and (0, +1). Columns alike.
_PHASE_TAPS = (((3, -1), (1, 0)), ((2, 0), (0, 1)))


def _interleave_phases(phases: list[list[jax.Array]]) -> jax.Array:
    """``phases[a][b]``, each ``[..., H, W, C]``, -> ``[..., 2H, 2W, C]`` with row 2m + a, column 2n + b."""
    rows = [jnp.stack(cols, axis=-2) for cols in phases]  # [..., H, W, 2 (b), C]
    y = jnp.stack(rows, axis=-4)  # [..., H, 2 (a), W, 2 (b), C]
    *lead, h, _, w, _, c = y.shape
    return y.reshape(*lead, 2 * h, 2 * w, c)


def conv_transpose_phases(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """``torch.nn.ConvTranspose2d(in, out, 4, stride=2, padding=1)`` of NHWC ``x`` by a
    ``[4, 4, out, in]`` kernel, gathering: each of the four output phases is a 2x2 convolution of
    the input (its four taps as patches, times a ``[4 * in, out]`` matrix). No multiply by zero."""
    n, h, w, _ = x.shape
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    phases = []
    for a in range(2):
        cols = []
        for b in range(2):
            taps = [(ky, di, kx, dj) for ky, di in _PHASE_TAPS[a] for kx, dj in _PHASE_TAPS[b]]
            patches = jnp.concatenate([xp[:, 1 + di : 1 + di + h, 1 + dj : 1 + dj + w, :] for _, di, _, dj in taps], -1)
            cols.append(patches @ jnp.concatenate([kernel[ky, kx].T for ky, _, kx, _ in taps], axis=0))
        phases.append(cols)
    return _interleave_phases(phases)


def conv_transpose_scatter(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """The same transposed convolution, scattering: every input pixel times the kernel gives its
    4x4 patch of output (one ``[in, 16 * out]`` matrix product), and each output phase adds the
    four patches that overlap it. Its intermediate holds ``16 * out`` values per input pixel
    against the gathering form's ``16 * in``: the faster form for a layer that writes few channels."""
    n, h, w, c_in = x.shape
    c_out = kernel.shape[2]
    z = (x.reshape(n * h * w, c_in) @ kernel.transpose(3, 0, 1, 2).reshape(c_in, 16 * c_out)).reshape(
        n, h, w, 4, 4, c_out
    )
    zp = jnp.pad(z, ((0, 0), (1, 1), (1, 1), (0, 0), (0, 0), (0, 0)))
    phases = [
        [
            sum(
                zp[:, 1 + di : 1 + di + h, 1 + dj : 1 + dj + w, ky, kx, :]
                for ky, di in _PHASE_TAPS[a]
                for kx, dj in _PHASE_TAPS[b]
            )
            for b in range(2)
        ]
        for a in range(2)
    ]
    return _interleave_phases(phases)


class ConvTranspose2x(nnx.Module):
    """``torch.nn.ConvTranspose2d(in_ch, out_ch, 4, stride=2, padding=1)``: doubles H and W.

    The parameters have ``nnx.ConvTranspose``'s layout (``transpose_kernel=True``): ``kernel``
    ``[4, 4, out, in]`` is torch's weight ``[in, out, 4, 4]`` transposed by ``(2, 3, 1, 0)``.
    ``lowering`` (see :data:`LOWERINGS`): ``"native"`` is ``lax.conv_transpose``; ``"patches"``
    runs no dilated convolution (XLA's CPU backend has no fast path for one) but
    :func:`conv_transpose_phases`, or :func:`conv_transpose_scatter` for a layer with at most a
    quarter as many output channels as input ones (an image's last layer), whichever measured
    faster here.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        *,
        init: str,
        rngs: nnx.Rngs,
        lowering: str = "auto",
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
    ):
        resolve_lowering(lowering)
        # torch takes a transposed convolution's fan-in from weight axis 1, the *output*
        # channels: axis -2 of this kernel, variance_scaling's default in_axis.
        kernel_init, bias_init = _conv_inits(init, out_ch * 16)
        self.in_ch, self.out_ch, self.lowering, self.dtype = in_ch, out_ch, lowering, dtype
        self.kernel = nnx.Param(kernel_init(rngs.params(), (4, 4, out_ch, in_ch), param_dtype))
        self.bias = nnx.Param(bias_init(rngs.params(), (out_ch,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x, kernel, bias = nnx.nn.dtypes.promote_dtype((x, self.kernel[...], self.bias[...]), dtype=self.dtype)
        if resolve_lowering(self.lowering) == "native":
            y = jax.lax.conv_transpose(
                x, kernel, (2, 2), ((2, 2), (2, 2)), dimension_numbers=_NHWC, transpose_kernel=True
            )
        elif 4 * self.out_ch <= self.in_ch:
            y = conv_transpose_scatter(x, kernel)
        else:
            y = conv_transpose_phases(x, kernel)
        return y + bias


def conv_transpose(in_ch: int, out_ch: int, **layer: Any) -> ConvTranspose2x:
    """``torch.nn.ConvTranspose2d(in_ch, out_ch, 4, stride=2, padding=1)`` (see :class:`ConvTranspose2x`)."""
    return ConvTranspose2x(in_ch, out_ch, **layer)


#: The conv models' default channels after each stride-2 convolution (``--conv-channels``).
CONV_CHANNELS = (16, 32)


def check_conv_stages(image_shape: tuple[int, ...], channels: tuple[int, ...]) -> None:
    """Raises :class:`JaxaeError` (one line) unless ``channels`` (one stride-2 stage each) fit ``image_shape``."""
    if len(image_shape) != 3:
        raise JaxaeError(f"the conv architecture needs an image shape (H, W, C), got {tuple(image_shape)}")
    if not channels or any(not isinstance(c, int) or c <= 0 for c in channels):
        raise JaxaeError(f"--conv-channels must be positive integers, one per stride-2 stage, got {channels}")
    h, w, _ = image_shape
    factor = 2 ** len(channels)
    if h % factor or w % factor:
        given = ",".join(map(str, channels))
        raise JaxaeError(
            f"--conv-channels {given} halves each side {len(channels)} times, so it needs image sides divisible by "
            f"{factor}, got {h}x{w}; give fewer stages, or use --arch mlp, or crop or pad the images"
        )


class _ConvBase(nnx.Module):
    """Shared conv trunk: ``[N, H, W, C]`` -> one stride-2 conv per entry of ``channels`` (ReLU
    after each) -> ``[N, (H / 2^S) * (W / 2^S) * channels[-1]]`` for S stages, and the decoder back
    (transposed convs through the channels in reverse, ReLU between them). A subclass adds its
    code heads in ``_heads(feature_dim, layer)``, ``layer`` being the keyword arguments of
    :func:`linear`. ``lowering``: how the conv layers are computed
    (see :data:`LOWERINGS`); it changes no numbers. ``dtype`` and ``param_dtype`` as
    :class:`Autoencoder`'s: codes, posteriors and logits come out in float32.
    """

    per_position = False

    def __init__(
        self,
        image_shape=(28, 28, 1),
        channels=CONV_CHANNELS,
        latent_dim=32,
        *,
        init="torch",
        lowering="auto",
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        check_dtypes(dtype, param_dtype)
        self.latent_dim = latent_dim
        self.dtype = dtype
        dense = {"init": init, "rngs": rngs, "dtype": dtype, "param_dtype": param_dtype}
        feature_dim = self._build(image_shape, channels, dense, lowering)
        self._heads(feature_dim, dense)

    def _build(self, image_shape, channels, dense, lowering):
        channels = tuple(channels)
        check_conv_stages(image_shape, channels)
        h, w, c = image_shape
        factor = 2 ** len(channels)
        self.image_shape = tuple(image_shape)
        self.input_dim = h * w * c
        self.feature_shape = (h // factor, w // factor, channels[-1])
        layer = {**dense, "lowering": lowering}
        down = (c, *channels)
        encoder: list = []
        for c_in, c_out in zip(down[:-1], down[1:], strict=True):
            encoder += [conv(c_in, c_out, **layer), jax.nn.relu]
        self.encoder = nnx.Sequential(*encoder)
        feature_dim = math.prod(self.feature_shape)
        # A per-position model (the VQ-VAE's) codes each feature-map position on its own.
        self.project = linear(self.latent_dim, channels[-1] if self.per_position else feature_dim, **dense)
        up = down[::-1]
        decoder: list = []
        for i, (c_in, c_out) in enumerate(zip(up[:-1], up[1:], strict=True)):
            decoder += ([jax.nn.relu] if i else []) + [conv_transpose(c_in, c_out, **layer)]
        self.decoder = nnx.Sequential(*decoder)
        return feature_dim

    def _features(self, x):
        x = flatten_images(x, self.input_dim, self.image_shape).reshape(-1, *self.image_shape)
        return self.encoder(x).reshape(x.shape[0], -1)

    def decode_logits(self, z):
        h = jax.nn.relu(self.project(z)).reshape(-1, *self.feature_shape)
        return output(self.decoder(h).reshape(z.shape[0], -1), self.dtype)

    def decode(self, z):
        return jax.nn.sigmoid(self.decode_logits(z))

    def __call__(self, x):
        return self.decode(self.encode(x))


class ConvAutoencoder(_ConvBase):
    """A convolutional autoencoder for ``H x W x C`` images (``--arch conv``), H and W divisible by
    2 to the number of stages (4 for the default ``channels=(16, 32)``, ``--conv-channels``).

    Encoder, by default: conv 3x3/2 (16) -> ReLU -> conv 3x3/2 (32) -> ReLU -> linear code; decoder:
    linear -> ReLU -> transposed conv 4x4/2 (16) -> ReLU -> transposed conv 4x4/2 (C) -> Sigmoid.
    Each further entry of ``channels`` adds a stride-2 stage on each side.
    Inputs are ``[N, H, W, C]`` or flat; outputs are flat ``[N, H * W * C]`` like the MLP's, so
    every objective works unchanged.
    """

    def _heads(self, feature_dim, dense):
        self.code = linear(feature_dim, self.latent_dim, **dense)

    def encode(self, x):
        return output(self.code(self._features(x)), self.dtype)


class ConvVAE(_ConvBase):
    """The conv trunk with Gaussian ``mean``/``logvar`` heads: a convolutional :class:`VAE`."""

    def _heads(self, feature_dim, dense):
        self.mean = linear(feature_dim, self.latent_dim, **dense)
        self.logvar = linear(feature_dim, self.latent_dim, **dense)

    def encode_distribution(self, x):
        h = self._features(x)
        return output(self.mean(h), self.dtype), output(self.logvar(h), self.dtype)

    def encode(self, x):
        return self.encode_distribution(x)[0]

    def sample(self, key, n):
        return self.decode(jax.random.normal(key, (n, self.latent_dim)))


# -- vector quantisation (VQ-VAE) ------------------------------------------------------------


#: a code whose EMA count (inputs per step) falls below this is dead, and restarted
DEAD_CODE_COUNT = 1.0


class CodebookState(nnx.Variable):
    """State of a :class:`VectorQuantizer` trained by exponential moving averages, not by gradients.

    It lives in the model's state beside the parameters (so checkpoints, sweeps and every
    parallel strategy carry it), receives no gradient (the objective stops it), and the train
    step sets it after the optimizer's update (``Objective.update_state``).
    """


class VectorQuantizer(nnx.Module):
    """A codebook of ``size`` vectors of width ``dim`` (van den Oord et al., 2017) updated by EMA.

    ``codebook`` is ``ema_sum / smoothed(ema_count)``. Every code starts as if it had been chosen
    once (``ema_count = 1``, ``ema_sum = codebook``): a code no input picks keeps its vector, the
    mean of the inputs that pick it moves it otherwise.
    """

    def __init__(self, size: int, dim: int, *, decay: float = 0.99, eps: float = 1e-5, rngs: nnx.Rngs):
        if size < 1 or dim < 1:
            raise JaxaeError(f"a codebook needs a positive size and width, got {size} codes of width {dim}")
        self.size, self.dim, self.decay, self.eps = size, dim, decay, eps
        bound = 1.0 / size
        init = jax.random.uniform(rngs.params(), (size, dim), jnp.float32, -bound, bound)
        self.codebook = CodebookState(init)
        self.ema_count = CodebookState(jnp.ones((size,), jnp.float32))
        self.ema_sum = CodebookState(init)

    def __call__(self, z: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Codes ``[..., dim]`` -> (the nearest code's index ``[...]``, its vector ``[..., dim]``).

        Distances are computed in float32 at full precision; no gradient reaches the codebook.
        """
        z = z.astype(jnp.float32)
        codebook = jax.lax.stop_gradient(self.codebook[...])
        cross = jnp.matmul(z, codebook.T, precision=jax.lax.Precision.HIGHEST)
        distances = jnp.sum(jnp.square(codebook), -1) - 2.0 * cross
        index = jnp.argmin(distances, axis=-1)
        return index, codebook[index]

    def update(
        self,
        counts: jax.Array,
        sums: jax.Array,
        decay: Any = None,
        restart: tuple[jax.Array, jax.Array] | None = None,
    ) -> None:
        """One EMA step from a batch's ``counts [size]`` (inputs per code) and ``sums [size, dim]``
        (their sum), already summed over every device; sets the codebook to the smoothed means.

        ``restart``: ``(sums [size, dim], counts [size])`` of a random share of the batch's inputs
        per code. A code whose EMA count has fallen below :data:`DEAD_CODE_COUNT` inputs per step
        (a dead code) restarts as the mean of its share, as if chosen once: so the codebook
        follows the encoder instead of collapsing onto the few codes that won the first steps.
        """
        decay = self.decay if decay is None else decay
        count = decay * self.ema_count[...] + (1.0 - decay) * counts
        total = decay * self.ema_sum[...] + (1.0 - decay) * sums
        if restart is not None:
            share_sum, share_count = restart
            dead = (count < DEAD_CODE_COUNT) & (share_count > 0)
            count = jnp.where(dead, 1.0, count)
            total = jnp.where(dead[:, None], share_sum / jnp.maximum(share_count, 1.0)[:, None], total)
        n = jnp.sum(count)
        smoothed = (count + self.eps) / (n + self.size * self.eps) * n  # Laplace smoothing
        self.ema_count[...] = count
        self.ema_sum[...] = total
        self.codebook[...] = total / smoothed[:, None]

    def frequencies(self) -> jax.Array:
        """How often each code was chosen in training (the EMA counts, normalised): ``[size]``."""
        count = self.ema_count[...]
        return count / jnp.sum(count)


def _sample_codes(quantizer: VectorQuantizer, key: jax.Array, shape: tuple[int, ...], prior: str) -> jax.Array:
    if prior == "uniform":
        return jax.random.randint(key, shape, 0, quantizer.size)
    if prior == "frequencies":
        return jax.random.categorical(key, jnp.log(quantizer.frequencies() + 1e-12), shape=shape)
    raise JaxaeError(f"unknown code prior {prior!r}; choose frequencies or uniform")


class _VQBase:
    """What the MLP and conv VQ-VAEs share, on top of ``encode_latent`` (images -> ``[N, P, D]``)
    and ``decode`` (flat ``[N, P * D]`` -> images)."""

    positions: int

    def encode(self, x: jax.Array) -> jax.Array:
        """The quantised code (each of the ``P`` code vectors replaced by its nearest codebook
        vector), flat ``[N, P * latent_dim]``: what the decoder reads, and the features of probes."""
        _, z_q = self.quantizer(self.encode_latent(x))
        return z_q.reshape(z_q.shape[0], -1)

    def codes(self, x: jax.Array) -> jax.Array:
        """The codebook indices of images: ``[N, P]`` ints."""
        return self.quantizer(self.encode_latent(x))[0]

    def decode_codes(self, codes: jax.Array) -> jax.Array:
        """Indices ``[N, P]`` -> images (flat, in (0, 1))."""
        z_q = self.quantizer.codebook[...][codes]
        return self.decode(z_q.reshape(codes.shape[0], -1))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.decode(self.encode(x))

    def sample(self, key: jax.Array, n: int, prior: str = "frequencies") -> jax.Array:
        """``n`` images decoded from codes drawn independently per position, uniformly
        (``prior="uniform"``) or by how often training chose each code (``"frequencies"``)."""
        return self.decode_codes(_sample_codes(self.quantizer, key, (n, self.positions), prior))


class VQVAE(_VQBase, nnx.Module):
    """An MLP VQ-VAE: the document's encoder to one code vector of ``latent_dim``, quantised to the
    nearest of ``codebook_size`` vectors (a codebook trained by EMA), decoded by the document's
    decoder. ``dtype`` and ``param_dtype`` as :class:`Autoencoder`'s."""

    def __init__(
        self,
        input_dim: int | Sequence[int] = 784,
        hidden_dims: Sequence[int] = (128, 64),
        latent_dim: int = 32,
        codebook_size: int = 512,
        *,
        decay: float = 0.99,
        init: str = "torch",
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        check_dtypes(dtype, param_dtype)
        self.image_shape = image_shape_of(input_dim)
        input_dim = self.input_dim = math.prod(self.image_shape)
        self.latent_dim, self.dtype, self.positions = latent_dim, dtype, 1
        dims = (input_dim, *hidden_dims, latent_dim)
        layer = {"init": init, "rngs": rngs, "dtype": dtype, "param_dtype": param_dtype}
        self.encoder = nnx.Sequential(*mlp_layers(dims, **layer))
        self.decoder = nnx.Sequential(*mlp_layers(dims[::-1], **layer), jax.nn.sigmoid)
        self.quantizer = VectorQuantizer(codebook_size, latent_dim, decay=decay, rngs=rngs)

    def encode_latent(self, x: jax.Array) -> jax.Array:
        """The encoder's output before quantisation: ``[N, 1, latent_dim]``."""
        z = output(self.encoder(flatten_images(x, self.input_dim, self.image_shape)), self.dtype)
        return z[:, None, :]

    def decode(self, z: jax.Array) -> jax.Array:
        return output(self.decoder(z), self.dtype)


class ConvVQVAE(_VQBase, _ConvBase):
    """The conv trunk as a VQ-VAE: each position of the encoder's ``H/2^S x W/2^S`` feature map
    is projected to a code vector of ``latent_dim`` (a linear layer applied per position, a 1x1
    convolution) and quantised, as in van den Oord et al.; the decoder projects each back."""

    per_position = True

    def __init__(
        self,
        image_shape=(28, 28, 1),
        channels=CONV_CHANNELS,
        latent_dim=32,
        codebook_size=512,
        *,
        decay=0.99,
        rngs: nnx.Rngs,
        **kwargs,
    ):
        super().__init__(image_shape, channels, latent_dim, rngs=rngs, **kwargs)
        self.positions = self.feature_shape[0] * self.feature_shape[1]
        self.quantizer = VectorQuantizer(codebook_size, latent_dim, decay=decay, rngs=rngs)

    def _heads(self, feature_dim, dense):
        self.code = linear(self.feature_shape[-1], self.latent_dim, **dense)

    def encode_latent(self, x):
        """``[N, positions, latent_dim]``: one code vector per position of the feature map."""
        h = self._features(x).reshape(x.shape[0], -1, self.feature_shape[-1])
        return output(self.code(h), self.dtype)

    def decode_logits(self, z):
        n = z.shape[0]
        h = jax.nn.relu(self.project(z.reshape(n, -1, self.latent_dim))).reshape(-1, *self.feature_shape)
        return output(self.decoder(h).reshape(n, -1), self.dtype)

    def decode(self, z):
        return jax.nn.sigmoid(self.decode_logits(z))
