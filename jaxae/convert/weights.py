"""Weights: a PyTorch file matched to a jaxae model (:func:`match`), and Flax params <-> state_dicts."""

from __future__ import annotations

import collections
import dataclasses
import math
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
    TUTORIAL_IMAGE_SHAPE,
    _layout,
    _leaf_paths,
    check_image_shape,
    check_state_dict,
    get_twin,
    infer_model,
    links_for,
    model_description,
    rename_keys,
    resolve_image_shape,
    strip_prefix,
    unknown_layout_message,
)
from jaxae.errors import JaxaeError
from jaxae.objectives import get_variant


@dataclasses.dataclass
class Match:
    """A PyTorch file matched to the jaxae model that takes its weights.

    Attributes:
        config: the :class:`~jaxae.config.TrainConfig` of that model (sizes read off the tensors
            unless given).
        image_shape: the images the model takes, ``(H, W, C)``.
        state_dict: the model's tensors under the twin's keys, in file order.
        file: the file as read (optimizer state, epoch, step).
        stripped: the key prefix removed (``"module."``), or ``""``.
        inferred: the settings read off the tensors (name -> value), for the summary.
        notes: what was assumed, for the summary.
    """

    config: Any
    image_shape: tuple[int, int, int]
    state_dict: dict[str, np.ndarray]
    file: TorchFile
    stripped: str = ""
    inferred: dict[str, Any] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def input_dim(self) -> int:
        """The flattened input size, ``H * W * C``."""
        return math.prod(self.image_shape)

    @property
    def description(self) -> str:
        """``"the vanilla model (28x28x1 images, 784-128-64-32)"``."""
        return model_description(self.config, self.image_shape)


