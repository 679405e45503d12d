"""One loss per autoencoder variant, the metrics it reports, and the variant registry.

An :class:`Objective` works per example: ``loss(model, x, keys)`` returns the loss of each
example ``[B]`` and a dict of per-example metrics, so the train step can mask padded rows
and reduce across devices with plain sums (the same numbers on 1 or many devices). ``keys``
holds one PRNG key per example, derived from the example's index in the dataset and the
step, so any randomness (noise, reparameterisation) is the same however the batch is split.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxae import models
from jaxae.data import Normalization
from jaxae.errors import JaxaeError

PerExample = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Objective:
    """What a variant optimises and reports.

    Attributes:
        name: the variant's name.
        loss: ``(model, x, keys) -> (loss [B], metrics {name: [B]})`` for training.
        evaluate: ``(model, x, keys) -> {name: [B]}`` for the test split; must hold ``"loss"``.
        corrupt: ``(x, keys) -> model input`` where the model sees a corrupted input (the
            denoiser); figures show it between the input and the output.
        update_state: for a model with state that is not trained by gradients (the VQ-VAE's
            EMA codebook): ``loss`` then returns a third item, per-example statistics
            ``{name: [B, ...]}`` (no gradient flows through them), and after the optimizer's
            update the train step calls ``update_state(model, stats, mask, total)`` to set that
            state in place; ``mask`` [B] marks the real rows, ``total(tree)`` sums over every
            device of a data-parallel step (the identity on one).
        summarize: ``{name: mean} -> {name: scalar}``, applied to the means of the training and
            test metrics: metrics that are not means of per-example values (a codebook's
            perplexity from its usage ``[K]``) are computed here from ones that are.
    """

    name: str
    loss: Callable[[nnx.Module, jax.Array, jax.Array], tuple[jax.Array, PerExample]]
    evaluate: Callable[[nnx.Module, jax.Array, jax.Array], PerExample]
    corrupt: Callable[[jax.Array, jax.Array], jax.Array] | None = None
    update_state: Callable[..., None] | None = None
    summarize: Callable[[dict[str, jax.Array]], dict[str, jax.Array]] | None = None


def reconstruction_mse(reconstruction: jax.Array, target: jax.Array) -> jax.Array:
    """Per-example mean squared error over features: ``[B, D] -> [B]``.

    Averaged over a batch this is exactly ``torch.nn.MSELoss()`` (mean over all elements).
    """
    return jnp.mean(jnp.square(reconstruction - target), axis=-1)


def vanilla_objective(config: Any, normalization: Normalization) -> Objective:
    """The document's objective: MSE between the input and its reconstruction."""

    def evaluate(model, x, keys):
        reconstruction = model(x)
        mse = reconstruction_mse(reconstruction, x)
        pixels = reconstruction_mse(normalization.to_pixels(reconstruction), normalization.to_pixels(x))
        return {"loss": mse, "mse": mse, "mse_pixels": pixels}

    def loss(model, x, keys):
        mse = reconstruction_mse(model(x), x)
        return mse, {}

    return Objective("vanilla", loss, evaluate)


def psnr(estimate: jax.Array, target: jax.Array) -> jax.Array:
    """Per-example peak signal-to-noise ratio in dB for images in [0, 1] pixel units: ``[B]``."""
    mse = reconstruction_mse(estimate, target)
    return 10.0 * jnp.log10(1.0 / jnp.maximum(mse, 1e-10))


