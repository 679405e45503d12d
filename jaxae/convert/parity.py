"""The parity report: a PyTorch twin and its converted Flax model run on the same images."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxae import torch_reference
from jaxae.convert.layouts import _call, get_twin
from jaxae.convert.weights import _config, model_image_shape, to_numpy_state_dict
from jaxae.data import get_normalization, shape_text
from jaxae.errors import JaxaeError

# Float32 outputs of the same weights differ by summation order alone, and more as weights grow
# with training: ~6e-8 for fresh weights, ~9e-7 after 20 epochs on the sample (README).
DEFAULT_TOLERANCE = 1e-5


def torch_outputs(module: Any, x: np.ndarray, reconstruct: Callable = _call) -> np.ndarray:
    """Runs a PyTorch module on float32 ``x`` in fp32 on the CPU."""
    torch = torch_reference.require_torch()
    module.eval()
    with torch.no_grad():
        return reconstruct(module, torch.from_numpy(np.ascontiguousarray(x, np.float32))).numpy()


@functools.partial(jax.jit, static_argnums=(0, 1))
def _flax_forward(graphdef: Any, reconstruct: Callable, state: Any, x: jax.Array) -> jax.Array:
    # Module level, structure static: reports on models of one structure compile once.
    return reconstruct(nnx.merge(graphdef, state), x)


def flax_outputs(model: nnx.Module, x: np.ndarray, reconstruct: Callable = _call) -> np.ndarray:
    """Runs a Flax module on float32 ``x`` with fp32 ("highest") matmuls, as PyTorch's CPU does."""
    graphdef, state = nnx.split(model)
    with jax.default_matmul_precision("highest"):
        return np.asarray(_flax_forward(graphdef, reconstruct, state, jnp.asarray(x)))


def parity_report(
    state_dict: Mapping[str, np.ndarray],
    model: nnx.Module,
    images_u8: np.ndarray,
    config: Any = None,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
) -> dict[str, Any]:
    """Runs the PyTorch twin (holding ``state_dict``) and ``model`` on the same images.

    Each framework sees the images in its own layout, as its users feed them: the PyTorch twin
    NCHW, flattened in ``(c, h, w)`` order (``x.view(N, -1)``), the Flax model NHWC, flattened
    ``(h, w, c)``; the twin's outputs are put back in NHWC order before they are compared. For
    one channel the two orders are the same.

    Args:
        state_dict: the PyTorch weights (numpy, e.g. from :func:`read_state_dict`).
        model: the converted Flax module.
        images_u8: uint8 images ``[N, H, W, C]`` (``[N, H, W]`` for one channel); both models
            see them normalised by ``config.normalize`` exactly as torchvision's ``ToTensor`` +
            ``Normalize`` would.
        config: gives the variant, the arch, the layer sizes and the normalisation.
        tolerance: the largest max-abs difference (parameters and outputs) that passes.

    Returns:
        A JSON-ready dict: per-parameter max abs difference, the outputs' max and mean abs
        difference, both models' MSE, and ``passed``.

    Raises:
        JaxaeError: a negative tolerance, or images of another shape than the model takes.
    """
    config = _config(None, config)
    if not (tolerance >= 0):
        raise JaxaeError(f"--tolerance must be a non-negative number, got {tolerance}")
    twin = get_twin(config.variant, config.arch)
    torch = torch_reference.require_torch()
    images = np.asarray(images_u8)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4:
        raise JaxaeError(f"the parity report needs images [N, H, W, C], got an array of shape {images.shape}")
    n, h, w, c = images.shape
    own = model_image_shape(model)
    if own is not None and own != (h, w, c):
        raise JaxaeError(
            f"the images are {shape_text((h, w, c))} but the model takes {shape_text(own)} images; "
            "check it on images of the model's shape"
        )
    nhwc = get_normalization(config.normalize).table[images.astype(np.int64)]
    x_flax = nhwc.reshape(n, -1)  # (h, w, c) order
    x_torch = np.ascontiguousarray(nhwc.transpose(0, 3, 1, 2)).reshape(n, -1)  # NCHW's (c, h, w) order

    # links_for checks the image shape against the model's parameters before anything runs
    converted = to_numpy_state_dict(model, config.variant, config.arch, (h, w, c))
    module = twin.torch_module(config, (h, w, c))
    module.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()}, strict=True)
    param_diffs = {k: float(np.max(np.abs(converted[k] - state_dict[k]), initial=0.0)) for k in state_dict}

    codes: dict[str, Any] = {}
    if hasattr(model, "codes") and hasattr(module, "quantizer"):
        # A VQ-VAE: where two codes are equally near to float32 rounding the frameworks may pick
        # either, and the outputs then differ by a decoded code. So its latents are compared,
        # differing codes must be such ties, and both decoders decode the twin's codes.
        y_torch, y_flax, codes = _vq_outputs(module, model, x_torch, x_flax, tolerance)
    else:
        y_torch = torch_outputs(module, x_torch, twin.reconstruct)
        y_flax = flax_outputs(model, x_flax, twin.reconstruct)
    y_torch = y_torch.reshape(n, c, h, w).transpose(0, 2, 3, 1).reshape(n, -1)  # back to (h, w, c)
    diff = np.abs(y_torch.astype(np.float64) - y_flax.astype(np.float64))
    mse_torch = float(np.mean(np.square(y_torch.astype(np.float64) - x_flax)))
    mse_flax = float(np.mean(np.square(y_flax.astype(np.float64) - x_flax)))
    max_param = max(param_diffs.values(), default=0.0)
    max_out = float(diff.max(initial=0.0))
    return {
        "variant": config.variant,
        "arch": config.arch,
        "normalize": config.normalize,
        "examples": int(n),
        "dtype": "float32",
        "jax_matmul_precision": "highest",
        "max_abs_diff_per_parameter": param_diffs,
        "max_abs_diff_parameters": max_param,
        "max_abs_diff_outputs": max_out,
        "mean_abs_diff_outputs": float(diff.mean()),
        "mse_torch": mse_torch,
        "mse_flax": mse_flax,
        **codes,
        "tolerance": tolerance,
        "passed": bool(max_param <= tolerance and max_out <= tolerance and codes.get("codes_passed", True)),
    }


