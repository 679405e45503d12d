"""PyTorch ``state_dict`` <-> Flax parameters, and a numerical parity report.

A conversion is an explicit key map plus transposes (:class:`ParamLink`), one map per
``(variant, arch)`` in :data:`TWINS`. Before anything is copied, the key sets and every shape
are checked against the Flax model the config describes; any mismatch is a
:class:`~jaxae.errors.JaxaeError` naming the keys (and both shapes).

The conv models flatten their features between the convolutions and the Linear layers:
PyTorch's ``flatten`` of an NCHW tensor orders them ``(c, h, w)``, Flax's of an NHWC tensor
``(h, w, c)``. The twins are written the usual PyTorch way, so the links of the Linear layers
on either side of the flatten (the code or ``mean``/``logvar`` heads, and ``project``) also
reorder that axis (:attr:`ParamLink.chw`): a gather, so conversions stay exact both ways.

Files are read without ever unpickling arbitrary objects: ``.pt``/``.pth`` only through
``torch.load(..., weights_only=True)``, ``.safetensors`` through ``safetensors`` (no torch
needed). The file kind is told by content, not by name.

::

    import jaxae

    model = jaxae.from_torch("autoencoder.pt")          # an nnx.Module: model(x), x float32 [N, 784]
    state_dict = jaxae.to_torch_state_dict(model)       # torch_model.load_state_dict(state_dict, strict=True)
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import os
import pickle
import re
import struct
import tempfile
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxae import torch_reference
from jaxae.data import get_normalization
from jaxae.errors import JaxaeError
from jaxae.models import image_shape_of
from jaxae.objectives import get_variant

INPUT_DIM = 784
# Float32 outputs of the same weights differ by summation order alone, and more as weights grow
# with training: ~6e-8 for fresh weights, ~9e-7 after 20 epochs on the sample (README).
DEFAULT_TOLERANCE = 1e-5
FORMATS = ("torch", "safetensors")
_SUBMODULE_KEYS = ("state_dict", "model_state_dict", "model")
_SIZES_HINT = "if the PyTorch model has other layer sizes, give them with --hidden-dims/--latent-dim"


@dataclasses.dataclass(frozen=True)
class ParamLink:
    """One PyTorch tensor and the Flax parameter it becomes.

    Attributes:
        torch_key: the ``state_dict`` key, e.g. ``"encoder.0.weight"``.
        flax_path: the path in the pure-dict params, e.g. ``("encoder", "layers", 0, "kernel")``.
        to_flax: the axis permutation taking the torch tensor to the Flax array (``(1, 0)``
            for a Linear weight ``[out, in]`` -> kernel ``[in, out]``, ``(2, 3, 1, 0)`` for a
            conv weight); ``None`` for none.
        chw: ``(C, H, W)`` when the torch tensor's axis ``chw_axis`` runs over flattened conv
            features: they are reordered from PyTorch's ``(c, h, w)`` order to Flax's
            ``(h, w, c)`` (before ``to_flax``); ``None`` for none.
        chw_axis: the torch tensor's axis that ``chw`` applies to.
    """

    torch_key: str
    flax_path: tuple
    to_flax: tuple[int, ...] | None = None
    chw: tuple[int, int, int] | None = None
    chw_axis: int = 0

    def _hwc_order(self) -> np.ndarray:
        # position i of the Flax (h, w, c) flattening holds torch's (c, h, w) feature order[i]
        c, h, w = self.chw
        return np.arange(c * h * w).reshape(c, h, w).transpose(1, 2, 0).ravel()

    def torch_to_flax(self, array: np.ndarray) -> np.ndarray:
        if self.chw is not None:
            array = np.take(array, self._hwc_order(), axis=self.chw_axis)
        return array if self.to_flax is None else np.transpose(array, self.to_flax)

    def flax_to_torch(self, array: np.ndarray) -> np.ndarray:
        if self.to_flax is not None:
            array = np.transpose(array, np.argsort(self.to_flax))
        if self.chw is not None:
            array = np.take(array, np.argsort(self._hwc_order()), axis=self.chw_axis)
        return array

    def torch_shape(self, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.to_flax is None:
            return tuple(flax_shape)
        return tuple(flax_shape[i] for i in np.argsort(self.to_flax))


def _call(model: Any, x: Any) -> Any:
    return model(x)


@dataclasses.dataclass(frozen=True)
class TorchTwin:
    """How one variant's Flax module, in one architecture, maps onto its PyTorch twin.

    Attributes:
        variant: the variant name (a key of :data:`jaxae.VARIANTS`).
        key_map: ``params -> links``: the links for a Flax pure-dict params tree of this
            variant (a fresh one when converting from torch); they must cover every leaf.
        torch_module: ``(config, input_dim) -> torch.nn.Module``, the PyTorch twin.
        reconstruct: ``(model, x) -> reconstruction``, used by the parity report on both
            frameworks' models (default: ``model(x)``; for the VAEs that is the reconstruction
            from the posterior mean).
        arch: ``"mlp"`` or ``"conv"`` (``TrainConfig.arch``).
    """

    variant: str
    key_map: Callable[[Any], tuple[ParamLink, ...]]
    torch_module: Callable[[Any, int], Any]
    reconstruct: Callable[[Any, Any], Any] = _call
    arch: str = "mlp"

    @property
    def name(self) -> str:
        """``"vae conv"``: the twin, for messages."""
        return f"{self.variant} {self.arch}"


def _linear_links(name: str, chw: tuple[int, int, int] | None = None, flattened: str = "") -> list:
    """A torch Linear ``name`` (weight ``[out, in]``) <-> the ``nnx.Linear`` ``name`` (kernel ``[in, out]``).

    ``flattened`` says which side holds flattened conv features of shape ``chw``: ``"in"``
    (a Linear after the flatten: the weight's axis 1) or ``"out"`` (before the unflatten: the
    weight's axis 0 and the bias).
    """
    if flattened == "in":
        return [
            ParamLink(f"{name}.weight", (name, "kernel"), (1, 0), chw, 1),
            ParamLink(f"{name}.bias", (name, "bias")),
        ]
    if flattened == "out":
        return [
            ParamLink(f"{name}.weight", (name, "kernel"), (1, 0), chw, 0),
            ParamLink(f"{name}.bias", (name, "bias"), None, chw, 0),
        ]
    return [ParamLink(f"{name}.weight", (name, "kernel"), (1, 0)), ParamLink(f"{name}.bias", (name, "bias"))]


def _sequential_links(params: Any, part: str, to_flax: tuple[int, ...] = (1, 0)) -> list:
    # jaxae's Sequentials keep nn.Sequential's indices (layers with weights at the indices
    # PyTorch gives them, activations in between hold none), so encoder.{i} <-> encoder.layers[i].
    links = []
    for i in sorted(params[part]["layers"]):
        links.append(ParamLink(f"{part}.{i}.weight", (part, "layers", i, "kernel"), to_flax))
        links.append(ParamLink(f"{part}.{i}.bias", (part, "layers", i, "bias")))
    return links


def _mlp_key_map(params: Any) -> tuple[ParamLink, ...]:
    return tuple(_sequential_links(params, "encoder") + _sequential_links(params, "decoder"))


def _mlp_vae_key_map(params: Any) -> tuple[ParamLink, ...]:
    return tuple(
        _sequential_links(params, "encoder")
        + _linear_links("mean")
        + _linear_links("logvar")
        + _sequential_links(params, "decoder")
    )


# torch Conv2d weight [out, in, kh, kw] -> nnx.Conv kernel [kh, kw, in, out]; torch
# ConvTranspose2d weight [in, out, kh, kw] -> nnx.ConvTranspose kernel [kh, kw, out, in]
# (transpose_kernel=True layout): the same permutation for both.
_CONV_TO_FLAX = (2, 3, 1, 0)


def _feature_chw(params: Any) -> tuple[int, int, int]:
    """The conv features' ``(C, H, W)``, read off the parameters (the converter's images are square)."""
    channels = params["encoder"]["layers"][2]["kernel"].shape[-1]
    feature_dim = params["project"]["kernel"].shape[-1]
    side = math.isqrt(feature_dim // channels)
    if side * side * channels != feature_dim:
        raise JaxaeError(
            f"cannot tell the conv features' height and width from {feature_dim} features of {channels} "
            "channels; converting conv models needs square images"
        )
    return (channels, side, side)


def _conv_key_map(*heads: str) -> Callable[[Any], tuple[ParamLink, ...]]:
    def key_map(params: Any) -> tuple[ParamLink, ...]:
        chw = _feature_chw(params)
        links = _sequential_links(params, "encoder", _CONV_TO_FLAX)
        for head in heads:  # Linear(features -> code)
            links += _linear_links(head, chw, flattened="in")
        links += _linear_links("project", chw, flattened="out")  # Linear(code -> features)
        return tuple(links + _sequential_links(params, "decoder", _CONV_TO_FLAX))

    return key_map


def _mlp_torch_module(config: Any, input_dim: int) -> Any:
    code_activation = _code_activation(config)
    if input_dim == INPUT_DIM and tuple(config.hidden_dims) == (128, 64) and config.latent_dim == 32:
        if code_activation == "linear":
            return torch_reference.Autoencoder()
    return torch_reference.MLPAutoencoder(input_dim, tuple(config.hidden_dims), config.latent_dim, code_activation)


def _code_activation(config: Any) -> str:
    # As objectives._build_sparse: a ReLU code for the L1 penalty, a Sigmoid rate for KL.
    if config.variant != "sparse":
        return "linear"
    return "relu" if config.sparsity == "l1" else "sigmoid"


def _mlp_vae_torch_module(config: Any, input_dim: int) -> Any:
    return torch_reference.MLPVAE(input_dim, tuple(config.hidden_dims), config.latent_dim)


def _conv_torch_module(cls_name: str) -> Callable[[Any, int], Any]:
    def build(config: Any, input_dim: int) -> Any:
        image_shape = image_shape_of(input_dim)
        return getattr(torch_reference, cls_name)(image_shape, latent_dim=config.latent_dim)

    return build


TWINS: dict[tuple[str, str], TorchTwin] = {
    (twin.variant, twin.arch): twin
    for twin in (
        TorchTwin("vanilla", _mlp_key_map, _mlp_torch_module),
        TorchTwin("denoising", _mlp_key_map, _mlp_torch_module),
        TorchTwin("sparse", _mlp_key_map, _mlp_torch_module),
        TorchTwin("vae", _mlp_vae_key_map, _mlp_vae_torch_module),
        TorchTwin("vanilla", _conv_key_map("code"), _conv_torch_module("ConvAutoencoder"), arch="conv"),
        TorchTwin("denoising", _conv_key_map("code"), _conv_torch_module("ConvAutoencoder"), arch="conv"),
        TorchTwin("vae", _conv_key_map("mean", "logvar"), _conv_torch_module("ConvVAE"), arch="conv"),
    )
}
"""The PyTorch twin of every ``(variant, arch)``: the twin's module and the key map to jaxae's."""


def supported_twins() -> str:
    """``"vanilla (mlp, conv), denoising (mlp, conv), ..."``: what converts, for messages."""
    archs: dict[str, list[str]] = {}
    for variant, arch in TWINS:
        archs.setdefault(variant, []).append(arch)
    return ", ".join(f"{v} ({', '.join(a)})" for v, a in archs.items())


def get_twin(variant: str, arch: str = "mlp") -> TorchTwin:
    """The :class:`TorchTwin` of ``variant`` in ``arch``, or a :class:`JaxaeError` naming those that exist."""
    get_variant(variant)
    try:
        return TWINS[(variant, arch)]
    except KeyError:
        raise JaxaeError(
            f"the {variant} variant with --arch {arch} has no PyTorch twin to convert from or to; "
            f"converting supports: {supported_twins()}"
        ) from None


# ---------------------------------------------------------------------------------------------
# reading state_dicts


def read_state_dict(
    source: str | os.PathLike | Mapping[str, Any], *, allow_nonfinite: bool = False
) -> dict[str, np.ndarray]:
    """A state_dict from a file or a mapping, as float32 numpy arrays (keys in file order).

    ``.pt``/``.pth`` files are read with ``torch.load(weights_only=True)`` only, so a file
    that would run code when unpickled is refused, not run. A checkpoint dict holding the
    state_dict under ``"state_dict"``, ``"model_state_dict"`` or ``"model"`` is accepted.

    Args:
        source: a ``.pt``/``.pth``/``.safetensors`` file (the kind is told by content), or a mapping.
        allow_nonfinite: accept tensors holding NaN or Inf (refused by default: a model with
            them computes NaN, and some fused kernels hide that behind a finite loss).

    Raises:
        JaxaeError: a missing, truncated, hostile or non-torch file, non-float values, or
            (unless ``allow_nonfinite``) NaN or Inf values.
    """
    if isinstance(source, Mapping):
        arrays = _as_float32_arrays(_unwrap(source), "the state_dict")
        if not allow_nonfinite:
            check_finite(arrays, "the state_dict")
        return arrays
    path = Path(source)
    if not path.is_file():
        raise JaxaeError(f"{path} does not exist (or is not a file); give a .pt/.pth state_dict or a .safetensors file")
    kind = _file_kind(path)
    if kind == "safetensors":
        tensors = _read_safetensors(path)
    elif kind == "torch":
        tensors = _read_torch(path)
    else:
        raise JaxaeError(
            f"{path} is neither a PyTorch file (written by torch.save) nor a safetensors file; "
            "save the model with torch.save(model.state_dict(), 'model.pt')"
        )
    arrays = _as_float32_arrays(tensors, str(path))
    if not allow_nonfinite:
        check_finite(arrays, str(path))
    return arrays


def nonfinite_counts(array: np.ndarray) -> tuple[int, int]:
    """``(NaN count, Inf count)`` of ``array`` (+Inf and -Inf together)."""
    return int(np.count_nonzero(np.isnan(array))), int(np.count_nonzero(np.isinf(array)))


def check_finite(state_dict: Mapping[str, np.ndarray], where: str) -> None:
    """Raises :class:`JaxaeError` naming the tensors of ``state_dict`` that hold NaN or Inf.

    Checked on the float32 arrays, so a float64 value too large for float32 counts as Inf,
    as it would in the converted model.
    """
    bad = []
    for key, array in state_dict.items():
        nan, inf = nonfinite_counts(array)
        if nan or inf:
            counts = " and ".join(f"{n} {name}" for n, name in ((nan, "NaN"), (inf, "Inf")) if n)
            bad.append(f"{key} has {counts} of {array.size} values")
    if bad:
        raise JaxaeError(
            f"{where}: {_listed(bad, limit=3)}; a model with non-finite weights computes NaN. "
            "Pass --allow-nonfinite (allow_nonfinite=True) to convert it anyway"
        )


def _file_kind(path: Path) -> str | None:
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        # torch.save writes a zip archive; its legacy format and raw pickles start with PROTO.
        return "torch"
    if len(head) == 9 and head[8:9] == b"{":
        (header_len,) = struct.unpack("<Q", head[:8])
        if header_len <= path.stat().st_size - 8:
            return "safetensors"
    return None


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__


def _read_torch(path: Path) -> Any:
    torch = torch_reference.require_torch()
    try:
        with warnings.catch_warnings():
            # e.g. "Detected pickle protocol 4": the error below says all there is to say.
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        what = f"it references {found.group(1)}" if found else "it holds pickle content beyond tensors"
        raise JaxaeError(
            f"refused to load {path}: {what}, which a weights-only load does not build because "
            "unpickling it could run code; save the weights alone with torch.save(model.state_dict(), PATH)"
        ) from None
    except Exception as e:
        # torch.load reports a damaged file as RuntimeError, EOFError, KeyError, ValueError, ...
        raise JaxaeError(f"cannot read {path} as a PyTorch file (truncated or corrupt?): {_first_line(e)}") from None
    if not isinstance(obj, Mapping):
        raise JaxaeError(
            f"{path} holds a {type(obj).__name__}, not a state_dict (a dict of tensors); "
            "save one with torch.save(model.state_dict(), PATH)"
        )
    return _unwrap(obj)


def _unwrap(obj: Mapping) -> Mapping:
    """A training checkpoint ``{"epoch": ..., "model_state_dict": {...}}`` -> its state_dict."""
    if not _all_tensors(obj):
        for key in _SUBMODULE_KEYS:
            if isinstance(obj.get(key), Mapping) and _all_tensors(obj[key]):
                return obj[key]
    return obj


def _all_tensors(mapping: Mapping) -> bool:
    return all(hasattr(v, "detach") or isinstance(v, np.ndarray) for v in mapping.values())


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    try:
        import safetensors.numpy
    except ImportError:
        raise JaxaeError(
            f"reading {path} needs safetensors, which is not installed: {torch_reference.INSTALL_HINT}"
        ) from None
    try:
        return safetensors.numpy.load_file(path)
    except Exception as e:
        # SafetensorError for a bad header, TypeError/ValueError for dtypes numpy lacks.
        raise JaxaeError(
            f"cannot read {path} as a safetensors file (truncated or corrupt?): {_first_line(e)}"
        ) from None


def _torch_float32(tensor: Any, key: str, where: str) -> np.ndarray:
    if not tensor.is_floating_point():
        raise JaxaeError(f"{where}: {key} holds {tensor.dtype} values; expected floating-point weights")
    if str(tensor.layout) != "torch.strided":
        raise JaxaeError(f"{where}: {key} is a {tensor.layout} tensor; expected dense weights (save tensor.to_dense())")
    try:
        return tensor.detach().cpu().float().numpy()
    except (TypeError, RuntimeError, ValueError, NotImplementedError) as e:  # a meta or nested tensor: no values
        raise JaxaeError(f"{where}: {key} cannot be read as a dense float tensor: {_first_line(e)}") from None


def _as_float32_arrays(tensors: Mapping, where: str) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for key, value in tensors.items():
        if not isinstance(key, str):
            raise JaxaeError(f"{where} has a non-string key {key!r}; a state_dict maps names to tensors")
        if not key.isprintable():  # no module has such a name, and it would break one-line messages
            raise JaxaeError(
                f"{where} has a key {key!r} with unprintable characters; a state_dict maps names to tensors"
            )
        if hasattr(value, "detach"):  # a torch.Tensor; no torch import needed to recognise it
            value = _torch_float32(value, key, where)
        elif isinstance(value, np.ndarray):
            # ml_dtypes' bfloat16 and float8 (from safetensors) are floats numpy does not class as such
            if not (np.issubdtype(value.dtype, np.floating) or value.dtype.name.startswith(("bfloat16", "float8"))):
                raise JaxaeError(f"{where}: {key} holds {value.dtype} values; expected floating-point weights")
        else:
            raise JaxaeError(f"{where}: {key} holds a {type(value).__name__}, not a tensor")
        out[key] = np.array(value, dtype=np.float32, copy=True)
    return out


# ---------------------------------------------------------------------------------------------
# torch -> flax


def _leaf_paths(params: Any) -> dict[tuple, Any]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(params)
    return {tuple(k.key for k in path): leaf for path, leaf in leaves}


def links_for(twin: TorchTwin, params: Any) -> tuple[ParamLink, ...]:
    """The twin's key map for ``params``, checked to cover every Flax leaf exactly once.

    Raises:
        JaxaeError: ``params`` are not of the twin's model (e.g. a VAE's given as a vanilla model's).
    """
    leaves = set(_leaf_paths(params))
    try:
        links = twin.key_map(params)
    except (KeyError, TypeError, IndexError):
        links = None
    mapped = [link.flax_path for link in links or ()]
    if links is None or len(set(mapped)) != len(mapped) or set(mapped) != leaves:
        names = sorted("/".join(str(k) for k in path) for path in leaves ^ set(mapped))
        raise JaxaeError(
            f"the {twin.name} key map does not cover these parameters one to one"
            + (f" ({_listed(names)})" if names and links is not None else "")
            + "; give the variant and arch the model was built with"
        )
    return links


def model_description(config: Any, input_dim: int = INPUT_DIM) -> str:
    """``"the vanilla model (784-128-64-32)"``: the target model, for messages."""
    if getattr(config, "arch", "mlp") == "conv":
        h, w, c = image_shape_of(input_dim)
        return f"the {config.variant} conv model ({h}x{w}x{c}, 16-32 channels, code {config.latent_dim})"
    sizes = "-".join(str(d) for d in (input_dim, *config.hidden_dims, config.latent_dim))
    return f"the {config.variant} model ({sizes})"


def _listed(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


# The four module layouts the twins have, told apart by their top-level names and by whether
# they hold convolutions: what a mismatching state_dict is, and the flags that convert it.
_LAYOUTS = {
    (frozenset({"encoder", "decoder"}), False): (
        "an MLP autoencoder",
        "--variant vanilla, denoising or sparse with --arch mlp",
    ),
    (frozenset({"encoder", "mean", "logvar", "decoder"}), False): ("an MLP VAE", "--variant vae --arch mlp"),
    (frozenset({"encoder", "code", "project", "decoder"}), True): (
        "a conv autoencoder",
        "--variant vanilla or denoising with --arch conv",
    ),
    (frozenset({"encoder", "mean", "logvar", "project", "decoder"}), True): ("a conv VAE", "--variant vae --arch conv"),
}


def _layout(keys: Iterable[str], conv: bool) -> tuple[str, str] | None:
    """What the torch ``keys`` are (and the flags that convert them), if they are a twin's."""
    return _LAYOUTS.get((frozenset(k.split(".")[0] for k in keys), conv))