def corrupt(
    x: jax.Array, keys: jax.Array, normalization: Normalization, noise_std: float, mask_prob: float
) -> jax.Array:
    """The denoiser's input: additive Gaussian noise and/or masking noise, clipped to the data range.

    ``noise_std`` is in pixel units (a fraction of the data range, so 0.5 means the same on
    [0, 1] and [-1, 1] data); masking sets each value to the background (the range's low end)
    with probability ``mask_prob``. One key per example: reproducible from the seed, fresh
    every step, and the same however the batch is split.
    """
    low, high = normalization.low, normalization.high
    # A traced setting (one per model in a sweep) cannot pick a branch: it takes both, and a
    # zero std or probability then leaves ``y`` exactly as the skipped branch would.
    add_noise = _maybe_positive(noise_std)
    add_mask = _maybe_positive(mask_prob)

    def one(key, xi):
        noise_key, mask_key = jax.random.split(key)
        y = xi
        if add_noise:
            y = y + noise_std * (high - low) * jax.random.normal(noise_key, xi.shape, xi.dtype)
        if add_mask:
            y = jnp.where(jax.random.bernoulli(mask_key, mask_prob, xi.shape), low, y)
        return jnp.clip(y, low, high)

    return jax.vmap(one)(keys, x)


def _maybe_positive(value: float | jax.Array) -> bool:
    """``value > 0`` for a Python number; True for an array, whose value is known only at run time."""
    return not isinstance(value, (int, float)) or value > 0


def denoising_objective(config: Any, normalization: Normalization) -> Objective:
    """Reconstruct the clean image from a corrupted one (corruption drawn inside the step)."""

    def noisy(x, keys):
        return corrupt(x, keys, normalization, config.noise_std, config.mask_prob)

    def loss(model, x, keys):
        return reconstruction_mse(model(noisy(x, keys)), x), {}

    def evaluate(model, x, keys):
        x_noisy = noisy(x, keys)
        denoised = model(x_noisy)
        mse = reconstruction_mse(denoised, x)
        clean, noisy_px, denoised_px = (normalization.to_pixels(v) for v in (x, x_noisy, denoised))
        return {
            "loss": mse,
            "mse": mse,
            "mse_pixels": reconstruction_mse(denoised_px, clean),
            "psnr_noisy": psnr(noisy_px, clean),
            "psnr_denoised": psnr(denoised_px, clean),
        }

    return Objective("denoising", loss, evaluate, corrupt=noisy)


ZERO_THRESHOLD = 1e-3


def bernoulli_kl(target_rate: float, rate: jax.Array) -> jax.Array:
    """KL(Bernoulli(target) || Bernoulli(rate)) elementwise."""
    rate = jnp.clip(rate, 1e-6, 1 - 1e-6)
    t = target_rate
    return t * jnp.log(t / rate) + (1 - t) * jnp.log((1 - t) / (1 - rate))


def sparsity_penalty(code: jax.Array, kind: str, target: float) -> jax.Array:
    """Per-example sparsity penalty of a code ``[B, L]``: ``[B]``.

    ``l1``: mean absolute activation. ``kl``: the summed Bernoulli KL of each unit's activation
    (a sigmoid rate) to the target rate. The classic formulation compares the *batch-average*
    rate; per example, the penalty does not depend on how a batch is split over devices.
    """
    if kind == "l1":
        return jnp.mean(jnp.abs(code), axis=-1)
    if kind == "kl":
        return jnp.sum(bernoulli_kl(target, code), axis=-1)
    raise JaxaeError(f"unknown sparsity penalty {kind!r}; choose l1 or kl")


def sparse_objective(config: Any, normalization: Normalization) -> Objective:
    """The document's MSE plus a weighted sparsity penalty on the code."""

    def code_metrics(code):
        return {
            "code_l1": jnp.mean(jnp.abs(code), axis=-1),
            "code_zero_fraction": jnp.mean((jnp.abs(code) < ZERO_THRESHOLD).astype(jnp.float32), axis=-1),
        }

    def parts(model, x):
        code = model.encode(x)
        reconstruction = model.decode(code)
        mse = reconstruction_mse(reconstruction, x)
        penalty = sparsity_penalty(code, config.sparsity, config.sparsity_target)
        return code, reconstruction, mse, penalty

    def loss(model, x, keys):
        _, _, mse, penalty = parts(model, x)
        return mse + config.sparsity_weight * penalty, {"mse": mse, "sparsity": penalty}

    def evaluate(model, x, keys):
        code, reconstruction, mse, penalty = parts(model, x)
        pixels = reconstruction_mse(normalization.to_pixels(reconstruction), normalization.to_pixels(x))
        return {
            "loss": mse + config.sparsity_weight * penalty,
            "mse": mse,
            "mse_pixels": pixels,
            "sparsity": penalty,
            **code_metrics(code),
        }

    return Objective("sparse", loss, evaluate)


