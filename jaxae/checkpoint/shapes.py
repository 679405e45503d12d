"""What a checkpoint's shapes say: the image shape a model was built for, whether a config
describes a state, and a template's optimizer state and image shape against the saved ones."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxae.checkpoint.integrity import _canonical_json, step_dir
from jaxae.data import shape_text
from jaxae.errors import JaxaeError
from jaxae.models import image_shape_of
from jaxae.train import TrainConfig, TrainState, build

# The checkpoint format from which ``input_shape`` is the image shape the model was built for.
IMAGE_SHAPE_FORMAT = 3

_CONFIG_PARAMS: dict[Any, dict[str, Any]] = {}  # (config, input shape) -> its parameters' shapes


def _reason(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    first = (lines[0] if lines else "").split(" See full TensorStore details")[0]
    return f"{type(e).__name__}: {first[:200]}"


class OptimizerStateError(JaxaeError):
    """A checkpoint holds the state of another optimizer than the one given."""


class ImageShapeError(JaxaeError):
    """A checkpoint's model is for images of another shape than those it was asked to take."""


def input_shape_of(state: TrainState) -> list[int]:
    """The image shape ``[H, W, C]`` the model was built for.

    ``state.image_shape`` when the state carries it (every state :func:`~jaxae.train.build`
    makes does); otherwise read off the parameters, which assumes square images: an MLP's first
    kernel is ``[H * W * C, hidden]`` (one channel assumed), a conv model's is ``[3, 3, C, c1]``
    and its ``project`` layer makes ``(H / 2^S) * (W / 2^S) * c_S`` features for the decoder (S
    stages, ``c_S`` the last convolution's channels).
    """
    if state.image_shape is not None:
        return [int(v) for v in state.image_shape]
    params = state.params
    kernel = params["encoder"]["layers"][0]["kernel"]
    if kernel.ndim == 2:
        return list(image_shape_of(int(kernel.shape[0])))
    layers = params["encoder"]["layers"]
    last = int(layers[max(layers)]["kernel"].shape[-1])
    side = 2 ** len(layers) * math.isqrt(int(params["project"]["kernel"].shape[-1]) // last)
    return [side, side, int(kernel.shape[2])]


def input_dim_of(state: TrainState) -> int:
    """The flattened input size."""
    return math.prod(input_shape_of(state))


def _params_shapes(params: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    return {
        jax.tree_util.keystr(path): (tuple(np.shape(leaf)), str(np.dtype(leaf.dtype)))
        for path, leaf in jax.tree_util.tree_leaves_with_path(params)
    }


def check_config_fits(state: TrainState, config: TrainConfig) -> None:
    """Raises :class:`JaxaeError` unless ``config`` builds a model with ``state``'s parameters.

    Only shapes are computed (``jax.eval_shape``): nothing is allocated or initialised.
    """
    try:
        input_shape = tuple(input_shape_of(state))
    except Exception as e:
        raise JaxaeError(f"cannot save: the state's parameters are not a jaxae model's ({_reason(e)})") from e
    key = (_canonical_json(config.to_dict()), input_shape)
    want = _CONFIG_PARAMS.get(key)
    if want is None:
        try:
            want = _params_shapes(jax.eval_shape(lambda: build(config, input_shape)[1].params))
        except JaxaeError as e:
            raise JaxaeError(f"cannot save: the config does not describe the state ({e})") from e
        except Exception as e:
            raise JaxaeError(
                f"cannot save: the config's model cannot take the state's input shape {list(input_shape)} "
                f"({_reason(e)}); pass the config the state was built from"
            ) from e
        _CONFIG_PARAMS[key] = want
    have = _params_shapes(state.params)
    for name in sorted(set(want) | set(have)):
        if want.get(name) != have.get(name):
            config_says = "absent" if name not in want else "shape {} {}".format(*want[name])
            state_has = "absent" if name not in have else "shape {} {}".format(*have[name])
            raise JaxaeError(
                f"cannot save: the config does not describe the state: parameter {name} is {state_has} in the "
                f"state but {config_says} in the config's model ({config.variant}, {config.arch}, hidden_dims "
                f"{list(config.hidden_dims)}, latent_dim {config.latent_dim}); pass the config the state was "
                "built from"
            )


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey / FlattenedIndexKey
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _is_empty_node(x: Any) -> bool:
    # Orbax saves an empty node (optax's EmptyState, an empty tuple or dict) as None.
    return x is None or (isinstance(x, (tuple, list, dict)) and len(x) == 0)


def _shapes_by_path(tree: Any) -> dict[str, tuple[int, ...] | None]:
    """``{"opt_state/0/mu/encoder/...": shape}`` (None for an empty node): the same names for a
    live tree and Orbax's saved one."""
    return {
        "/".join(_key_name(k) for k in path): None if _is_empty_node(leaf) else tuple(leaf.shape)
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree, is_leaf=_is_empty_node)
    }


def _describe(shapes: dict[str, Any], name: str) -> str:
    if name not in shapes:
        return "absent"
    return "an empty node" if shapes[name] is None else f"shape {shapes[name]}"


def _check_optimizer(workdir: str | Path, step: int, template: TrainState) -> None:
    """Raises :class:`JaxaeError` if the checkpoint's optimizer state is another optimizer's."""
    with warnings.catch_warnings():
        # On damaged metadata Orbax abandons a coroutine, which warns when the error is dropped.
        warnings.simplefilter("ignore", RuntimeWarning)
        try:
            saved = _shapes_by_path(ocp.StandardCheckpointHandler().metadata(step_dir(workdir, step) / "state").tree)
        except Exception:
            saved = None
    if saved is None:
        return  # unreadable metadata: reported as damage
    saved_opt = {k: v for k, v in saved.items() if k.startswith("opt_state/")}
    given_opt = {f"opt_state/{k}": v for k, v in _shapes_by_path(template.opt_state).items()}
    params_match = {k: v for k, v in saved.items() if k.startswith("params/")} == {
        f"params/{k}": v for k, v in _shapes_by_path(template.params).items()
    }
    if params_match and saved_opt != given_opt:
        differ = sorted(set(saved_opt) ^ set(given_opt)) or sorted(k for k in saved_opt if saved_opt[k] != given_opt[k])
        raise OptimizerStateError(
            f"checkpoint {step_dir(workdir, step)} holds the state of another optimizer than the one given "
            f"(first difference: {differ[0]} is {_describe(saved_opt, differ[0])} in the checkpoint but "
            f"{_describe(given_opt, differ[0])} in the given optimizer's state); "
            "pass the optimizer the run was trained with, e.g. restore(workdir, tx=optax.sgd(0.1, momentum=0.9))"
        )


def _same_param_shapes(config: TrainConfig, a: Any, b: Any) -> bool:
    def shapes(image_shape):
        return _params_shapes(jax.eval_shape(lambda: build(config, image_shape)[1].params))

    try:
        return shapes(a) == shapes(b)
    except JaxaeError:  # e.g. a conv model for sides not divisible by 4
        return False


def saved_image_shape(meta: dict[str, Any]) -> tuple[int, ...] | None:
    """The image shape ``(H, W, C)`` a checkpoint's model was built for, or None where the
    checkpoint does not know it (written before format 3, it recorded a guess)."""
    shape = meta.get("input_shape")
    if not isinstance(meta.get("format"), int) or meta["format"] < IMAGE_SHAPE_FORMAT or not shape:
        return None
    return tuple(int(v) for v in shape) if len(shape) == 3 else None


def _check_image_shape(workdir: str | Path, step: int, meta: dict[str, Any], template: TrainState) -> None:
    """Refuses a template built for other images than the checkpoint's model.

    The parameters alone cannot tell: an MLP for 32x32x3 images has the shapes of one for
    48x64x1 images (3072 inputs each), and would restore and run, reading every pixel wrongly.
    """
    saved = saved_image_shape(meta)
    if saved is None or template.image_shape is None or len(template.image_shape) != 3:
        return
    if saved != tuple(int(v) for v in template.image_shape):
        raise ImageShapeError(
            f"checkpoint {step_dir(workdir, step)} holds a model for {shape_text(saved)} images, not "
            f"{shape_text(template.image_shape)}: use it with images of its dataset's shape"
        )
