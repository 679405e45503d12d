"""The document's PyTorch model, and PyTorch twins of jaxae's other modules.

torch is imported on first use, not when this module is imported, so ``import jaxae`` works
without PyTorch. The classes are reached as attributes (``torch_reference.Autoencoder``);
the first access imports torch, or raises :class:`~jaxae.errors.JaxaeError` saying how to
install it::

    from jaxae import torch_reference

    model = torch_reference.Autoencoder()          # exactly the tutorial's nn.Module
    model.state_dict().keys()                      # encoder.0.weight, ..., decoder.4.bias

``Autoencoder`` is the tutorial's class as written (fixed ``784-128-64-32`` sizes).
``MLPAutoencoder`` builds the same ``nn.Sequential`` layout for any sizes, as
:class:`jaxae.models.Autoencoder` does; with the default sizes it constructs its layers in
the same order, so the same ``torch.manual_seed`` gives the same weights. Its
``code_activation`` (``"relu"`` or ``"sigmoid"``) is the sparse variant's. ``MLPVAE``,
``ConvAutoencoder`` and ``ConvVAE`` are the twins of :class:`jaxae.models.VAE`,
:class:`~jaxae.models.ConvAutoencoder` and :class:`~jaxae.models.ConvVAE`: the same layers
under the same names, written as a PyTorch user would write them.

The twins take images the PyTorch way, NCHW: the MLP twins flat inputs ``[N, C * H * W]`` in
``(c, h, w)`` order (``x.view(N, -1)`` of an NCHW batch), the conv twins ``[N, C, H, W]`` or
that flattening; they return reconstructions flattened the same way, and have the Flax
modules' ``encode``/``decode`` methods (the VAEs also ``encode_distribution`` and
``decode_logits``). The Flax modules take NHWC images and flatten them, and their conv
features, in ``(h, w, c)`` order; the converter reorders the weights of the Linear layers that
touch a flattened image or flattened features (:mod:`jaxae.convert`), so weights of a model
written the usual PyTorch way convert exactly, for any ``H x W x C``. For one channel the two
orders of an image are the same.

:func:`variant_loss` is each variant's training loss in PyTorch, as :mod:`jaxae.objectives`
computes it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

from jaxae.errors import JaxaeError
from jaxae.models import DEAD_CODE_COUNT

INSTALL_HINT = "pip install 'jaxae[torch]'"


def require_torch() -> Any:
    """Imports and returns ``torch``, or raises :class:`JaxaeError` saying how to install it."""
    try:
        import torch
    except ImportError:
        raise JaxaeError(f"this needs PyTorch, which is not installed; install it with: {INSTALL_HINT}") from None
    return torch


@functools.cache
def _classes() -> dict[str, type]:
    torch = require_torch()
    nn = torch.nn

    class Autoencoder(nn.Module):
        """The tutorial's autoencoder, as written there."""

        def __init__(self):
            super().__init__()
            self.encoder = nn.Sequential(
                nn.Linear(784, 128),
                nn.ReLU(),
                nn.Linear(128, 64),
                nn.ReLU(),
                nn.Linear(64, 32),
            )
            self.decoder = nn.Sequential(
                nn.Linear(32, 64),
                nn.ReLU(),
                nn.Linear(64, 128),
                nn.ReLU(),
                nn.Linear(128, 784),
                nn.Sigmoid(),
            )

        def forward(self, x):
            x = self.encoder(x)
            x = self.decoder(x)
            return x

    code_activations = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid}

    def mlp(dims: Sequence[int]) -> list:
        layers: list = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            if i:
                layers.append(nn.ReLU())
            layers.append(nn.Linear(d_in, d_out))
        return layers

    class MLPAutoencoder(nn.Module):
        """The tutorial's layout with any sizes: the twin of :class:`jaxae.models.Autoencoder`.

        ``code_activation`` ``"relu"`` or ``"sigmoid"`` appends that activation to the encoder
        (at index 5 with the default sizes), as the sparse variant does; it holds no weights.
        """

        def __init__(
            self,
            input_dim: int = 784,
            hidden_dims: Sequence[int] = (128, 64),
            latent_dim: int = 32,
            code_activation: str = "linear",
        ):
            super().__init__()
            dims = (input_dim, *hidden_dims, latent_dim)
            encoder = mlp(dims)
            if code_activation != "linear":
                encoder.append(code_activations[code_activation]())
            self.encoder = nn.Sequential(*encoder)
            self.decoder = nn.Sequential(*mlp(dims[::-1]), nn.Sigmoid())

        def encode(self, x):
            return self.encoder(x)

        def decode(self, z):
            return self.decoder(z)

        def forward(self, x):
            return self.decoder(self.encoder(x))

    class MLPVAE(nn.Module):
        """The twin of :class:`jaxae.models.VAE`: a trunk, ``mean``/``logvar`` heads, a logits decoder."""

        def __init__(self, input_dim: int = 784, hidden_dims: Sequence[int] = (128, 64), latent_dim: int = 32):
            super().__init__()
            trunk = (input_dim, *hidden_dims)
            self.encoder = nn.Sequential(*mlp(trunk), nn.ReLU())
            self.mean = nn.Linear(trunk[-1], latent_dim)
            self.logvar = nn.Linear(trunk[-1], latent_dim)
            self.decoder = nn.Sequential(*mlp((latent_dim, *hidden_dims[::-1], input_dim)))

        def encode_distribution(self, x):
            h = self.encoder(x)
            return self.mean(h), self.logvar(h)

        def encode(self, x):
            return self.encode_distribution(x)[0]

        def decode_logits(self, z):
            return self.decoder(z)

        def decode(self, z):
            return torch.sigmoid(self.decode_logits(z))

        def forward(self, x):
            """The reconstruction from the posterior mean (no sampling)."""
            return self.decode(self.encode(x))

    class _ConvBase(nn.Module):
        """Stride-2 convs down (one per entry of ``channels``), a Linear to the code; a Linear up,
        transposed convs back."""

        def _build(self, image_shape, channels):
            h, w, c = image_shape
            factor = 2 ** len(channels)
            self.image_shape = (c, h, w)
            self.feature_shape = (channels[-1], h // factor, w // factor)  # PyTorch's NCHW layout
            down = (c, *channels)
            layers: list = []
            for c_in, c_out in zip(down[:-1], down[1:], strict=True):
                layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.ReLU()]
            self.encoder = nn.Sequential(*layers)
            return math.prod(self.feature_shape)

        def _build_decoder(self, image_shape, channels, latent_dim, feature_dim):
            up = (*channels[::-1], image_shape[2])
            self.project = nn.Linear(latent_dim, feature_dim)  # feature_dim: channels[-1] for a per-position code
            layers: list = []
            for i, (c_in, c_out) in enumerate(zip(up[:-1], up[1:], strict=True)):
                layers += ([nn.ReLU()] if i else []) + [nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1)]
            self.decoder = nn.Sequential(*layers)

        def features(self, x):
            return self.encoder(x.reshape(x.shape[0], *self.image_shape)).flatten(1)

        def decode_logits(self, z):
            h = torch.relu(self.project(z)).reshape(z.shape[0], *self.feature_shape)
            return self.decoder(h).flatten(1)

        def decode(self, z):
            return torch.sigmoid(self.decode_logits(z))

        def forward(self, x):
            return self.decode(self.encode(x))

    class ConvAutoencoder(_ConvBase):
        """The twin of :class:`jaxae.models.ConvAutoencoder` (``--arch conv``).

        ``image_shape`` is ``(H, W, C)`` as jaxae gives it; inputs are ``[N, C, H, W]`` or
        flat ``[N, C * H * W]`` in PyTorch's order (for one channel, the same as jaxae's).
        """

        def __init__(self, image_shape=(28, 28, 1), channels=(16, 32), latent_dim=32):
            super().__init__()
            feature_dim = self._build(image_shape, channels)
            self.code = nn.Linear(feature_dim, latent_dim)
            self._build_decoder(image_shape, channels, latent_dim, feature_dim)

        def encode(self, x):
            return self.code(self.features(x))

    class ConvVAE(_ConvBase):
        """The twin of :class:`jaxae.models.ConvVAE`: the conv trunk with ``mean``/``logvar`` heads."""

        def __init__(self, image_shape=(28, 28, 1), channels=(16, 32), latent_dim=32):
            super().__init__()
            feature_dim = self._build(image_shape, channels)
            self.mean = nn.Linear(feature_dim, latent_dim)
            self.logvar = nn.Linear(feature_dim, latent_dim)
            self._build_decoder(image_shape, channels, latent_dim, feature_dim)

        def encode_distribution(self, x):
            h = self.features(x)
            return self.mean(h), self.logvar(h)

        def encode(self, x):
            return self.encode_distribution(x)[0]

    class VectorQuantizer(nn.Module):
        """The twin of :class:`jaxae.models.VectorQuantizer`: the codebook and its EMA state as buffers
        (``quantizer.codebook``, ``quantizer.ema_count``, ``quantizer.ema_sum`` in the state_dict)."""

        def __init__(self, size: int, dim: int, decay: float = 0.99, eps: float = 1e-5):
            super().__init__()
            self.size, self.decay, self.eps = size, decay, eps
            init = torch.empty(size, dim).uniform_(-1.0 / size, 1.0 / size)
            self.register_buffer("codebook", init.clone())
            self.register_buffer("ema_count", torch.ones(size))
            self.register_buffer("ema_sum", init.clone())

        def forward(self, z):
            codebook = self.codebook
            distances = torch.sum(torch.square(codebook), -1) - 2.0 * z @ codebook.T
            index = torch.argmin(distances, dim=-1)
            return index, codebook[index]

        @torch.no_grad()
        def update(self, counts, sums, decay=None, restart=None):
            decay = self.decay if decay is None else decay
            count = decay * self.ema_count + (1.0 - decay) * counts
            total = decay * self.ema_sum + (1.0 - decay) * sums
            if restart is not None:
                share_sum, share_count = restart
                dead = (count < DEAD_CODE_COUNT) & (share_count > 0)
                count = torch.where(dead, torch.ones_like(count), count)
                total = torch.where(dead[:, None], share_sum / torch.clamp(share_count, min=1.0)[:, None], total)
            n = torch.sum(count)
            smoothed = (count + self.eps) / (n + self.size * self.eps) * n
            self.ema_count.copy_(count)
            self.ema_sum.copy_(total)
            self.codebook.copy_(total / smoothed[:, None])

    class _VQBase(nn.Module):
        def encode(self, x):
            return self.quantizer(self.encode_latent(x))[1].flatten(1)

        def forward(self, x):
            return self.decode(self.encode(x))

    class MLPVQVAE(_VQBase):
        """The twin of :class:`jaxae.models.VQVAE`."""

        def __init__(self, input_dim=784, hidden_dims=(128, 64), latent_dim=32, codebook_size=512, decay=0.99):
            super().__init__()
            dims = (input_dim, *hidden_dims, latent_dim)
            self.encoder = nn.Sequential(*mlp(dims))
            self.decoder = nn.Sequential(*mlp(dims[::-1]), nn.Sigmoid())
            self.quantizer = VectorQuantizer(codebook_size, latent_dim, decay)

        def encode_latent(self, x):
            return self.encoder(x)[:, None, :]

        def decode(self, z):
            return self.decoder(z)

    class ConvVQVAE(_VQBase, _ConvBase):
        """The twin of :class:`jaxae.models.ConvVQVAE`: a code vector per feature-map position."""

        def __init__(self, image_shape=(28, 28, 1), channels=(16, 32), latent_dim=32, codebook_size=512, decay=0.99):
            super().__init__()
            self._build(image_shape, channels)
            self.code = nn.Linear(channels[-1], latent_dim)
            self._build_decoder(image_shape, channels, latent_dim, channels[-1])
            self.quantizer = VectorQuantizer(codebook_size, latent_dim, decay)
            self.latent_dim = latent_dim

        def encode_latent(self, x):
            h = self.encoder(x.reshape(x.shape[0], *self.image_shape))  # [N, C, h, w]
            return self.code(h.permute(0, 2, 3, 1).reshape(x.shape[0], -1, h.shape[1]))  # positions in (h, w) order

        def decode_logits(self, z):
            n, (c, h, w) = z.shape[0], self.feature_shape
            features = torch.relu(self.project(z.reshape(n, -1, self.latent_dim)))
            return self.decoder(features.reshape(n, h, w, c).permute(0, 3, 1, 2)).flatten(1)

    return {
        "Autoencoder": Autoencoder,
        "MLPAutoencoder": MLPAutoencoder,
        "MLPVAE": MLPVAE,
        "ConvAutoencoder": ConvAutoencoder,
        "ConvVAE": ConvVAE,
        "MLPVQVAE": MLPVQVAE,
        "ConvVQVAE": ConvVQVAE,
    }


