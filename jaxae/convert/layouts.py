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

Images are ``H x W x C``. PyTorch flattens an NCHW tensor in ``(c, h, w)`` order, Flax an NHWC
one in ``(h, w, c)`` order, and the twins are written the usual PyTorch way: an MLP twin takes
``x.view(N, -1)`` of an NCHW batch, a conv twin flattens its NCHW features. So the links of the
Linear layers that touch a flattened axis reorder it (:attr:`ParamLink.chw`): the MLPs' first
encoder and last decoder layers (the image, ``(C, H, W)``; the identity for one channel), and
the conv models' Linear layers on either side of the features' flatten (the code or
``mean``/``logvar`` heads, and ``project``: ``(c2, H / 4, W / 4)``). A gather, so conversions
stay exact both ways.

Which image shape a model takes is not always in its tensors (an MLP with 3072 inputs may take
32x32x3 or 64x48x1 images; a conv model's features fix only ``(H / 4) * (W / 4)``), so the key
maps take it (:func:`links_for`); without one they read the tensors as the tutorial's 28x28x1
images, and only where they fit those (:meth:`ImageInput.guess`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import numpy as np

from jaxae import data, torch_reference
from jaxae.convert.files import _listed
from jaxae.errors import JaxaeError
from jaxae.models import CONV_CHANNELS
from jaxae.objectives import get_variant

INPUT_DIM = 784
TUTORIAL_IMAGE_SHAPE = (28, 28, 1)  # the images a tensor's shapes alone are read as, and no others
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
        chw: ``(C, H, W)`` when the torch tensor's axis ``chw_axis`` runs over a flattened image
            or flattened conv features: they are reordered from PyTorch's ``(c, h, w)`` order to
            Flax's ``(h, w, c)`` (before ``to_flax``); ``None`` for none.
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
        key_map: ``(params, image_shape) -> links``: the links for a Flax pure-dict params tree
            of this variant (a fresh one when converting from torch) taking ``(H, W, C)``
            images; they must cover every leaf.
        torch_module: ``(config, image_shape) -> torch.nn.Module``, the PyTorch twin for
            ``(H, W, C)`` images.
        reconstruct: ``(model, x) -> reconstruction``, used by the parity report on both
            frameworks' models (default: ``model(x)``; for the VAEs that is the reconstruction
            from the posterior mean).
        arch: ``"mlp"`` or ``"conv"`` (``TrainConfig.arch``).
    """

    variant: str
    key_map: Callable[[Any, tuple[int, int, int]], tuple[ParamLink, ...]]
    torch_module: Callable[[Any, tuple[int, int, int]], Any]
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


def _mlp_key_map(*heads: str) -> Callable[[Any, tuple[int, int, int]], tuple[ParamLink, ...]]:
    def key_map(params: Any, image_shape: tuple[int, int, int]) -> tuple[ParamLink, ...]:
        h, w, c = image_shape
        encoder, decoder = _sequential_links(params, "encoder"), _sequential_links(params, "decoder")
        # the first Linear reads the flattened image (weight axis 1), the last writes it (weight axis 0, bias)
        encoder[0] = dataclasses.replace(encoder[0], chw=(c, h, w), chw_axis=1)
        decoder[-2:] = [dataclasses.replace(link, chw=(c, h, w), chw_axis=0) for link in decoder[-2:]]
        for head in heads:
            encoder += _linear_links(head)
        return tuple(encoder + decoder)

    return key_map


# torch Conv2d weight [out, in, kh, kw] -> nnx.Conv kernel [kh, kw, in, out]; torch
# ConvTranspose2d weight [in, out, kh, kw] -> nnx.ConvTranspose kernel [kh, kw, out, in]
# (transpose_kernel=True layout): the same permutation for both.
_CONV_TO_FLAX = (2, 3, 1, 0)


def _conv_key_map(*heads: str) -> Callable[[Any, tuple[int, int, int]], tuple[ParamLink, ...]]:
    def key_map(params: Any, image_shape: tuple[int, int, int]) -> tuple[ParamLink, ...]:
        h, w, _ = image_shape
        layers = params["encoder"]["layers"]
        factor = 2 ** len(layers)  # one stride-2 convolution per stage (the ReLUs hold no parameters)
        chw = (layers[max(layers)]["kernel"].shape[-1], h // factor, w // factor)
        links = _sequential_links(params, "encoder", _CONV_TO_FLAX)
        for head in heads:  # Linear(features -> code)
            links += _linear_links(head, chw, flattened="in")
        links += _linear_links("project", chw, flattened="out")  # Linear(code -> features)
        return tuple(links + _sequential_links(params, "decoder", _CONV_TO_FLAX))

    return key_map


# The VQ-VAE's codebook and its EMA state: buffers in torch, CodebookState variables in Flax.
_QUANTIZER_LINKS = tuple(ParamLink(f"quantizer.{n}", ("quantizer", n)) for n in ("codebook", "ema_count", "ema_sum"))


def _vq_key_map(arch: str) -> Callable[[Any, tuple[int, int, int]], tuple[ParamLink, ...]]:
    def key_map(params: Any, image_shape: tuple[int, int, int]) -> tuple[ParamLink, ...]:
        if arch == "mlp":
            return _mlp_key_map()(params, image_shape) + _QUANTIZER_LINKS
        # a code vector per feature-map position: the heads are Linears on the channels, no reordering
        links = _sequential_links(params, "encoder", _CONV_TO_FLAX) + _linear_links("code") + _linear_links("project")
        return tuple(links + _sequential_links(params, "decoder", _CONV_TO_FLAX)) + _QUANTIZER_LINKS

    return key_map


def _vq_torch_module(config: Any, image_shape: tuple[int, int, int]) -> Any:
    sizes = (config.latent_dim, config.codebook_size, config.codebook_decay)
    if config.arch == "conv":
        return torch_reference.ConvVQVAE(tuple(image_shape), tuple(config.conv_channels), *sizes)
    return torch_reference.MLPVQVAE(math.prod(image_shape), tuple(config.hidden_dims), *sizes)


def _mlp_torch_module(config: Any, image_shape: tuple[int, int, int]) -> Any:
    code_activation = _code_activation(config)
    input_dim = math.prod(image_shape)
    if input_dim == INPUT_DIM and tuple(config.hidden_dims) == (128, 64) and config.latent_dim == 32:
        if code_activation == "linear":
            return torch_reference.Autoencoder()
    return torch_reference.MLPAutoencoder(input_dim, tuple(config.hidden_dims), config.latent_dim, code_activation)


def _code_activation(config: Any) -> str:
    # As objectives._build_sparse: a ReLU code for the L1 penalty, a Sigmoid rate for KL.
    if config.variant != "sparse":
        return "linear"
    return "relu" if config.sparsity == "l1" else "sigmoid"


def _mlp_vae_torch_module(config: Any, image_shape: tuple[int, int, int]) -> Any:
    return torch_reference.MLPVAE(math.prod(image_shape), tuple(config.hidden_dims), config.latent_dim)


def _conv_torch_module(cls_name: str) -> Callable[[Any, tuple[int, int, int]], Any]:
    def build(config: Any, image_shape: tuple[int, int, int]) -> Any:
        channels = tuple(getattr(config, "conv_channels", CONV_CHANNELS))
        return getattr(torch_reference, cls_name)(tuple(image_shape), channels, latent_dim=config.latent_dim)

    return build


TWINS: dict[tuple[str, str], TorchTwin] = {
    (twin.variant, twin.arch): twin
    for twin in (
        TorchTwin("vanilla", _mlp_key_map(), _mlp_torch_module),
        TorchTwin("denoising", _mlp_key_map(), _mlp_torch_module),
        TorchTwin("sparse", _mlp_key_map(), _mlp_torch_module),
        TorchTwin("vae", _mlp_key_map("mean", "logvar"), _mlp_vae_torch_module),
        TorchTwin("iwae", _mlp_key_map("mean", "logvar"), _mlp_vae_torch_module),
        TorchTwin("vanilla", _conv_key_map("code"), _conv_torch_module("ConvAutoencoder"), arch="conv"),
        TorchTwin("denoising", _conv_key_map("code"), _conv_torch_module("ConvAutoencoder"), arch="conv"),
        TorchTwin("vae", _conv_key_map("mean", "logvar"), _conv_torch_module("ConvVAE"), arch="conv"),
        TorchTwin("iwae", _conv_key_map("mean", "logvar"), _conv_torch_module("ConvVAE"), arch="conv"),
        TorchTwin("vqvae", _vq_key_map("mlp"), _vq_torch_module),
        TorchTwin("vqvae", _vq_key_map("conv"), _vq_torch_module, arch="conv"),
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


def check_image_shape(image_shape: Any, what: str = "image_shape") -> tuple[int, int, int]:
    """``image_shape`` as a tuple ``(H, W, C)`` of positive ints, or a one-line :class:`JaxaeError`."""
    try:
        shape = tuple(int(v) for v in image_shape)
        whole = all(int(v) == v for v in image_shape)
    except (TypeError, ValueError):
        shape, whole = (), False
    if len(shape) != 3 or not whole or min(shape) < 1:
        raise JaxaeError(
            f"{what} must be (H, W, C), three positive whole numbers, e.g. (28, 28, 1); got {image_shape!r}"
        )
    # The rules every dataset's images pass (1 or 3 channels, sides from 8), with the same advice
    # (a channels-first (3, 32, 32) is told to transpose): a shape no dataset can have is a mistake.
    data.check_image_shape(shape, f"{what} {data.shape_text(shape)}")
    return shape  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True)
class ImageInput:
    """What a model's tensors say about the images it takes.

    Attributes:
        arch: ``"mlp"`` or ``"conv"``.
        size: an MLP's input size (``H * W * C``); a conv model's feature count, the size of
            ``project``'s output (``(H / 2^S) * (W / 2^S) * feature_channels``).
        channels: a conv model's image channels (its first convolution's inputs).
        feature_channels: a conv model's feature channels (its last convolution's outputs).
        stages: a conv model's stride-2 convolutions (S).
        per_position: a conv model that codes each feature-map position on its own (the
            VQ-VAE's): its tensors fit images of any size whose sides 2^S divides.
    """

    arch: str
    size: int
    channels: int = 0
    feature_channels: int = 0
    stages: int = 2
    per_position: bool = False

    @property
    def factor(self) -> int:
        """How many times smaller a conv model's feature map is than its image, per side."""
        return 2**self.stages

    @classmethod
    def of_params(cls, params: Any, arch: str) -> ImageInput:
        """Read off Flax pure-dict params (raises ``KeyError``/``IndexError``/``TypeError`` for others)."""
        layers = params["encoder"]["layers"]
        first = layers[min(layers)]["kernel"].shape
        if arch == "conv":
            last = int(layers[max(layers)]["kernel"].shape[-1])
            size = int(params["project"]["kernel"].shape[-1])
            per_position = "quantizer" in params and size == last
            return cls("conv", size, int(first[2]), last, len(layers), per_position)
        return cls("mlp", int(first[0]))

    def fits(self, image_shape: tuple[int, int, int]) -> bool:
        """Whether a model with these tensors takes ``(H, W, C)`` images."""
        h, w, c = image_shape
        if self.arch == "conv":
            f = self.factor
            return (
                h % f == 0
                and w % f == 0
                and c == self.channels
                and (self.per_position or (h // f) * (w // f) * self.feature_channels == self.size)
            )
        return h * w * c == self.size

    def guess(self) -> tuple[int, int, int] | None:
        """The image shape taken without being told: only the tutorial's 28x28x1 (an MLP of 784
        inputs, a one-channel conv model of 7x7 feature positions); else None.

        Any other reading would be a guess the tensors cannot confirm: 576 inputs are 24x24x1 or
        16x12x3, a conv model's 64 feature positions come from 32x32 or 16x64 images, and a wrong
        guess converts without error into a model that computes something else.
        """
        if self.fits(TUTORIAL_IMAGE_SHAPE):
            return TUTORIAL_IMAGE_SHAPE
        return None

    def likely(self) -> tuple[int, int, int] | None:
        """A plausible shape for messages only (``3072`` -> ``32x32x3``): square, grayscale or RGB."""
        if self.arch == "conv" and self.per_position:
            return None
        if self.arch == "conv":
            positions, rest = divmod(self.size, self.feature_channels or 1)
            side = math.isqrt(positions)
            return (
                (self.factor * side, self.factor * side, self.channels)
                if not rest and side and side * side == positions
                else None
            )
        for channels in (1, 3):
            side = math.isqrt(self.size // channels)
            if self.size % channels == 0 and side and channels * side * side == self.size:
                return (side, side, channels)
        return None

    def describe(self) -> str:
        """``"3072 inputs (32x32x3?)"``: what the model takes, for messages."""
        likely = self.likely()
        hint = f" ({data.shape_text(likely)}?)" if likely else ""
        if self.arch == "conv" and self.per_position:
            return f"{self.channels}-channel images with sides divisible by {self.factor}"
        if self.arch == "conv":
            positions = self.size / (self.feature_channels or 1)
            positions_text = str(int(positions)) if positions == int(positions) else f"{positions:g}"
            f = self.factor
            return f"{self.channels}-channel images of (H/{f})*(W/{f}) = {positions_text}{hint}"
        return f"{self.size} inputs{hint}"


def resolve_image_shape(
    image_input: ImageInput,
    image_shape: Any,
    source: str,
    *,
    given_as: str = "the image shape given is",
    fix: str = "give the image shape the model was trained on",
    ask: str = "give the image shape (H, W, C)",
) -> tuple[int, int, int]:
    """The image shape of a model whose tensors say ``image_input``: ``image_shape`` checked against
    them, or with ``None`` the one they determine.

    Args:
        image_input: what the tensors say.
        image_shape: ``(H, W, C)``, or None.
        source: the model, for messages (``"model.pt"``).
        given_as: how messages name a given shape (``"the mnist-sample images are"``).
        fix: what a mismatch message tells the user to do.
        ask: what to do when the tensors leave several shapes possible and none is given.

    Raises:
        JaxaeError: no shape given and the tensors allow several; a given shape the tensors rule out.
    """
    if image_shape is None:
        guess = image_input.guess()
        if guess is None:
            likely = image_input.likely()
            example = ",".join(map(str, likely)) if likely else "32,32,3"
            raise JaxaeError(f"{source} takes {image_input.describe()}; {ask} (e.g. {example})")
        return guess
    shape = check_image_shape(image_shape)
    if not image_input.fits(shape):
        raise JaxaeError(f"{source} takes {image_input.describe()} but {given_as} {data.shape_text(shape)}; {fix}")
    return shape


def links_for(twin: TorchTwin, params: Any, image_shape: Any = None) -> tuple[ParamLink, ...]:
    """The twin's key map for ``params``, checked to cover every Flax leaf exactly once.

    Args:
        twin: the variant's twin.
        params: Flax pure-dict params of the twin's model.
        image_shape: the images the model takes, ``(H, W, C)`` (a model's ``image_shape``);
            None takes the tutorial's 28x28x1 where the parameters fit it (see
            :meth:`ImageInput.guess`), and asks for the shape otherwise.

    Raises:
        JaxaeError: ``params`` are not of the twin's model (e.g. a VAE's given as a vanilla
            model's), ``image_shape`` does not fit them, or is needed and not given.
    """
    leaves = set(_leaf_paths(params))
    try:
        image_input = ImageInput.of_params(params, twin.arch)
    except (KeyError, TypeError, IndexError, AttributeError):
        image_input = None
    links = None
    if image_input is not None:
        shape = resolve_image_shape(
            image_input,
            image_shape,
            f"the {twin.name} model",
            given_as="image_shape is",
            fix="give the image shape the model was built for",
            ask="give its image_shape",
        )
        try:
            links = twin.key_map(params, shape)
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


def model_description(config: Any, image_shape: Any = (28, 28, 1)) -> str:
    """``"the vanilla model (28x28x1 images, 784-128-64-32)"``: the target model, for messages."""
    h, w, c = image_shape
    if getattr(config, "arch", "mlp") == "conv":
        channels = "-".join(map(str, getattr(config, "conv_channels", CONV_CHANNELS)))
        return f"the {config.variant} conv model ({h}x{w}x{c} images, {channels} channels, code {config.latent_dim})"
    sizes = "-".join(str(d) for d in (h * w * c, *config.hidden_dims, config.latent_dim))
    return f"the {config.variant} model ({h}x{w}x{c} images, {sizes})"


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
        what: the target model, for messages (e.g. "the vanilla model (28x28x1 images, 784-128-64-32)").
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
        image_input: what the tensors say about the images (:meth:`ImageInput.guess` gives the
            image shape where they determine it).
        latent_dim: the code size.
        hidden_dims: the encoder's hidden widths (MLPs; None for conv).
        conv_channels: the encoder's convolutions' output channels (conv; None for MLPs).
    """

    family: str
    arch: str
    image_input: ImageInput
    latent_dim: int
    hidden_dims: tuple[int, ...] | None
    conv_channels: tuple[int, ...] | None = None

    @property
    def input_dim(self) -> int | None:
        """The flattened image size, where the tensors determine it (an MLP's input; a conv model's
        for the tutorial's 28x28x1 images); else None."""
        if self.arch == "mlp":
            return self.image_input.size
        guess = self.image_input.guess()
        return None if guess is None else math.prod(guess)


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
            encoder = _sequential_shapes(shapes, "encoder")
            image_input = ImageInput("conv", shapes["project.weight"][0], encoder[0][1], encoder[-1][0], len(encoder))
            return InferredModel(family, "conv", image_input, head[0], None, tuple(s[0] for s in encoder))
        encoder = _sequential_shapes(shapes, "encoder")
        image_input = ImageInput("mlp", encoder[0][1])
        if family == "vae":
            found = InferredModel(family, "mlp", image_input, shapes["mean.weight"][0], tuple(s[0] for s in encoder))
        else:
            outs = tuple(s[0] for s in encoder)
            found = InferredModel(family, "mlp", image_input, outs[-1], outs[:-1])
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
