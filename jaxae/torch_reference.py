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
the same order, so the same ``torch.manual_seed`` gives the same weights.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from jaxae.errors import JaxaeError

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

    def mlp(dims: Sequence[int]) -> list:
        layers: list = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            if i:
                layers.append(nn.ReLU())
            layers.append(nn.Linear(d_in, d_out))
        return layers

    class MLPAutoencoder(nn.Module):
        """The tutorial's layout with any sizes: the twin of :class:`jaxae.models.Autoencoder`."""

        def __init__(self, input_dim: int = 784, hidden_dims: Sequence[int] = (128, 64), latent_dim: int = 32):
            super().__init__()
            dims = (input_dim, *hidden_dims, latent_dim)
            self.encoder = nn.Sequential(*mlp(dims))
            self.decoder = nn.Sequential(*mlp(dims[::-1]), nn.Sigmoid())

        def forward(self, x):
            return self.decoder(self.encoder(x))

    return {"Autoencoder": Autoencoder, "MLPAutoencoder": MLPAutoencoder}


def __getattr__(name: str) -> Any:
    # PEP 562: the nn.Module classes exist only once torch is imported, on first access.
    if name in ("Autoencoder", "MLPAutoencoder"):
        return _classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