CLASSES = ("Autoencoder", "MLPAutoencoder", "MLPVAE", "ConvAutoencoder", "ConvVAE", "MLPVQVAE", "ConvVQVAE")


def variant_loss(module: Any, x: Any, config: Any, *, noisy: Any = None, eps: Any = None) -> Any:
    """A variant's training loss in PyTorch: the batch mean of :mod:`jaxae.objectives`' loss.

    Args:
        module: the variant's twin (``jaxae.TWINS[(variant, arch)].torch_module``).
        x: float32 inputs ``[B, C * H * W]`` in the twin's ``(c, h, w)`` order, normalised by
            ``config.normalize``.
        config: a :class:`jaxae.TrainConfig`: the variant and its settings.
        noisy: the denoiser's corrupted input (default: drawn here with ``torch`` as
            :func:`jaxae.objectives.corrupt` draws it); give jaxae's to compare exactly.
        eps: the VAE's standard normal draw ``[B, latent]``, the IWAE's ``[B, K, latent]``
            (default: ``torch.randn``).

    Returns:
        A scalar tensor.
    """
    torch = require_torch()
    from jaxae.data import get_normalization

    norm = get_normalization(config.normalize)
    low, high = norm.low, norm.high
    if config.variant == "vanilla":
        return torch.mean(torch.square(module(x) - x))
    if config.variant == "denoising":
        if noisy is None:
            noisy = x + config.noise_std * (high - low) * torch.randn_like(x)
            if config.mask_prob > 0:
                noisy = torch.where(torch.rand_like(x) < config.mask_prob, torch.full_like(x, low), noisy)
            noisy = torch.clamp(noisy, low, high)
        return torch.mean(torch.square(module(torch.as_tensor(noisy)) - x))
    if config.variant == "sparse":
        code = module.encoder(x)
        mse = torch.mean(torch.square(module.decoder(code) - x), dim=-1)
        if config.sparsity == "l1":
            penalty = torch.mean(torch.abs(code), dim=-1)
        else:
            t, rate = config.sparsity_target, torch.clamp(code, 1e-6, 1 - 1e-6)
            penalty = torch.sum(t * torch.log(t / rate) + (1 - t) * torch.log((1 - t) / (1 - rate)), dim=-1)
        return torch.mean(mse + config.sparsity_weight * penalty)

    def nll(logits, x):  # -log p(x | z) per example, over the last axis
        if config.likelihood == "bernoulli":
            pixels = (x - low) / (high - low)
            bce = torch.nn.functional.binary_cross_entropy_with_logits
            return bce(logits, pixels.expand_as(logits), reduction="none").sum(-1)
        recon_mean = low + (high - low) * torch.sigmoid(logits)
        return torch.sum(torch.square(x - recon_mean), dim=-1) + 0.5 * x.shape[-1] * math.log(math.pi)

    if config.variant == "vae":
        mean, logvar = module.encode_distribution(x)
        eps = torch.randn_like(mean) if eps is None else torch.as_tensor(eps)
        logits = module.decode_logits(mean + torch.exp(0.5 * logvar) * eps)
        kl = 0.5 * torch.sum(torch.exp(logvar) + torch.square(mean) - 1.0 - logvar, dim=-1)
        return torch.mean(nll(logits, x) + config.beta * kl)
    if config.variant == "iwae":
        mean, logvar = module.encode_distribution(x)
        k = config.iwae_samples
        eps = torch.randn(mean.shape[0], k, mean.shape[1]) if eps is None else torch.as_tensor(eps)  # [B, K, L]
        z = mean[:, None] + torch.exp(0.5 * logvar)[:, None] * eps
        logits = module.decode_logits(z.reshape(-1, z.shape[-1])).reshape(z.shape[0], k, -1)
        log_2pi = math.log(2 * math.pi)
        log_pz = -0.5 * torch.sum(torch.square(z) + log_2pi, dim=-1)
        log_qz = -0.5 * torch.sum(torch.square(eps) + log_2pi + logvar[:, None], dim=-1)
        log_w = -nll(logits, x[:, None]) + log_pz - log_qz
        return torch.mean(-(torch.logsumexp(log_w, dim=-1) - math.log(k)))
    if config.variant == "vqvae":
        z_e = module.encode_latent(x)
        _, z_q = module.quantizer(z_e)
        reconstruction = module.decode((z_e + (z_q - z_e).detach()).flatten(1))  # straight through
        mse = torch.mean(torch.square(reconstruction - x), dim=-1)
        commitment = torch.mean(torch.square(z_e - z_q.detach()), dim=(1, 2))
        return torch.mean(mse + config.commitment_weight * commitment)
    raise JaxaeError(f"no PyTorch loss for the {config.variant!r} variant")