def check_state_dict(
    state_dict: Mapping[str, np.ndarray], links: tuple[ParamLink, ...], params: Any, what: str, source: str
) -> None:
    """Raises :class:`JaxaeError` unless ``state_dict`` has exactly the links' keys and shapes.

    Args:
        state_dict: the tensors read.
        links: the key map.
        params: Flax params of the target model (for the shapes).
        what: the target model, for messages (e.g. "the vanilla model (784-128-64-32)").
        source: where the state_dict came from, for messages.
    """
    expected = [link.torch_key for link in links]
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in set(expected)]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_listed(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_listed(unexpected)}")
        hint = ""
        found = _layout(state_dict, any(np.ndim(v) == 4 for v in state_dict.values()))
        if unexpected and all(k.startswith("module.") for k in unexpected):
            hint = " (keys start with 'module.': save model.module.state_dict() from the DataParallel wrapper)"
        elif found is not None and found != _layout(expected, any(link.to_flax == _CONV_TO_FLAX for link in links)):
            hint = f"; the file holds {found[0]}'s weights: give {found[1]}"
        elif {k.split(".")[0] for k in missing + unexpected} <= {k.split(".")[0] for k in expected}:
            hint = f"; {_SIZES_HINT}"
        raise JaxaeError(f"{source} does not match {what}: {'; '.join(parts)}{hint}")
    leaves = _leaf_paths(params)
    for link in links:
        want = link.torch_shape(tuple(leaves[link.flax_path].shape))
        got = tuple(state_dict[link.torch_key].shape)
        if got != want:
            raise JaxaeError(f"{source}: {link.torch_key} has shape {got} but {what} needs {want}; {_SIZES_HINT}")