LOG_2PI = math.log(2 * math.pi)


def gaussian_kl(mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """KL(N(mean, exp(logvar)) || N(0, I)) per example, in nats: ``[B]``."""
    return 0.5 * jnp.sum(jnp.exp(logvar) + jnp.square(mean) - 1.0 - logvar, axis=-1)


def log_likelihood(logits: jax.Array, x: jax.Array, normalization: Normalization, likelihood: str) -> jax.Array:
    """log p(x | z) per example in nats, from decoder logits ``[..., D]``.

    ``bernoulli``: pixel intensities in [0, 1] as Bernoulli means (sigmoid cross-entropy from
    logits, numerically stable). ``gaussian``: N(x; mean, 1/2) per value, i.e. the summed
    squared error plus its normalising constant, with the mean spanning the data range.
    """
    if likelihood == "bernoulli":
        return -jnp.sum(optax.sigmoid_binary_cross_entropy(logits, normalization.to_pixels(x)), axis=-1)
    if likelihood == "gaussian":
        mean = normalization.from_unit(jax.nn.sigmoid(logits))
        return -jnp.sum(jnp.square(x - mean), axis=-1) - 0.5 * x.shape[-1] * math.log(math.pi)
    raise JaxaeError(f"unknown likelihood {likelihood!r}; choose bernoulli or gaussian")


def vae_objective(config: Any, normalization: Normalization) -> Objective:
    """The negative ELBO per image in nats: ``-log p(x|z) + beta * KL(q(z|x) || p(z))``."""

    def parts(model, x, keys):
        mean, logvar = model.encode_distribution(x)
        z = jax.vmap(models.gaussian_sample)(keys, mean, logvar)
        recon = -log_likelihood(model.decode_logits(z), x, normalization, config.likelihood)
        return recon, gaussian_kl(mean, logvar)

    def loss(model, x, keys):
        recon, kl = parts(model, x, keys)
        return recon + config.beta * kl, {"recon": recon, "kl": kl}

    def evaluate(model, x, keys):
        recon, kl = parts(model, x, keys)
        reconstruction = model(x)  # from the posterior mean
        if config.likelihood == "gaussian":
            reconstruction = normalization.from_unit(reconstruction)
            pixels = normalization.to_pixels(reconstruction)
        else:
            pixels = reconstruction
        return {
            "loss": recon + config.beta * kl,
            "neg_elbo": recon + kl,
            "recon": recon,
            "kl": kl,
            "mse_pixels": reconstruction_mse(pixels, normalization.to_pixels(x)),
        }

    return Objective("vae", loss, evaluate)


def iwae_objective(config: Any, normalization: Normalization) -> Objective:
    """The importance-weighted bound with ``config.iwae_samples`` draws per image, in nats
    (Burda et al., 2016): ``-log (1/K) sum_k p(x|z_k) p(z_k) / q(z_k|x)``, on the VAE's model.

    K = 1 is a one-sample estimate of the VAE's negative ELBO (beta 1; its KL sampled, not in
    closed form), and the bound tightens as K grows. The test split reports both
    bounds: ``loss`` (the K-sample bound) and ``neg_elbo`` (one sample, as the VAE's).
    """
    samples = config.iwae_samples
    elbo = vae_objective(dataclasses.replace(config, beta=1.0), normalization)

    def bound(model, x, keys):
        return vae_iw_nll(model, x, keys, normalization, config.likelihood, samples)

    def loss(model, x, keys):
        return bound(model, x, keys), {}

    def evaluate(model, x, keys):
        # The one-sample ELBO draws from another stream than the K samples: fold_in(key, 1).
        elbo_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, 1)
        iw = bound(model, x, keys)
        return {**elbo.evaluate(model, x, elbo_keys), "loss": iw, "iw_bound": iw}

    return Objective("iwae", loss, evaluate)