def update_state(module: Any, x: Any, config: Any, *, share: Any = None) -> None:
    """What a variant trains without gradients, after ``backward()`` and before (or after) the
    optimizer's step: the VQ-VAE's EMA codebook, from ``x`` as :func:`variant_loss` took it
    (:meth:`jaxae.objectives.Objective.update_state`); nothing for the other variants.

    ``share``: each code vector's restart share ``[B, P]`` (default: ``torch.randint``); give
    jaxae's (drawn from the per-example keys) to compare exactly.
    """
    if config.variant != "vqvae":
        return
    torch = require_torch()
    quantizer = module.quantizer
    with torch.no_grad():
        z_e = module.encode_latent(x)
        index, _ = quantizer(z_e)
        share = torch.randint(0, quantizer.size, index.shape) if share is None else torch.as_tensor(share)
        flat = z_e.reshape(-1, z_e.shape[-1])

        def per_code(i):
            i = i.reshape(-1).long()
            sums = torch.zeros(quantizer.size, flat.shape[-1]).index_add_(0, i, flat)
            return sums, torch.bincount(i, minlength=quantizer.size).float()

        sums, counts = per_code(index)
        quantizer.update(counts, sums, config.codebook_decay, per_code(share))


def __getattr__(name: str) -> Any:
    # PEP 562: the nn.Module classes exist only once torch is imported, on first access.
    if name in CLASSES:
        return _classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