def _config(variant: str | None, config: Any, arch: str | None = None) -> Any:
    from jaxae.train import TrainConfig

    if config is None:
        config = TrainConfig(variant=variant or "vanilla", arch=arch or "mlp")
    else:
        changes = {k: v for k, v in (("variant", variant), ("arch", arch)) if v is not None}
        if any(getattr(config, k) != v for k, v in changes.items()):
            config = dataclasses.replace(config, **changes)
    return config


def fresh_model(config: Any, input_dim: int = INPUT_DIM) -> nnx.Module:
    """The Flax module ``config`` describes (weights to be overwritten)."""
    return get_variant(config.variant).build_model(config, input_dim, nnx.Rngs(0))


def params_from_torch(
    state_dict: Mapping[str, np.ndarray],
    template: Any,
    variant: str = "vanilla",
    *,
    arch: str = "mlp",
    what: str | None = None,
    source: str = "the state_dict",
) -> Any:
    """Flax pure-dict params shaped like ``template``, holding ``state_dict``'s values.

    Checks the key sets and all shapes first; nothing is copied unless everything matches.
    """
    twin = get_twin(variant, arch)
    links = links_for(twin, template)
    check_state_dict(state_dict, links, template, what or f"the {twin.name} model", source)
    params = jax.tree.map(lambda leaf: leaf, template)  # a new tree of new dicts
    for link in links:
        *parents, last = link.flax_path
        node = params
        for key in parents:
            node = node[key]
        node[last] = jnp.asarray(np.ascontiguousarray(link.torch_to_flax(state_dict[link.torch_key])))
    return params


