"""Weights: a PyTorch file matched to a jaxae model (:func:`match`), and Flax params <-> state_dicts."""

from __future__ import annotations

import collections
import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxae import torch_reference
from jaxae.convert.files import TorchFile, read_torch_file
from jaxae.convert.layouts import (
    _LAYOUTS,
    INPUT_DIM,
    _layout,
    _leaf_paths,
    check_state_dict,
    get_twin,
    infer_model,
    links_for,
    model_description,
    rename_keys,
    strip_prefix,
    unknown_layout_message,
)
from jaxae.errors import JaxaeError
from jaxae.objectives import get_variant


@dataclasses.dataclass
class Match:
    """A PyTorch file matched to the jaxae model that takes its weights.

    Attributes:
        config: the :class:`~jaxae.train.TrainConfig` of that model (sizes read off the tensors
            unless given).
        input_dim: the flattened input size.
        state_dict: the model's tensors under the twin's keys, in file order.
        file: the file as read (optimizer state, epoch, step).
        stripped: the key prefix removed (``"module."``), or ``""``.
        inferred: the settings read off the tensors (name -> value), for the summary.
        notes: what was assumed, for the summary.
    """

    config: Any
    input_dim: int
    state_dict: dict[str, np.ndarray]
    file: TorchFile
    stripped: str = ""
    inferred: dict[str, Any] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def description(self) -> str:
        """``"the vanilla model (784-128-64-32)"``."""
        return model_description(self.config, self.input_dim)


def match(
    source: str | os.PathLike | Mapping[str, Any],
    config: Any = None,
    *,
    variant: str | None = None,
    arch: str | None = None,
    hidden_dims: tuple[int, ...] | None = None,
    latent_dim: int | None = None,
    input_dim: int | None = None,
    rename: Mapping[str, str] | None = None,
    allow_nonfinite: bool = False,
) -> Match:
    """Reads a PyTorch file and settles the jaxae model its weights fit.

    The variant family, the architecture, the layer sizes and the input size are read off the
    tensors; the keyword arguments given are checked against them.

    Args:
        source: a file (``.pt``/``.pth``/``.ckpt``/``.safetensors``) or a state_dict / checkpoint dict.
        config: a :class:`~jaxae.train.TrainConfig` for everything else (normalisation, dataset,
            the sparse code activation); default: the document's.
        variant: the variant (default: ``"vae"`` for ``mean``/``logvar`` heads, else ``"vanilla"``).
        arch: ``"mlp"`` or ``"conv"``, if known; checked against the file.
        hidden_dims: the encoder's hidden widths, if known; checked against the file.
        latent_dim: the code size, if known; checked against the file.
        input_dim: the flattened input size, if known; checked against the file.
        rename: ``{old_prefix: new_prefix}`` applied to the keys first.
        allow_nonfinite: accept NaN or Inf weights.

    Raises:
        JaxaeError: an unreadable file, keys of no known layout (listed, with ``--rename`` flags
            where the shapes allow), or settings the tensors contradict.
    """
    from jaxae.train import TrainConfig

    base = config if config is not None else TrainConfig()
    if variant is not None:
        get_twin(variant, arch or "mlp")  # an unknown variant or arch is named before the file is read
    file = read_torch_file(source, allow_nonfinite=allow_nonfinite)
    state_dict = rename_keys(file.tensors, rename or {}, file.source)
    state_dict, stripped = strip_prefix(state_dict)
    inferred = infer_model(state_dict)
    if inferred is None:
        if not _top_names_of(state_dict) & _LAYOUT_NAMES:
            raise JaxaeError(unknown_layout_message(state_dict, file.source))
        # a known layout whose tensors do not fit it: the checks below name what is wrong
        config_ = dataclasses.replace(
            base, **_given(variant=variant, arch=arch, hidden_dims=hidden_dims, latent_dim=latent_dim)
        )
        return Match(config_, input_dim or INPUT_DIM, state_dict, file, stripped)
    found: dict[str, Any] = {"arch": inferred.arch, "latent_dim": inferred.latent_dim}
    if inferred.hidden_dims is not None:
        found["hidden_dims"] = inferred.hidden_dims
    given = _given(arch=arch, hidden_dims=hidden_dims, latent_dim=latent_dim)
    for name, value in given.items():
        if name in found and tuple(np.atleast_1d(value)) != tuple(np.atleast_1d(found[name])):
            flag = "--" + name.replace("_", "-")
            raise JaxaeError(
                f"{flag} {_show(value)} does not match {file.source}: its tensors give {flag} {_show(found[name])}; "
                f"leave {flag} out to take it from the file"
            )
    if input_dim is not None and input_dim != inferred.input_dim:
        raise JaxaeError(f"{file.source} takes inputs of {inferred.input_dim} values, not {input_dim}")
    notes = []
    if variant is None:
        variant = "vae" if inferred.family == "vae" else "vanilla"
        if inferred.family == "autoencoder":
            notes.append(
                "variant vanilla (a linear code) assumed: a state_dict does not tell vanilla, denoising and "
                "sparse apart; give --variant sparse --sparsity l1|kl for a ReLU or Sigmoid code"
            )
    elif (variant == "vae") != (inferred.family == "vae"):
        what, flags = _layout(state_dict, inferred.arch == "conv")
        raise JaxaeError(f"{file.source} does not fit a {variant} model: the file holds {what}'s weights: give {flags}")
    config_ = dataclasses.replace(base, variant=variant, **found)
    return Match(config_, inferred.input_dim, state_dict, file, stripped, found, notes)