def _vq_outputs(module: Any, model: nnx.Module, x_torch: np.ndarray, x_flax: np.ndarray, tolerance: float):
    """Both frameworks' decodings of the twin's codes, and what the codes' comparison found."""
    torch = torch_reference.require_torch()
    module.eval()
    with torch.no_grad():
        latent_t = module.encode_latent(torch.from_numpy(np.ascontiguousarray(x_torch, np.float32)))
        index_t, z_q = module.quantizer(latent_t)
        y_torch = module.decode(z_q.flatten(1)).numpy()
    latent_t, index_t = latent_t.numpy(), index_t.numpy()
    graphdef, state = nnx.split(model)

    def parts(state, x, index):
        m = nnx.merge(graphdef, state)
        latent = m.encode_latent(x)
        return latent, m.quantizer(latent)[0], m.decode_codes(index)

    with jax.default_matmul_precision("highest"):
        latent_f, index_f, y_flax = map(np.asarray, jax.jit(parts)(state, jnp.asarray(x_flax), jnp.asarray(index_t)))
    codebook = np.asarray(model.quantizer.codebook[...], np.float64)
    differ = index_t != index_f
    z = latent_f.astype(np.float64)[differ]
    # the two codes' squared distances, in float64: a tie if equal to float32 rounding of their size
    d_t, d_f = (np.sum(np.square(z - codebook[i[differ]]), -1) for i in (index_t, index_f))
    scale = np.sum(np.square(z), -1) + np.sum(np.square(codebook[index_t[differ]]), -1)
    ties = bool(np.all(np.abs(d_t - d_f) <= 1e-5 * scale))
    max_latent = float(np.max(np.abs(latent_t.astype(np.float64) - latent_f), initial=0.0))
    return (
        y_torch,
        y_flax,
        {
            "max_abs_diff_latents": max_latent,
            "codes": int(index_t.size),
            "codes_differing": int(differ.sum()),
            "codes_differing_are_ties": ties,
            "codes_passed": bool(ties and max_latent <= tolerance),
        },
    )