def match(
    source: str | os.PathLike | Mapping[str, Any],
    config: Any = None,
    *,
    variant: str | None = None,
    arch: str | None = None,
    hidden_dims: tuple[int, ...] | None = None,
    latent_dim: int | None = None,
    input_dim: int | None = None,
    image_shape: tuple[int, int, int] | None = None,
    rename: Mapping[str, str] | None = None,
    allow_nonfinite: bool = False,
    image_shape_given_as: str = "the image shape given is",
    image_shape_fix: str = "give the image shape the model was trained on",
) -> Match:
    """Reads a PyTorch file and settles the jaxae model its weights fit.

    The variant family, the architecture and the layer sizes are read off the tensors; the
    keyword arguments given are checked against them. So is the image shape; without one, the
    tensors are read as the tutorial's 28x28x1 images only (an MLP with 784 inputs, a one-channel
    conv model with 7x7 feature positions). Any other shape must be given: 576 inputs may be
    24x24x1 or 16x12x3, 64 conv feature positions 32x32 or 16x64 images. PyTorch models take NCHW images, flattened in ``(c, h, w)`` order; the Flax model
    takes NHWC ones, flattened ``(h, w, c)``: the weights that touch the image are reordered.

    Args:
        source: a file (``.pt``/``.pth``/``.ckpt``/``.safetensors``) or a state_dict / checkpoint dict.
        config: a :class:`~jaxae.config.TrainConfig` for everything else (normalisation, dataset,
            the sparse code activation); default: the document's.
        variant: the variant (default: ``"vae"`` for ``mean``/``logvar`` heads, else ``"vanilla"``).
        arch: ``"mlp"`` or ``"conv"``, if known; checked against the file.
        hidden_dims: the encoder's hidden widths, if known; checked against the file.
        latent_dim: the code size, if known; checked against the file.
        input_dim: the flattened input size, if known; checked against the file (an older
            spelling: ``image_shape`` says more).
        image_shape: the images the model takes, ``(H, W, C)``; checked against the file.
            Needed where the tensors leave several shapes possible.
        rename: ``{old_prefix: new_prefix}`` applied to the keys first.
        allow_nonfinite: accept NaN or Inf weights.
        image_shape_given_as: how a mismatch message names the given ``image_shape``
            (``"the mnist-sample images are"``).
        image_shape_fix: what a mismatch message tells the user to do.

    Raises:
        JaxaeError: an unreadable file, keys of no known layout (listed, with ``--rename`` flags
            where the shapes allow), settings the tensors contradict, or an image shape that is
            needed and not given.
    """
    from jaxae.train import TrainConfig

    base = config if config is not None else TrainConfig()
    if variant is not None:
        get_twin(variant, arch or "mlp")  # an unknown variant or arch is named before the file is read
    if image_shape is not None:
        image_shape = check_image_shape(image_shape)
        if input_dim is not None and input_dim != math.prod(image_shape):
            raise JaxaeError(
                f"input_dim {input_dim} and image_shape {image_shape} disagree ({math.prod(image_shape)} values); "
                "give the image shape alone"
            )
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
        return Match(config_, image_shape or TUTORIAL_IMAGE_SHAPE, state_dict, file, stripped)
    _check_buildable(inferred, file.source)
    found: dict[str, Any] = {"arch": inferred.arch, "latent_dim": inferred.latent_dim}
    if inferred.hidden_dims is not None:
        found["hidden_dims"] = inferred.hidden_dims
    if inferred.conv_channels is not None:
        found["conv_channels"] = inferred.conv_channels
    given = _given(arch=arch, hidden_dims=hidden_dims, latent_dim=latent_dim)
    for name, value in given.items():
        if name in found and tuple(np.atleast_1d(value)) != tuple(np.atleast_1d(found[name])):
            flag = "--" + name.replace("_", "-")
            raise JaxaeError(
                f"{flag} {_show(value)} does not match {file.source}: its tensors give {flag} {_show(found[name])}; "
                f"leave {flag} out to take it from the file"
            )
    if input_dim is not None and image_shape is None:
        if inferred.arch == "mlp" and input_dim != inferred.image_input.size:
            raise JaxaeError(f"{file.source} takes inputs of {inferred.image_input.size} values, not {input_dim}")
        guess = inferred.image_input.guess()
        if guess is not None and math.prod(guess) == input_dim:
            image_shape = guess
        else:  # a conv model, or an MLP input other than 28x28x1: the size alone does not say
            raise JaxaeError(
                f"{file.source} takes {inferred.image_input.describe()}; input_dim {input_dim} does not say the "
                "image shape: give image_shape=(H, W, C)"
            )
    image_shape = resolve_image_shape(
        inferred.image_input,
        image_shape,
        file.source,
        given_as=image_shape_given_as,
        fix=image_shape_fix,
        ask="give the image shape (--image-shape H,W,C)",
    )
    notes = []
    if variant is None:
        variant = "vae" if inferred.family == "vae" else "vanilla"
        if inferred.family == "autoencoder":
            notes.append(
                "variant vanilla (a linear code) assumed: a state_dict does not tell vanilla, denoising and "
                "sparse apart; give --variant sparse --sparsity l1|kl for a ReLU or Sigmoid code"
            )
    elif get_variant(variant).variational != (inferred.family == "vae"):
        what, flags = _layout(state_dict, inferred.arch == "conv")
        raise JaxaeError(f"{file.source} does not fit a {variant} model: the file holds {what}'s weights: give {flags}")
    config_ = dataclasses.replace(base, variant=variant, **found)
    return Match(config_, image_shape, state_dict, file, stripped, found, notes)


def _check_buildable(inferred: Any, source: str) -> None:
    """Refuses a twin's layout whose sizes no jaxae model has (no flag would make one)."""
    if inferred.arch == "mlp" and not inferred.hidden_dims:
        sizes = f"{inferred.image_input.size}-{inferred.latent_dim}"
        raise JaxaeError(
            f"{source} is an MLP with no hidden layer ({sizes}, the decoder mirrored); jaxae's MLPs have at least one "
            "hidden layer, so it cannot be converted"
        )


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


def fresh_model(config: Any, image_shape: Any = TUTORIAL_IMAGE_SHAPE) -> nnx.Module:
    """The Flax module ``config`` describes for ``(H, W, C)`` images (weights to be overwritten)."""
    return get_variant(config.variant).build_model(config, image_shape, nnx.Rngs(0))


def params_from_torch(
    state_dict: Mapping[str, np.ndarray],
    template: Any,
    variant: str = "vanilla",
    *,
    arch: str = "mlp",
    what: str | None = None,
    source: str = "the state_dict",
    image_shape: Any = None,
) -> Any:
    """Flax pure-dict params shaped like ``template``, holding ``state_dict``'s values.

    Checks the key sets and all shapes first; nothing is copied unless everything matches.
    ``image_shape`` is the images' ``(H, W, C)`` (see :func:`links_for`; None: read off
    ``template`` where that is unambiguous).
    """
    twin = get_twin(variant, arch)
    links = links_for(twin, template, image_shape)
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
    image_shape: tuple[int, int, int] | None = None,
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
        input_dim: the flattened input size (default: from the tensors); ``image_shape`` says more.
        allow_nonfinite: accept weights holding NaN or Inf (refused by default).
        image_shape: the images the model takes, ``(H, W, C)`` (default: from the tensors where
            they determine it, e.g. 784 inputs -> 28x28x1; else needed).

    Returns:
        The module; call it on float32 NHWC images ``[N, H, W, C]`` (or ``[N, H * W * C]``
        flattened in ``(h, w, c)`` order), normalised as the PyTorch model's were. The PyTorch
        model took the same images as NCHW (flattened ``(c, h, w)``).

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
        image_shape=image_shape,
        rename=rename,
        allow_nonfinite=allow_nonfinite,
    )
    return model_from_match(found)