_LAYOUT_NAMES = frozenset().union(*(names for names, _ in _LAYOUTS))


def _top_names_of(state_dict: Mapping[str, Any]) -> frozenset[str]:
    return frozenset(k.split(".")[0] for k in state_dict)


def _given(**settings: Any) -> dict[str, Any]:
    return {k: tuple(v) if k == "hidden_dims" else v for k, v in settings.items() if v is not None}


def _show(value: Any) -> str:
    return ",".join(str(v) for v in value) if isinstance(value, (tuple, list)) else str(value)


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
    hidden_dims: tuple[int, ...] | None = None,
    latent_dim: int | None = None,
    rename: Mapping[str, str] | None = None,
    config: Any = None,
    input_dim: int | None = None,
    allow_nonfinite: bool = False,
) -> nnx.Module:
    """A Flax NNX module holding a PyTorch model's weights.

    The model is read off the tensors (autoencoder or VAE, mlp or conv, layer sizes); what is
    given is checked against them.

    Args:
        path_or_state_dict: a ``.pt``/``.pth`` file written by ``torch.save(model.state_dict())``,
            a training checkpoint (the tutorial's general checkpoint, a Lightning ``.ckpt``), a
            ``.safetensors`` file, or a state_dict (tensors or numpy arrays).
        variant: the variant whose module to build (default: ``config``'s if given, else
            ``"vae"`` for a file with ``mean``/``logvar`` heads and ``"vanilla"`` otherwise).
        arch: ``"mlp"`` or ``"conv"`` (default: from the tensors).
        hidden_dims: the encoder's hidden widths (default: from the tensors).
        latent_dim: the code size (default: from the tensors).
        rename: ``{"fc1.": "encoder.0.", ...}``: key prefixes to rename first, for other layer names.
        config: a :class:`jaxae.TrainConfig` whose variant, arch and sizes are checked against the
            file, and which gives the sparse variant's code activation (``sparsity``).
        input_dim: the flattened input size (default: from the tensors).
        allow_nonfinite: accept weights holding NaN or Inf (refused by default).

    Returns:
        The module; call it on float32 ``[N, 784]`` inputs, normalised as the PyTorch model's were.

    Raises:
        JaxaeError: an unreadable or hostile file, keys of no known layout, settings that
            contradict the tensors, or (unless ``allow_nonfinite``) NaN or Inf weights.
    """
    if config is not None:
        variant = variant or config.variant
        arch = arch or config.arch
        hidden_dims = hidden_dims or config.hidden_dims
        latent_dim = latent_dim or config.latent_dim
    found = match(
        path_or_state_dict,
        config,
        variant=variant,
        arch=arch,
        hidden_dims=hidden_dims,
        latent_dim=latent_dim,
        input_dim=input_dim,
        rename=rename,
        allow_nonfinite=allow_nonfinite,
    )
    return model_from_match(found)


def model_from_match(found: Match) -> nnx.Module:
    """The Flax module of a :class:`Match`, holding its weights (every key and shape checked first)."""
    model = fresh_model(found.config, found.input_dim)
    graphdef, state = nnx.split(model)
    params = params_from_torch(
        found.state_dict,
        nnx.to_pure_dict(state),
        found.config.variant,
        arch=found.config.arch,
        what=found.description,
        source=found.file.source,
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