def vae_iw_nll(
    model: nnx.Module,
    x: jax.Array,
    keys: jax.Array,
    normalization: Normalization,
    likelihood: str,
    samples: int,
    chunk: int | None = None,
) -> jax.Array:
    """Importance-weighted bound on -log p(x) with ``samples`` draws from q(z|x), per example.

    ``-log (1/K) sum_k p(x|z_k) p(z_k) / q(z_k|x)``; K = 1 is the negative ELBO's estimate and
    the bound tightens as K grows (Burda et al., 2016).

    ``chunk``: draw and decode the samples this many at a time (a ``lax.scan`` with a running
    log-sum-exp), so memory holds ``B * chunk`` decodings instead of ``B * K``. Chunk ``c``
    draws with the key ``fold_in(key, c)``; with ``chunk >= samples`` (or None) the draws are
    the unchunked ones, the same numbers as before chunking existed.
    """
    if chunk is None or chunk >= samples:
        return -(_iw_log_weights_lse(model, x, keys, normalization, likelihood, samples) - jnp.log(samples))
    chunks = -(-samples // chunk)

    def body(total, c):
        chunk_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, c)
        valid = c * chunk + jnp.arange(chunk) < samples  # the last chunk may be partly past K
        lse = _iw_log_weights_lse(model, x, chunk_keys, normalization, likelihood, chunk, valid)
        return jnp.logaddexp(total, lse), None

    total, _ = jax.lax.scan(body, jnp.full(x.shape[:1], -jnp.inf, x.dtype), jnp.arange(chunks))
    return -(total - jnp.log(samples))


def _iw_log_weights_lse(model, x, keys, normalization, likelihood, samples, valid=None):
    """``logsumexp_k log w_k`` over ``samples`` draws per example (``valid``: which draws count)."""
    mean, logvar = model.encode_distribution(x)
    eps = jax.vmap(lambda k: jax.random.normal(k, (samples, mean.shape[-1])))(keys)  # [B, K, L]
    std = jnp.exp(0.5 * logvar)[:, None]
    z = mean[:, None] + std * eps
    logits = model.decode_logits(z.reshape(-1, z.shape[-1])).reshape(z.shape[0], samples, -1)
    log_px = log_likelihood(logits, x[:, None], normalization, likelihood)
    log_pz = -0.5 * jnp.sum(jnp.square(z) + LOG_2PI, axis=-1)
    log_qz = -0.5 * jnp.sum(jnp.square(eps) + LOG_2PI + logvar[:, None], axis=-1)
    log_w = log_px + log_pz - log_qz
    if valid is not None:
        log_w = jnp.where(valid, log_w, -jnp.inf)
    return jax.nn.logsumexp(log_w, axis=-1)


# Working memory of one decoded importance sample, measured (XLA's compiled temp size on the
# CPU, 100 images x 100 samples): an MLP VAE's is about 12 bytes per input value (its logits
# and likelihood terms), a conv VAE's about 290 bytes per pixel position (its decoder's
# feature maps, whatever the channels); with some headroom.
_IW_BYTES_PER_VALUE = {"mlp": 16, "conv": 320}
#: Working memory :func:`iw_chunk` plans the IW bound for by default.
IW_MEMORY_BYTES = 2**32