def model_from_match(found: Match) -> nnx.Module:
    """The Flax module of a :class:`Match`, holding its weights (every key and shape checked first)."""
    model = fresh_model(found.config, found.image_shape)
    graphdef, state = nnx.split(model)
    params = params_from_torch(
        found.state_dict,
        nnx.to_pure_dict(state),
        found.config.variant,
        arch=found.config.arch,
        what=found.description,
        source=found.file.source,
        image_shape=found.image_shape,
    )
    return nnx.merge(graphdef, params)


# ---------------------------------------------------------------------------------------------
# flax -> torch


def _pure_params(model_or_params: Any) -> Any:
    if isinstance(model_or_params, nnx.Module):
        return nnx.to_pure_dict(nnx.state(model_or_params))
    return model_or_params


def model_image_shape(model_or_params: Any, image_shape: Any = None) -> tuple[int, int, int] | None:
    """The image shape of a Flax model: its ``image_shape`` attribute if it has one (checked
    against ``image_shape`` when both are given), else ``image_shape`` (None: to be read off the
    parameters)."""
    own = getattr(model_or_params, "image_shape", None) if isinstance(model_or_params, nnx.Module) else None
    if own is None or len(tuple(own)) != 3:
        return None if image_shape is None else check_image_shape(image_shape)
    own = check_image_shape(own, "the model's image_shape")
    if image_shape is not None and check_image_shape(image_shape) != own:
        raise JaxaeError(
            f"image_shape {tuple(image_shape)} does not match the model's, {own}; leave it out to take the model's"
        )
    return own


def to_numpy_state_dict(
    model_or_params: Any, variant: str = "vanilla", arch: str = "mlp", image_shape: Any = None
) -> dict[str, np.ndarray]:
    """The PyTorch state_dict of a Flax model (or its pure-dict params) as numpy arrays.

    Needs no torch; keys are in ``nn.Module.state_dict()`` order. The image shape is the
    model's ``image_shape``, else ``image_shape``, else read off the parameters where that is
    unambiguous (see :func:`links_for`).
    """
    params = _pure_params(model_or_params)
    shape = model_image_shape(model_or_params, image_shape)
    leaves = _leaf_paths(params)
    out: dict[str, np.ndarray] = {}
    for link in links_for(get_twin(variant, arch), params, shape):
        array = np.asarray(jax.device_get(leaves[link.flax_path]))
        out[link.torch_key] = np.array(link.flax_to_torch(array), dtype=np.float32, order="C", copy=True)
    return out


def to_torch_state_dict(
    model_or_params: Any, variant: str = "vanilla", arch: str = "mlp", image_shape: Any = None
) -> collections.OrderedDict:
    """The PyTorch state_dict of a Flax model, loadable with ``load_state_dict(strict=True)``.

    Args:
        model_or_params: an NNX module (e.g. from :func:`from_torch`) or its pure-dict params
            (``state.params``).
        variant: the variant the module is.
        arch: its architecture, ``"mlp"`` or ``"conv"``.
        image_shape: the images the model takes, ``(H, W, C)``: needed for pure-dict params
            other than the tutorial's 28x28x1 (a 3072-input MLP, conv features of other sizes); a module's
            own ``image_shape`` is taken first.

    Returns:
        ``OrderedDict[str, torch.Tensor]`` of float32 CPU tensors, for the variant's PyTorch
        twin (``jaxae.TWINS[(variant, arch)]``), which takes the images as NCHW (flattened in
        ``(c, h, w)`` order).
    """
    torch = torch_reference.require_torch()
    state_dict = to_numpy_state_dict(model_or_params, variant, arch, image_shape)
    return collections.OrderedDict((key, torch.from_numpy(value)) for key, value in state_dict.items())