def from_torch(
    path_or_state_dict: str | os.PathLike | Mapping[str, Any],
    variant: str | None = None,
    *,
    arch: str | None = None,
    config: Any = None,
    input_dim: int = INPUT_DIM,
    allow_nonfinite: bool = False,
) -> nnx.Module:
    """A Flax NNX module holding a PyTorch model's weights.

    Args:
        path_or_state_dict: a ``.pt``/``.pth`` file written by ``torch.save(model.state_dict())``,
            a ``.safetensors`` file, or a state_dict (tensors or numpy arrays).
        variant: the variant whose module to build (default: ``config``'s, else ``"vanilla"``).
        arch: ``"mlp"`` or ``"conv"`` (default: ``config``'s, else ``"mlp"``).
        config: a :class:`jaxae.TrainConfig` giving the layer sizes (default: the document's)
            and, for the sparse variant, the code activation (``sparsity``).
        input_dim: the flattened input size (square images for ``arch="conv"``).
        allow_nonfinite: accept weights holding NaN or Inf (refused by default).

    Returns:
        The module; call it on float32 ``[N, 784]`` inputs, normalised as the PyTorch model's were.

    Raises:
        JaxaeError: an unreadable or hostile file, missing or unexpected keys, a wrong shape, or
            (unless ``allow_nonfinite``) NaN or Inf weights.
    """
    config = _config(variant, config, arch)
    source = "the state_dict" if isinstance(path_or_state_dict, Mapping) else str(path_or_state_dict)
    state_dict = read_state_dict(path_or_state_dict, allow_nonfinite=allow_nonfinite)
    model = fresh_model(config, input_dim)
    graphdef, state = nnx.split(model)
    what = model_description(config, input_dim)
    params = params_from_torch(
        state_dict, nnx.to_pure_dict(state), config.variant, arch=config.arch, what=what, source=source
    )
    return nnx.merge(graphdef, params)