def iw_chunk(arch: str, image_shape: tuple[int, ...], batch_size: int, memory_bytes: int | None = None) -> int:
    """The most importance samples per image one chunk of the IW bound may decode within ``memory_bytes``
    (default :data:`IW_MEMORY_BYTES`).

    A K up to it is decoded at once (the numbers of the unchunked bound); a larger K in chunks.
    """
    memory_bytes = IW_MEMORY_BYTES if memory_bytes is None else memory_bytes
    h, w, c = image_shape
    per_sample = _IW_BYTES_PER_VALUE[arch] * (h * w if arch == "conv" else h * w * c)
    return max(1, memory_bytes // (batch_size * per_sample))


def importance_weighted_nll(
    normalization: Normalization, likelihood: str, samples: int, chunk: int | None = None
) -> Callable:
    """``(model, x, keys) -> {"nll_iw": [B]}`` for :meth:`Trainer.mean_over`.

    ``chunk``: decode the samples this many at a time (:func:`vae_iw_nll`; :func:`iw_chunk`
    gives one that fits a memory budget); None decodes all ``samples`` at once.
    """

    def fn(model, x, keys):
        return {"nll_iw": vae_iw_nll(model, x, keys, normalization, likelihood, samples, chunk)}

    return fn


@dataclasses.dataclass(frozen=True)
class Variant:
    """A registry entry: how to build the model and its objective from a config."""

    name: str
    build_model: Callable[[Any, int | tuple[int, ...], nnx.Rngs], nnx.Module]  # image shape or flat size
    build_objective: Callable[[Any, Normalization], Objective]
    description: str
    archs: tuple[str, ...] = ("mlp", "conv")
    #: the config settings its model or objective reads, beyond the ones every variant uses
    settings: tuple[str, ...] = ()
    #: the model's methods its objective calls (the contract: :class:`~jaxae.models.AutoencoderModel`,
    #: :class:`~jaxae.models.VariationalModel`); a user's model must have them
    model_methods: tuple[str, ...] = ("__call__",)

    @property
    def variational(self) -> bool:
        """Its model is a :class:`~jaxae.models.VariationalModel` (Gaussian posterior heads)."""
        return "encode_distribution" in self.model_methods


def codebook_summary(means: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """``usage [K]`` (the fraction of code vectors assigned to each code) -> the codebook's
    ``perplexity`` (exp of the usage's entropy: K when every code is used equally, 1 when one is
    used for everything) and ``dead_codes`` (codes no input was assigned to)."""
    out = dict(means)
    usage = out.pop("usage")
    entropy = -jnp.sum(jnp.where(usage > 0, usage * jnp.log(jnp.where(usage > 0, usage, 1.0)), 0.0))
    return {**out, "perplexity": jnp.exp(entropy), "dead_codes": jnp.sum(usage <= 0).astype(jnp.float32)}


def vqvae_objective(config: Any, normalization: Normalization) -> Objective:
    """The VQ-VAE's loss (van den Oord et al., 2017) with an EMA codebook: the reconstruction's
    MSE through the straight-through estimator plus ``commitment_weight`` times the commitment
    ``mean ||z_e - sg(z_q)||^2``. The codebook has no loss term: ``update_state`` moves each code
    to the moving average of the encoder outputs assigned to it (decay ``codebook_decay``)."""

    def parts(model, x):
        z_e = model.encode_latent(x)  # [B, P, D]
        index, z_q = model.quantizer(z_e)
        straight_through = z_e + jax.lax.stop_gradient(z_q - z_e)
        reconstruction = model.decode(straight_through.reshape(z_e.shape[0], -1))
        commitment = jnp.mean(jnp.square(z_e - z_q), axis=(1, 2))  # z_q carries no gradient
        return z_e, index, reconstruction, commitment

    def usage(model, index):
        share = jnp.full(index.shape[1:], 1.0 / index.shape[1], jnp.float32)
        return jax.vmap(lambda i: jax.ops.segment_sum(share, i, model.quantizer.size))(index)

    def loss(model, x, keys):
        z_e, index, reconstruction, commitment = parts(model, x)
        mse = reconstruction_mse(reconstruction, x)
        metrics = {"mse": mse, "commitment": commitment, "usage": usage(model, index)}
        # each code vector's share for restarting dead codes: a code drawn from the example's key
        share = jax.vmap(lambda k: jax.random.randint(k, index.shape[1:], 0, model.quantizer.size))(keys)
        stats = {"index": index, "share": share, "latent": z_e}
        return mse + config.commitment_weight * commitment, metrics, stats

    def update_state(model, stats, mask, total):
        latent = jax.lax.stop_gradient(stats["latent"]).reshape(-1, stats["latent"].shape[-1])
        size = model.quantizer.size
        weight = jnp.broadcast_to(mask[:, None], stats["index"].shape).reshape(-1)

        def per_code(index):  # (sums [K, D], counts [K]) of the real rows' vectors, by code
            index = index.reshape(-1)
            return jax.ops.segment_sum(latent * weight[:, None], index, size), jax.ops.segment_sum(weight, index, size)

        (sums, counts), restart = total((per_code(stats["index"]), per_code(stats["share"])))
        model.quantizer.update(counts, sums, config.codebook_decay, restart)

    def evaluate(model, x, keys):
        _, index, reconstruction, commitment = parts(model, x)
        mse = reconstruction_mse(reconstruction, x)
        pixels = reconstruction_mse(normalization.to_pixels(reconstruction), normalization.to_pixels(x))
        return {
            "loss": mse + config.commitment_weight * commitment,
            "mse": mse,
            "mse_pixels": pixels,
            "commitment": commitment,
            "usage": usage(model, index),
        }

    return Objective("vqvae", loss, evaluate, update_state=update_state, summarize=codebook_summary)


def compute_dtype(config: Any) -> Any:
    """The models' ``dtype`` for a config's ``--dtype``: ``None`` for float32 (the float32 graph,
    untouched), else the dtype."""
    name = getattr(config, "dtype", "float32")
    return None if name == "float32" else jnp.dtype(name)


def _autoencoder(code_activation: str = "linear"):
    def build(config: Any, image_shape: int | tuple[int, ...], rngs: nnx.Rngs) -> nnx.Module:
        image_shape = models.image_shape_of(image_shape)
        common = {"init": config.init, "dtype": compute_dtype(config), "rngs": rngs}
        if config.arch == "conv":
            channels = tuple(config.conv_channels)
            return models.ConvAutoencoder(image_shape, channels, latent_dim=config.latent_dim, **common)
        return models.Autoencoder(
            image_shape, tuple(config.hidden_dims), config.latent_dim, code_activation=code_activation, **common
        )

    return build


def _build_sparse(config: Any, image_shape: int | tuple[int, ...], rngs: nnx.Rngs) -> nnx.Module:
    # L1 wants a code that can be exactly zero (ReLU); KL wants a rate in (0, 1) (Sigmoid).
    return _autoencoder("relu" if config.sparsity == "l1" else "sigmoid")(config, image_shape, rngs)


def _build_vae(config: Any, image_shape: int | tuple[int, ...], rngs: nnx.Rngs) -> nnx.Module:
    image_shape = models.image_shape_of(image_shape)
    common = {"init": config.init, "dtype": compute_dtype(config), "rngs": rngs}
    if config.arch == "conv":
        return models.ConvVAE(image_shape, tuple(config.conv_channels), latent_dim=config.latent_dim, **common)
    return models.VAE(image_shape, tuple(config.hidden_dims), config.latent_dim, **common)


def _build_vqvae(config: Any, image_shape: int | tuple[int, ...], rngs: nnx.Rngs) -> nnx.Module:
    image_shape = models.image_shape_of(image_shape)
    common = {"init": config.init, "dtype": compute_dtype(config), "rngs": rngs, "decay": config.codebook_decay}
    if config.arch == "conv":
        channels = tuple(config.conv_channels)
        return models.ConvVQVAE(image_shape, channels, config.latent_dim, config.codebook_size, **common)
    return models.VQVAE(image_shape, tuple(config.hidden_dims), config.latent_dim, config.codebook_size, **common)


VARIANTS: dict[str, Variant] = {
    "vanilla": Variant("vanilla", _autoencoder(), vanilla_objective, "the document's autoencoder, MSE loss"),
    "denoising": Variant(
        "denoising",
        _autoencoder(),
        denoising_objective,
        "reconstructs clean images from noisy ones",
        settings=("noise_std", "mask_prob"),
    ),
    "sparse": Variant(
        "sparse",
        _build_sparse,
        sparse_objective,
        "MSE plus an L1 or KL sparsity penalty on the code",
        ("mlp",),
        settings=("sparsity", "sparsity_weight", "sparsity_target"),
        model_methods=("__call__", "encode", "decode"),
    ),
    "vae": Variant(
        "vae",
        _build_vae,
        vae_objective,
        "variational autoencoder, negative ELBO in nats",
        settings=("beta", "likelihood"),
        model_methods=("__call__", "encode_distribution", "decode_logits"),
    ),
    "iwae": Variant(
        "iwae",
        _build_vae,
        iwae_objective,
        "importance-weighted autoencoder: the VAE's model trained on the K-sample bound, in nats",
        settings=("iwae_samples", "likelihood"),
        model_methods=("__call__", "encode_distribution", "decode_logits"),
    ),
    "vqvae": Variant(
        "vqvae",
        _build_vqvae,
        vqvae_objective,
        "VQ-VAE: codes quantised to an EMA-trained codebook, MSE plus the commitment loss",
        settings=("codebook_size", "commitment_weight", "codebook_decay"),
        model_methods=("__call__", "encode_latent", "decode", "quantizer"),
    ),
}


def check_model_contract(model: Any, variant: str, image_shape: tuple[int, ...] | None = None) -> None:
    """Raises :class:`JaxaeError` (one line) unless ``model`` follows ``variant``'s contract
    (:class:`~jaxae.models.AutoencoderModel`, :class:`~jaxae.models.VariationalModel` for a vae).

    With ``image_shape`` (else the model's own ``image_shape``, if any), ``model(x)`` is also
    traced on abstract inputs (nothing computed) and must give ``[B, H * W * C]``.
    """
    entry = get_variant(variant)
    name = type(model).__name__
    missing = [m for m in entry.model_methods if not callable(getattr(model, m, None))]
    if missing:
        contract = "VariationalModel" if "encode_distribution" in entry.model_methods else "AutoencoderModel"
        raise JaxaeError(
            f"{name} does not follow jaxae's model contract for the {variant} objective, which calls "
            f"{', '.join(f'model.{m}()' for m in missing)}: it has no such method (see jaxae.models.{contract})"
        )
    image_shape = image_shape or getattr(model, "image_shape", None)
    if image_shape is None:
        return
    d = math.prod(image_shape)
    x = jax.ShapeDtypeStruct((2, d), jnp.float32)
    graphdef, state = nnx.split(model)
    try:
        out = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, x)
    except Exception as e:
        raise JaxaeError(
            f"{name}(x) fails on a batch of flat images x [2, {d}] (the contract: [B, H*W*C] for "
            f"{'x'.join(map(str, image_shape))} images): {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from None
    if getattr(out, "shape", None) != (2, d):
        got = getattr(out, "shape", type(out).__name__)
        raise JaxaeError(
            f"{name}(x) returns {got} for x [2, {d}]; the contract is a flat reconstruction [B, H*W*C] = [2, {d}]"
        )


def get_variant(name: str) -> Variant:
    try:
        return VARIANTS[name]
    except KeyError:
        raise JaxaeError(f"unknown variant {name!r}; choose one of {', '.join(VARIANTS)}") from None
