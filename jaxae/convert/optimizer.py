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
from jaxae.convert.files import _listed, check_finite
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
    """The :class:`~jaxae.config.TrainConfig` optimizer fields of a torch Adam/AdamW ``state_dict()``.

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


def schedule_from_torch(file: Any, source: str) -> dict[str, Any] | None:
    """The ``TrainConfig`` settings of a torch scheduler jaxae continues exactly, or None.

    ``torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max)`` stepped after every
    optimizer step, to ``eta_min=0``, is ``--lr-schedule cosine --schedule-steps T_max`` at the
    peak ``--lr``; the run continues at Adam's step count, which is the scheduler's position.

    Returns:
        ``{"lr", "lr_schedule", "schedule_steps"}``, or None for a file whose scheduler is
        another one (or whose state was not saved).

    Raises:
        JaxaeError: a ``CosineAnnealingLR`` that jaxae's cosine does not match, in one line
            saying why (stepped once per epoch, ``eta_min`` not 0, past ``T_max``).
    """
    state = file.scheduler_state
    if not isinstance(state, Mapping) or not {"T_max", "eta_min", "base_lrs", "last_epoch"} <= set(state):
        return None
    if "T_0" in state or "_schedulers" in state:  # warm restarts, or a chain of schedulers
        return None
    t_max, eta_min, position = int(_number(state["T_max"])), float(_number(state["eta_min"])), state["last_epoch"]
    base = {float(_number(v)) for v in state["base_lrs"]}
    what = f"{source} holds a CosineAnnealingLR (T_max {t_max}, at step {position})"
    if eta_min != 0.0:
        raise JaxaeError(f"{what} that decays to eta_min {eta_min:g}; jaxae's cosine decays to 0: pass --constant-lr")
    if len(base) != 1:
        raise JaxaeError(f"{what} over parameter groups of different learning rates; jaxae has one")
    steps = {
        float(_number(entry["step"]))
        for entry in (file.optimizer or {}).get("state", {}).values()
        if isinstance(entry, Mapping) and "step" in entry
    }
    if steps and steps != {float(position)}:
        raise JaxaeError(
            f"{what} stepped once per epoch, not after every optimizer step (Adam's step is {int(max(steps))}): "
            "jaxae's cosine changes the lr every step; pass --constant-lr to continue at the lr it reached"
        )
    if position > t_max:
        raise JaxaeError(
            f"{what}, past T_max, where torch's cosine rises again and jaxae's stays at 0: pass --constant-lr"
        )
    return {"lr": base.pop(), "lr_schedule": "cosine", "schedule_steps": t_max}


def optimizer_parameter_groups(
    optimizer_state: Mapping[str, Any],
    state_dict: Mapping[str, np.ndarray],
    where: str,
    *,
    names: Mapping[str, str] | None = None,
) -> tuple[list[list[str]], str | None]:
    """Which model parameter each of a torch optimizer's parameters is: its groups, as state_dict keys.

    A torch optimizer keeps its state by position, in the order its parameters were given. For
    ``Adam(model.parameters())`` that is the ``state_dict`` order (one group); for parameter
    groups it is each group's parameters in turn, e.g. ``[{"params": model.decoder.parameters()},
    {"params": model.encoder.parameters()}]``. The order is read from the ``param_names`` an
    optimizer built from ``model.named_parameters()`` saves; otherwise each group is taken to be a
    contiguous run of the ``state_dict`` (one module's parameters), placed by the shapes of its
    moments, and refused where the shapes fit more than one placement.

    Args:
        optimizer_state: ``optimizer.state_dict()`` as saved.
        state_dict: the model's tensors under the twin's keys, in file order.
        where: the file, for messages.
        names: the file's own parameter names -> the twin's keys (for ``param_names``).

    Returns:
        Each group's parameters as state_dict keys, in optimizer order, and a note saying how
        they were placed where that is not the state_dict order (else None).

    Raises:
        JaxaeError: names that are not the model's, or groups whose shapes fit several placements.
    """
    keys = list(state_dict)
    groups = [list(g.get("params", ())) for g in optimizer_state["param_groups"]]
    sizes = [len(g) for g in groups]
    if sum(sizes) != len(keys):
        return [keys], None  # opt_state_from_torch names the mismatch
    in_file_order = _split(keys, sizes)
    saved_names = [g.get("param_names") for g in optimizer_state["param_groups"]]
    if names is not None and all(
        isinstance(n, (list, tuple)) and len(n) == k for n, k in zip(saved_names, sizes, strict=True)
    ):
        unknown = [n for group in saved_names for n in group if n not in names]
        placed = [[names.get(n) for n in group] for group in saved_names]
        if unknown or sorted(k for g in placed for k in g) != sorted(keys):
            raise JaxaeError(
                f"{where}: the optimizer's param_names ({_listed([str(n) for n in unknown or [n for g in saved_names for n in g]], limit=3)}) are "
                f"not the model's parameters, each once; the optimizer state is not this model's; {_WEIGHTS_ONLY}"
            )
        return placed, "the optimizer's parameters placed by the param_names it saved"
    state = {int(_number(k)): v for k, v in optimizer_state["state"].items()}
    if len(groups) == 1 or not state:
        return in_file_order, None
    shapes = [[_moment_shape(state.get(int(_number(i)))) for i in g] for g in groups]
    key_shapes = [tuple(np.shape(state_dict[k])) for k in keys]
    placements = _contiguous_placements(shapes, key_shapes, limit=2)
    if len(placements) == 1:
        placed = [[keys[j] for j in block] for block in placements[0]]
        if placed == in_file_order:
            return placed, None
        runs = "; ".join(f"group {i}: {g[0]} to {g[-1]}" for i, g in enumerate(placed))
        return placed, f"the optimizer's {len(groups)} parameter groups placed by their shapes ({runs})"
    if placements:
        raise JaxaeError(
            f"{where}: the optimizer's {len(groups)} parameter groups fit the model's parameters in more than one "
            "order (their shapes repeat), so its state cannot be placed; save an optimizer built from "
            f"model.named_parameters(), whose state_dict names its parameters, or {_WEIGHTS_ONLY}"
        )
    return in_file_order, None  # no placement fits: opt_state_from_torch names the first shape that differs


def _split(keys: list[str], sizes: list[int]) -> list[list[str]]:
    out, start = [], 0
    for size in sizes:
        out.append(keys[start : start + size])
        start += size
    return out


def _moment_shape(entry: Any) -> tuple[int, ...] | None:
    value = entry.get("exp_avg") if isinstance(entry, Mapping) else None
    return None if value is None else tuple(np.shape(value))


def _contiguous_placements(
    shapes: list[list[Any]], key_shapes: list[tuple[int, ...]], limit: int
) -> list[list[list[int]]]:
    """Up to ``limit`` ways to place each group on its own run of state_dict positions (shapes equal)."""
    found: list[list[list[int]]] = []
    taken = [False] * len(key_shapes)

    def place(g: int, chosen: list[list[int]]) -> None:
        if len(found) >= limit:
            return
        if g == len(shapes):
            found.append([list(b) for b in chosen])
            return
        size = len(shapes[g])
        for start in range(len(key_shapes) - size + 1):
            block = range(start, start + size)
            if any(taken[j] for j in block) or [key_shapes[j] for j in block] != shapes[g]:
                continue
            for j in block:
                taken[j] = True
            place(g + 1, [*chosen, list(block)])
            for j in block:
                taken[j] = False

    place(0, [])
    return found


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


def torch_optimizer_state_dict(
    opt_state: Any,
    links: Sequence[ParamLink],
    config: Any,
    groups: Sequence[Sequence[str]] | None = None,
    *,
    named: bool = False,
) -> dict[str, Any]:
    """``optimizer.state_dict()`` of the torch Adam/AdamW that ``config`` describes, holding ``opt_state``.

    ``torch.optim.Adam(model.parameters())`` (``AdamW`` for ``config.optimizer == "adamw"``)
    accepts it with ``load_state_dict``; parameter ``i`` is ``links[i]``, the twin's
    ``state_dict`` order. ``groups`` (state_dict keys per parameter group, e.g. a converted
    file's, :func:`optimizer_parameter_groups`) writes the state for an optimizer whose
    parameters were given in that order and those groups instead; ``named`` writes each
    group's ``param_names``, as an optimizer built from ``model.named_parameters()`` does.
    """
    torch = torch_reference.require_torch()
    count = int(jax.device_get(optax.tree_utils.tree_get(opt_state, "count")))
    mu = _leaf_paths(optax.tree_utils.tree_get(opt_state, "mu"))
    nu = _leaf_paths(optax.tree_utils.tree_get(opt_state, "nu"))
    cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    by_key = {link.torch_key: link for link in links}
    if groups is None:
        groups = [[link.torch_key for link in links]]
    if sorted(k for g in groups for k in g) != sorted(by_key):
        raise JaxaeError(
            "the optimizer's parameter groups do not list the model's parameters, each once; "
            f"they list {_listed([k for g in groups for k in g], limit=3)}"
        )
    stand_ins = [torch.nn.Parameter(torch.zeros(1)) for _ in by_key]
    # the param_groups entry as this torch writes it (every key its load_state_dict expects)
    template = cls(
        stand_ins, lr=config.lr, betas=tuple(config.betas), eps=config.eps, weight_decay=config.weight_decay
    ).state_dict()["param_groups"][0]
    param_groups, state, index = [], {}, 0
    for keys in groups:
        ids = list(range(index, index + len(keys)))
        param_groups.append({**template, "params": ids, **({"param_names": list(keys)} if named else {})})
        if count > 0:  # torch creates the state at the first step
            for i, key in zip(ids, keys, strict=True):
                link = by_key[key]
                state[i] = {
                    "step": torch.tensor(float(count)),
                    "exp_avg": torch.from_numpy(_torch_moment(link, mu[link.flax_path])),
                    "exp_avg_sq": torch.from_numpy(_torch_moment(link, nu[link.flax_path])),
                }
        index += len(keys)
    return {"state": state, "param_groups": param_groups}


def _torch_moment(link: ParamLink, leaf: Any) -> np.ndarray:
    return np.array(link.flax_to_torch(np.asarray(jax.device_get(leaf))), dtype=np.float32, order="C", copy=True)