# ---------------------------------------------------------------------------------------------
# flax -> torch


def _pure_params(model_or_params: Any) -> Any:
    if isinstance(model_or_params, nnx.Module):
        return nnx.to_pure_dict(nnx.state(model_or_params))
    return model_or_params


def to_numpy_state_dict(model_or_params: Any, variant: str = "vanilla", arch: str = "mlp") -> dict[str, np.ndarray]:
    """The PyTorch state_dict of a Flax model (or its pure-dict params) as numpy arrays.

    Needs no torch; keys are in ``nn.Module.state_dict()`` order.
    """
    params = _pure_params(model_or_params)
    leaves = _leaf_paths(params)
    out: dict[str, np.ndarray] = {}
    for link in links_for(get_twin(variant, arch), params):
        array = np.asarray(jax.device_get(leaves[link.flax_path]))
        out[link.torch_key] = np.array(link.flax_to_torch(array), dtype=np.float32, order="C", copy=True)
    return out


def to_torch_state_dict(model_or_params: Any, variant: str = "vanilla", arch: str = "mlp") -> collections.OrderedDict:
    """The PyTorch state_dict of a Flax model, loadable with ``load_state_dict(strict=True)``.

    Args:
        model_or_params: an NNX module (e.g. from :func:`from_torch`) or its pure-dict params
            (``state.params``).
        variant: the variant the module is.
        arch: its architecture, ``"mlp"`` or ``"conv"``.

    Returns:
        ``OrderedDict[str, torch.Tensor]`` of float32 CPU tensors, for the variant's PyTorch
        twin (``jaxae.TWINS[(variant, arch)]``).
    """
    torch = torch_reference.require_torch()
    return collections.OrderedDict(
        (key, torch.from_numpy(value)) for key, value in to_numpy_state_dict(model_or_params, variant, arch).items()
    )


