"""``torch.optim.Adam`` / ``AdamW`` state <-> the optax state of :func:`jaxae.train.make_optimizer`.

PyTorch keeps Adam's state per parameter index, in the order ``model.parameters()`` gives
(the order of a bias-free ``state_dict``): ``exp_avg`` and ``exp_avg_sq`` (optax's ``mu``
and ``nu``, transposed as the weights are) and ``step`` (a float tensor; optax's ``count``).
Both frameworks increment the step before the bias correction and add ``eps`` outside the
square root (optax's ``eps``, not ``eps_root``), so a migrated state takes the next step PyTorch
would. The settings come from ``param_groups``: ``lr``, ``betas``, ``eps``, ``weight_decay``,
and ``decoupled_weight_decay``, which tells AdamW (decay ``lr * wd * param`` apart from the
moments: ``optax.adamw``) from Adam (an L2 term ``wd * param`` added to the gradient before
the moments: ``add_decayed_weights`` before ``optax.adam``).

Not supported, and refused with one line naming it: ``amsgrad``, ``maximize``, parameter
groups with different settings, and other optimizers. A learning-rate schedule (a scheduler's
state, or the ``initial_lr`` every scheduler leaves in ``param_groups``) is refused too, unless
the conversion is told to continue at the learning rate the run had reached, as a constant
(:func:`lr_schedule_evidence`, ``jaxae convert --constant-lr``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxae import torch_reference
from jaxae.convert.files import check_finite
from jaxae.convert.layouts import ParamLink, _leaf_paths
from jaxae.errors import JaxaeError

_WEIGHTS_ONLY = "pass --no-optimizer to convert the weights alone (with a fresh optimizer)"
# Keys that mark other torch.optim optimizers' param_groups (Adam's and AdamW's have none of
# them), each with the optimizers whose groups hold it: a group is the optimizers all its keys share.
_OTHER_OPTIMIZERS = {
    "momentum": {"SGD", "RMSprop"},
    "nesterov": {"SGD"},
    "dampening": {"SGD"},
    "alpha": {"RMSprop"},
    "centered": {"RMSprop"},
    "lr_decay": {"Adagrad"},
    "rho": {"Adadelta"},
    "momentum_decay": {"NAdam"},
    "lambd": {"ASGD"},
    "etas": {"Rprop"},
    "history_size": {"LBFGS"},
}
_SETTINGS = ("lr", "betas", "eps", "weight_decay", "decoupled_weight_decay")


def _number(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def optimizer_settings(optimizer_state: Mapping[str, Any], where: str, optimizer: str | None = None) -> dict[str, Any]:
    """The :class:`~jaxae.train.TrainConfig` optimizer fields of a torch Adam/AdamW ``state_dict()``.

    Args:
        optimizer_state: ``optimizer.state_dict()`` as saved.
        where: the file, for messages.
        optimizer: ``"adam"`` or ``"adamw"`` when the file cannot say (torch before
            ``decoupled_weight_decay`` was recorded, with a non-zero ``weight_decay``).

    Returns:
        ``{"optimizer", "lr", "betas", "eps", "weight_decay"}``.

    Raises:
        JaxaeError: not Adam's or AdamW's state, or a setting jaxae does not support.
    """
    groups = optimizer_state.get("param_groups") if isinstance(optimizer_state, Mapping) else None
    if not isinstance(groups, (list, tuple)) or not groups or not isinstance(optimizer_state.get("state"), Mapping):
        raise JaxaeError(
            f"{where}: the optimizer entry is not an optimizer.state_dict() (state, param_groups); {_WEIGHTS_ONLY}"
        )
    for group in groups:
        marks = [_OTHER_OPTIMIZERS[k] for k in group if k in _OTHER_OPTIMIZERS]
        other = sorted(set.intersection(*marks) or set.union(*marks)) if marks else []
        if other or "betas" not in group or "amsgrad" not in group:
            what = f"{' or '.join(other)}'s" if other else f"not Adam's (param_groups keys: {', '.join(sorted(group))})"
            raise JaxaeError(
                f"{where}: the optimizer state is {what}; converting supports torch.optim.Adam and AdamW; {_WEIGHTS_ONLY}"
            )
        for flag in ("amsgrad", "maximize"):
            if group.get(flag):
                raise JaxaeError(
                    f"{where}: the optimizer uses {flag}=True, which jaxae does not support; {_WEIGHTS_ONLY}"
                )
    first = groups[0]
    for i, group in enumerate(groups[1:], 1):
        differ = [k for k in _SETTINGS if _number(group.get(k)) != _number(first.get(k))]
        if differ:
            raise JaxaeError(
                f"{where}: parameter group {i} has its own {', '.join(differ)}; jaxae trains every parameter "
                f"with one setting; {_WEIGHTS_ONLY}"
            )
    weight_decay = float(_number(first.get("weight_decay", 0)))
    decoupled = first.get("decoupled_weight_decay")
    if decoupled is None:  # torch releases that did not record it: Adam's and AdamW's groups look alike
        if weight_decay and optimizer is None:
            raise JaxaeError(
                f"{where}: the optimizer has weight_decay {weight_decay:g} but does not record whether it is Adam's "
                "(L2) or AdamW's (decoupled); give --optimizer adam or --optimizer adamw"
            )
        name = optimizer or "adam"
    else:
        name = "adamw" if decoupled else "adam"
        if optimizer is not None and optimizer != name and weight_decay:
            raise JaxaeError(f"--optimizer {optimizer} does not match {where}, whose optimizer is {name}")
    betas = tuple(float(_number(b)) for b in first["betas"])
    return {
        "optimizer": name,
        "lr": float(_number(first["lr"])),
        "betas": betas,
        "eps": float(_number(first["eps"])),
        "weight_decay": weight_decay,
    }


def lr_schedule_evidence(file: Any) -> str | None:
    """What in a :class:`~jaxae.convert.files.TorchFile` shows that its learning rate followed a
    schedule, or None: a scheduler's state, or ``initial_lr`` in the optimizer's param_groups
    (every ``torch.optim.lr_scheduler`` writes it there, so it shows even when the scheduler's
    own state was saved under a key nobody would guess, or not at all).
    """
    if file.scheduler:
        return f"a learning-rate scheduler's state ({file.scheduler!r})"
    groups = file.optimizer.get("param_groups") if isinstance(file.optimizer, Mapping) else None
    for group in groups if isinstance(groups, (list, tuple)) else ():
        if isinstance(group, Mapping) and "initial_lr" in group:
            initial, now = _number(group["initial_lr"]), _number(group.get("lr"))
            return f"an optimizer whose param_groups carry a scheduler's initial_lr ({initial:g}; lr is now {now:g})"
    return None


def _moment(value: Any, name: str, where: str) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        if not value.is_floating_point():
            raise JaxaeError(f"{where}: {name} holds {value.dtype} values, not floats")
        value = value.float().numpy()
    return np.array(value, dtype=np.float32, copy=True)


def opt_state_from_torch(
    optimizer_state: Mapping[str, Any],
    keys: Sequence[str],
    links: Sequence[ParamLink],
    tx: optax.GradientTransformation,
    params: Any,
    where: str,
    *,
    allow_nonfinite: bool = False,
) -> tuple[Any, int]:
    """The optax state of ``tx`` holding a torch Adam/AdamW state, and the step it had taken.

    Args:
        optimizer_state: ``optimizer.state_dict()`` as saved.
        keys: the model's state_dict keys (twin names) in file order: parameter ``i`` of the
            optimizer is ``keys[i]``.
        links: the key map to the Flax params.
        tx: the optax optimizer (from :func:`jaxae.train.make_optimizer`).
        params: the converted Flax params.
        where: the file, for messages.
        allow_nonfinite: accept moments holding NaN or Inf.

    Raises:
        JaxaeError: state that does not fit the model (another parameter count, a shape that
            differs; the parameter is named), steps that differ between parameters.
    """
    order = [int(_number(i)) for group in optimizer_state["param_groups"] for i in group["params"]]
    if len(order) != len(keys):
        raise JaxaeError(
            f"{where}: the optimizer holds {len(order)} parameters but the model has {len(keys)} "
            f"({', '.join(keys[:3])}, ...); the optimizer state is not this model's"
        )
    state = {int(_number(k)): v for k, v in optimizer_state["state"].items()}
    opt_state = tx.init(params)
    if not state:  # a torch optimizer that never stepped has no state yet: the same as a fresh one
        return opt_state, 0
    by_key = {link.torch_key: link for link in links}
    leaves = _leaf_paths(params)
    mu, nu = jax.tree.map(np.zeros_like, params), jax.tree.map(np.zeros_like, params)
    steps = set()
    moments: dict[str, np.ndarray] = {}
    for position, (index, key) in enumerate(zip(order, keys, strict=False)):
        entry = state.get(index)
        name = f"parameter {position} ({key})"
        if not isinstance(entry, Mapping) or not {"exp_avg", "exp_avg_sq", "step"} <= set(entry):
            raise JaxaeError(f"{where}: the optimizer has no Adam state (exp_avg, exp_avg_sq, step) for {name}")
        link = by_key[key]
        want = link.torch_shape(tuple(leaves[link.flax_path].shape))
        for moment, tree in (("exp_avg", mu), ("exp_avg_sq", nu)):
            array = _moment(entry[moment], f"{moment} of {name}", where)
            if array.shape != want:
                raise JaxaeError(
                    f"{where}: the optimizer's {moment} of {name} has shape {array.shape} but the parameter has "
                    f"{want}; the optimizer state is not this model's"
                )
            moments[f"{key}.{moment}"] = array
            *parents, last = link.flax_path
            node = tree
            for part in parents:
                node = node[part]
            node[last] = np.ascontiguousarray(link.torch_to_flax(array))
        steps.add(float(_number(entry["step"])))
    if not allow_nonfinite:
        check_finite(moments, f"{where} (optimizer state)")
    if len(steps) != 1:
        raise JaxaeError(f"{where}: the optimizer's parameters have taken different numbers of steps ({sorted(steps)})")
    step = steps.pop()
    if not (step >= 0 and math.isfinite(step) and step == int(step) and step < 2**31):
        raise JaxaeError(f"{where}: the optimizer's step {step} is not a whole number of steps")
    opt_state = optax.tree_utils.tree_set(
        opt_state,
        mu=jax.tree.map(jnp.asarray, mu),
        nu=jax.tree.map(jnp.asarray, nu),
        count=jnp.asarray(int(step), jnp.int32),
    )
    return opt_state, int(step)


def torch_optimizer_state_dict(opt_state: Any, links: Sequence[ParamLink], config: Any) -> dict[str, Any]:
    """``optimizer.state_dict()`` of the torch Adam/AdamW that ``config`` describes, holding ``opt_state``.

    ``torch.optim.Adam(model.parameters())`` (``AdamW`` for ``config.optimizer == "adamw"``)
    accepts it with ``load_state_dict``; parameter ``i`` is ``links[i]``, the twin's
    ``state_dict`` order.
    """
    torch = torch_reference.require_torch()
    count = int(jax.device_get(optax.tree_utils.tree_get(opt_state, "count")))
    mu = _leaf_paths(optax.tree_utils.tree_get(opt_state, "mu"))
    nu = _leaf_paths(optax.tree_utils.tree_get(opt_state, "nu"))
    cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    stand_ins = [torch.nn.Parameter(torch.zeros(1)) for _ in links]
    # the param_groups entry as this torch writes it (every key its load_state_dict expects)
    group = cls(
        stand_ins, lr=config.lr, betas=tuple(config.betas), eps=config.eps, weight_decay=config.weight_decay
    ).state_dict()["param_groups"][0]
    state = {}
    if count > 0:  # torch creates the state at the first step
        for i, link in enumerate(links):
            state[i] = {
                "step": torch.tensor(float(count)),
                "exp_avg": torch.from_numpy(_torch_moment(link, mu[link.flax_path])),
                "exp_avg_sq": torch.from_numpy(_torch_moment(link, nu[link.flax_path])),
            }
    return {"state": state, "param_groups": [group]}


def _torch_moment(link: ParamLink, leaf: Any) -> np.ndarray:
    return np.array(link.flax_to_torch(np.asarray(jax.device_get(leaf))), dtype=np.float32, order="C", copy=True)
