"""Layouts and key maps: which PyTorch ``state_dict`` keys become which Flax parameters.

A conversion is an explicit key map plus transposes (:class:`ParamLink`), one map per
``(variant, arch)`` in :data:`TWINS`. Before anything is copied, the key sets and every shape
are checked against the Flax model the config describes; any mismatch is a
:class:`~jaxae.errors.JaxaeError` naming the keys (and both shapes).

Files saved by people rarely hold exactly the twins' keys. :func:`rename_keys` applies the
user's renames (``--rename OLD=NEW``) and :func:`strip_prefix` strips a prefix every key shares (``module.`` from
DDP, ``_orig_mod.`` from ``torch.compile``, a LightningModule attribute such as ``model.``)
when what is left is a known layout; :func:`infer_model` reads the variant family, the
architecture and the layer sizes off the tensors' shapes; keys that match no layout get a
message listing them with their shapes and, where the shapes allow it, the ``--rename``
flags that would map them.

The conv models flatten their features between the convolutions and the Linear layers:
PyTorch's ``flatten`` of an NCHW tensor orders them ``(c, h, w)``, Flax's of an NHWC tensor
``(h, w, c)``. The twins are written the usual PyTorch way, so the links of the Linear layers
on either side of the flatten (the code or ``mean``/``logvar`` heads, and ``project``) also
reorder that axis (:attr:`ParamLink.chw`): a gather, so conversions stay exact both ways.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import numpy as np

from jaxae import torch_reference
from jaxae.convert.files import _listed
from jaxae.errors import JaxaeError
from jaxae.models import image_shape_of
from jaxae.objectives import get_variant

INPUT_DIM = 784
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
# checking a state_dict against a key map


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


# ---------------------------------------------------------------------------------------------
# renames, prefixes and reading the model off the tensors

_KNOWN_NAME_SETS = frozenset(names for names, _ in _LAYOUTS)


def _top_names(keys: Iterable[str]) -> frozenset[str]:
    return frozenset(k.split(".")[0] for k in keys)


def parse_renames(items: Iterable[str]) -> dict[str, str]:
    """``["fc1.=encoder.0.", ...]`` (the ``--rename`` flags) -> ``{"fc1.": "encoder.0.", ...}``."""
    renames: dict[str, str] = {}
    for item in items:
        old, sep, new = item.partition("=")
        if not sep or not old or not new:
            raise JaxaeError(f"--rename {item!r}: give OLD=NEW, e.g. --rename fc1.=encoder.0. (OLD a key prefix)")
        if old in renames:
            raise JaxaeError(f"--rename {old}= is given twice")
        renames[old] = new
    return renames


def rename_keys(state_dict: Mapping[str, Any], rename: Mapping[str, str], source: str) -> dict[str, Any]:
    """``state_dict`` with each key's longest matching ``rename`` prefix replaced.

    Raises:
        JaxaeError: a prefix that no key starts with (a typo would otherwise pass silently), or
            two keys renamed to the same name.
    """
    if not rename:
        return dict(state_dict)
    olds = sorted(rename, key=len, reverse=True)
    unused = set(rename)
    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        new_key = key
        for old in olds:
            if key.startswith(old):
                new_key = rename[old] + key[len(old) :]
                unused.discard(old)
                break
        if new_key in out:
            raise JaxaeError(f"--rename gives two tensors of {source} the name {new_key}; rename them apart")
        out[new_key] = value
    if unused:
        old = sorted(unused)[0]
        raise JaxaeError(
            f"--rename {old}={rename[old]}: no key of {source} starts with {old!r}; its keys: {_listed(list(state_dict))}"
        )
    return out


def strip_prefix(state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """Strips the prefix every key shares (``module.``, ``_orig_mod.``, ``model.``, ...) when the
    rest is a known layout; returns the state_dict and what was stripped (``""`` for nothing)."""
    keys = list(state_dict)
    stripped = ""
    while keys and _top_names(keys) not in _KNOWN_NAME_SETS:
        first = _top_names(keys)
        if len(first) != 1 or any("." not in k for k in keys):
            break
        prefix = next(iter(first)) + "."
        keys = [k[len(prefix) :] for k in keys]
        stripped += prefix
    if stripped and _top_names(keys) in _KNOWN_NAME_SETS:
        return dict(zip(keys, state_dict.values(), strict=False)), stripped
    return dict(state_dict), ""


@dataclasses.dataclass(frozen=True)
class InferredModel:
    """What the tensors of a known layout say about the model.

    Attributes:
        family: ``"autoencoder"`` or ``"vae"`` (``mean``/``logvar`` heads).
        arch: ``"mlp"`` or ``"conv"`` (4-D weights).
        input_dim: the flattened image size.
        latent_dim: the code size.
        hidden_dims: the encoder's hidden widths (MLPs; None for conv).
    """

    family: str
    arch: str
    input_dim: int
    latent_dim: int
    hidden_dims: tuple[int, ...] | None


def infer_model(state_dict: Mapping[str, np.ndarray]) -> InferredModel | None:
    """Reads the model off a state_dict of a twin layout; None for keys of no known layout."""
    shapes = {k: tuple(np.shape(v)) for k, v in state_dict.items()}
    conv = any(len(s) == 4 for s in shapes.values())
    names = _top_names(shapes)
    if (names, conv) not in _LAYOUTS:
        return None
    family = "vae" if "mean" in names else "autoencoder"
    try:
        if conv:
            head = shapes["mean.weight" if family == "vae" else "code.weight"]
            features, channels_out = shapes["project.weight"][0], _sequential_shapes(shapes, "encoder")[-1][0]
            channels_in = _sequential_shapes(shapes, "encoder")[0][1]
            side = 4 * math.isqrt(features // channels_out)  # two stride-2 convolutions
            return InferredModel(family, "conv", side * side * channels_in, head[0], None)
        encoder = _sequential_shapes(shapes, "encoder")
        if family == "vae":
            found = InferredModel(family, "mlp", encoder[0][1], shapes["mean.weight"][0], tuple(s[0] for s in encoder))
        else:
            outs = tuple(s[0] for s in encoder)
            found = InferredModel(family, "mlp", encoder[0][1], outs[-1], outs[:-1])
        return found if _mlp_shapes_consistent(shapes, found) else None
    except (KeyError, IndexError, ValueError, ZeroDivisionError):
        return None  # a layout's names with other tensors: check_state_dict names what is wrong


def _mlp_shapes_consistent(shapes: Mapping[str, tuple], found: InferredModel) -> bool:
    """Whether ``shapes`` are exactly the MLP twin that ``found`` describes (weights chained, biases present)."""
    expected = {}
    chain = [found.input_dim, *found.hidden_dims] + ([] if found.family == "vae" else [found.latent_dim])
    for i, (n_in, n_out) in enumerate(zip(chain, chain[1:], strict=False)):
        expected[f"encoder.{2 * i}.weight"], expected[f"encoder.{2 * i}.bias"] = (n_out, n_in), (n_out,)
    if found.family == "vae":
        for head in ("mean", "logvar"):
            expected[f"{head}.weight"], expected[f"{head}.bias"] = (found.latent_dim, chain[-1]), (found.latent_dim,)
    back = [found.latent_dim, *reversed(found.hidden_dims), found.input_dim]
    for i, (n_in, n_out) in enumerate(zip(back, back[1:], strict=False)):
        expected[f"decoder.{2 * i}.weight"], expected[f"decoder.{2 * i}.bias"] = (n_out, n_in), (n_out,)
    return dict(shapes) == expected


def _sequential_shapes(shapes: Mapping[str, tuple], part: str) -> list[tuple]:
    indices = sorted(int(k.split(".")[1]) for k in shapes if k.startswith(f"{part}.") and k.endswith(".weight"))
    return [shapes[f"{part}.{i}.weight"] for i in indices]


def unknown_layout_message(state_dict: Mapping[str, np.ndarray], source: str) -> str:
    """One line for keys of no known layout: the keys with their shapes, and ``--rename`` flags if the shapes allow."""
    listed = _listed([f"{k} {list(np.shape(v))}" for k, v in state_dict.items()], limit=8)
    renames = suggest_renames(state_dict)
    fix = (
        f"if the layers are in this order, convert with {renames}"
        if renames
        else "map them onto a twin's names (encoder.N, decoder.N, mean, logvar, code, project) with --rename OLD=NEW"
    )
    return f"{source} matches no layout jaxae converts (its keys: {listed}); {fix}"


def suggest_renames(state_dict: Mapping[str, np.ndarray]) -> str | None:
    """``--rename`` flags mapping a chain of Linear layers onto the MLP autoencoder layout, if the shapes form one.

    The chain must run from the input size back to it, each layer's input the previous one's
    output; the narrowest output ends the encoder.
    """
    modules: dict[str, dict[str, tuple]] = {}
    for key, value in state_dict.items():
        prefix, _, leaf = key.rpartition(".")
        if leaf not in ("weight", "bias") or not prefix:
            return None
        modules.setdefault(prefix, {})[leaf] = tuple(np.shape(value))
    shapes = [m.get("weight", ()) for m in modules.values()]
    if len(shapes) < 2 or any(len(s) != 2 for s in shapes):
        return None
    if any(a[0] != b[1] for a, b in zip(shapes, shapes[1:], strict=False)) or shapes[0][1] != shapes[-1][0]:
        return None
    bottleneck = min(range(len(shapes) - 1), key=lambda i: shapes[i][0])
    names = list(modules)
    flags = [f"--rename {m}.=encoder.{2 * i}." for i, m in enumerate(names[: bottleneck + 1])]
    flags += [f"--rename {m}.=decoder.{2 * i}." for i, m in enumerate(names[bottleneck + 1 :])]
    return " ".join(flags)