def check_output_file(path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Raises :class:`JaxaeError` unless a state_dict can be written to ``path``.

    Checked before any work, so a bad ``--out`` fails at once: ``path`` must not be a folder,
    must not exist unless ``overwrite``, and its nearest existing parent must be a folder.
    Whether the folder is writable shows when the file is written (:func:`save_state_dict`).
    """
    path = Path(path)
    if path.is_dir():
        raise JaxaeError(f"--out {path} is a folder; give a file name such as {path / 'model.pt'}")
    if path.exists() and not overwrite:
        raise JaxaeError(f"--out {path} already exists; give a new file name, or pass --force to overwrite it")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise JaxaeError(f"cannot write --out {path}: {parent} is a file, not a folder; give a path in a folder")
    return path


def _publish(tmp: str, path: Path, overwrite: bool) -> None:
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        # A hard link fails if the name exists: a file that appeared since the check is kept.
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links
        if path.exists():
            raise FileExistsError(path) from None
        os.replace(tmp, path)


def save_state_dict(
    state_dict: Mapping[str, np.ndarray], path: str | os.PathLike, fmt: str = "torch", *, overwrite: bool = False
) -> Path:
    """Writes a numpy state_dict as ``torch.save`` output (``fmt="torch"``) or safetensors.

    The file appears complete or not at all (written to a temporary name, then renamed).

    Args:
        state_dict: name -> numpy array.
        path: the file to write; its folder is created if missing.
        fmt: ``"torch"`` or ``"safetensors"``.
        overwrite: replace an existing file (refused by default: it may be the only copy of a model).

    Raises:
        JaxaeError: an unknown format, a folder or an existing file at ``path``, or a location
            that cannot be written (read-only, no permission, a file where a folder should be).
    """
    if fmt not in FORMATS:
        raise JaxaeError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    path = check_output_file(path, overwrite=overwrite)
    if fmt == "torch":
        torch = torch_reference.require_torch()
    else:
        try:
            import safetensors.numpy
        except ImportError:
            raise JaxaeError(f"writing safetensors needs safetensors: {torch_reference.INSTALL_HINT}") from None
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            if fmt == "torch":
                torch.save(collections.OrderedDict((k, torch.from_numpy(v)) for k, v in state_dict.items()), tmp)
            else:
                # metadata {"format": "pt"} is what Hugging Face loaders expect of a torch state_dict.
                safetensors.numpy.save_file(dict(state_dict), tmp, metadata={"format": "pt"})
        except OSError:
            raise
        except Exception as e:  # torch's zip writer reports a failed write (a full disk) as RuntimeError
            raise OSError(_first_line(e)) from None
        _publish(tmp, path, overwrite)
    except FileExistsError:
        raise JaxaeError(
            f"--out {path} already exists; give a new file name, or pass --force to overwrite it"
        ) from None
    except OSError as e:
        raise JaxaeError(f"cannot write --out {path}: {e.strerror or e}; give a writable location") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return path


# ---------------------------------------------------------------------------------------------
# parity


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

    Args:
        state_dict: the PyTorch weights (numpy, e.g. from :func:`read_state_dict`).
        model: the converted Flax module.
        images_u8: uint8 images ``[N, ...]``; both models see them normalised by
            ``config.normalize`` exactly as torchvision's ``ToTensor`` + ``Normalize`` would.
        config: gives the variant, the arch, the layer sizes and the normalisation.
        tolerance: the largest max-abs difference (parameters and outputs) that passes.

    Returns:
        A JSON-ready dict: per-parameter max abs difference, the outputs' max and mean abs
        difference, both models' MSE, and ``passed``.
    """
    config = _config(None, config)
    if not (tolerance >= 0):
        raise JaxaeError(f"--tolerance must be a non-negative number, got {tolerance}")
    twin = get_twin(config.variant, config.arch)
    torch = torch_reference.require_torch()
    n = images_u8.shape[0]
    x = get_normalization(config.normalize).table[np.asarray(images_u8).reshape(n, -1).astype(np.int64)]
    input_dim = x.shape[1]

    module = twin.torch_module(config, input_dim)
    module.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()}, strict=True)
    converted = to_numpy_state_dict(model, config.variant, config.arch)
    param_diffs = {k: float(np.max(np.abs(converted[k] - state_dict[k]), initial=0.0)) for k in state_dict}

    y_torch = torch_outputs(module, x, twin.reconstruct)
    y_flax = flax_outputs(model, x, twin.reconstruct)
    diff = np.abs(y_torch.astype(np.float64) - y_flax.astype(np.float64))
    mse_torch = float(np.mean(np.square(y_torch.astype(np.float64) - x)))
    mse_flax = float(np.mean(np.square(y_flax.astype(np.float64) - x)))
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
        "tolerance": tolerance,
        "passed": bool(max_param <= tolerance and max_out <= tolerance),
    }
