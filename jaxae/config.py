"""Every setting of a run, declared once: :class:`TrainConfig`.

Each field of :class:`TrainConfig` is declared with :func:`setting`, which carries its default,
its help text, its bounds or choices, and two rules: whether ``jaxae sweep`` may give it a list
of values (one per model), and whether a resumed run may change it. Everything else is derived
from those declarations, so adding a setting is one declaration here:

- the flags of ``jaxae train`` and ``jaxae sweep`` (:func:`add_setting_flags`), their help and
  the parsing of their values;
- validation (:meth:`TrainConfig.validate`): the type, the bounds and the choices of every
  field, with one line naming its flag;
- the sweep's lists (:data:`SWEEPABLE`, :data:`SHAPE_SETTINGS`);
- the resume rules (:data:`RESUME_MAY_CHANGE`): settings that only shape what comes next
  (epochs, the learning rate and its schedule, evaluation) may change on ``--resume``; those
  that define the model or the data may not.

Why a small layer over dataclass field metadata rather than a parsing library (simple-parsing,
tyro): the flags keep their spelling and their value syntax (``--hidden-dims 128,64``,
``--betas 0.9,0.999``), the same declaration also gives a sweep's comma lists and the resume
rules, which neither library has, every error stays the one-line ``jaxae: error:`` message, and
the CLI needs to know which flags were given (not merely their values) to resume a run.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from jaxae.data import NORMALIZATIONS, get_normalization
from jaxae.errors import JaxaeError
from jaxae.objectives import VARIANTS, get_variant

# jax.random.key keeps 32 bits of a seed (64-bit mode off): a larger or negative seed would
# silently give the key of another seed (2**32 -> 0, -1 -> 2**32-1), and past 64 bits it overflows.
MAX_SEED = 2**32 - 1

OPTIMIZERS = ("adam", "adamw")
#: ``--dtype``: the models' compute dtype (parameters, optimizer state and losses stay float32).
DTYPES = ("float32", "bfloat16")
#: ``--matmul-precision``: ``jax.default_matmul_precision`` for the run's matrix products and
#: convolutions on float32 values.
MATMUL_PRECISIONS = ("default", "high", "highest")
LR_SCHEDULES = ("constant", "cosine", "warmup_cosine")


def check_seed(seed: Any) -> int:
    """``seed`` if it is an integer in ``0..MAX_SEED`` (each such seed gives its own key).

    Raises:
        JaxaeError: any other value.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed <= MAX_SEED:
        raise JaxaeError(f"--seed must be an integer from 0 to {MAX_SEED} (2**32 - 1), got {seed!r}")
    return int(seed)


@dataclasses.dataclass(frozen=True)
class Bound:
    """A rule a number must follow, and how the error message says it (``"positive"``, ``"in [0, 1)"``)."""

    holds: Callable[[Any], bool]
    text: str


POSITIVE = Bound(lambda v: v > 0, "positive")
NON_NEGATIVE = Bound(lambda v: v >= 0, ">= 0")
UNIT_INTERVAL_OPEN = Bound(lambda v: 0 < v < 1, "in (0, 1)")
UNIT_INTERVAL_RIGHT_OPEN = Bound(lambda v: 0 <= v < 1, "in [0, 1)")


@dataclasses.dataclass(frozen=True)
class Setting:
    """The declaration of one :class:`TrainConfig` field (its ``metadata["setting"]``)."""

    help: str
    #: the help section of its flag ("model", "denoising", ...)
    group: str = "training"
    bound: Bound | None = None
    #: the values it may take; a callable is asked when validating (a registry that may grow)
    choices: tuple[str, ...] | Callable[[], Sequence[str]] | None = None
    #: CLI text -> value, where the type alone does not say it (comma lists)
    parse: Callable[[str], Any] | None = None
    #: a check of the whole value beyond its type (seed, tuples); raises JaxaeError
    check: Callable[[Any], Any] | None = None
    #: ``jaxae sweep`` may give a comma list: one value per model inside one compiled program
    sweep: bool = False
    #: it sets the parameter shapes: one value per sweep, refused as a list with the reason
    shape: bool = False
    #: it defines the model: ``--init-from`` takes it from the checkpoint when not given
    model: bool = False
    #: a resumed run may change it (it shapes only what comes next); else it must stay the checkpoint's
    may_change_on_resume: bool = False
    #: the flag's name, when it is not ``--`` + the field's name with dashes
    flag: str | None = None
    #: the sweep's flag, when it is another (``--seeds``)
    sweep_flag: str | None = None
    metavar: str | None = None


def setting(default: Any, help: str, **declaration: Any) -> Any:
    """A :class:`TrainConfig` field: its default plus its :class:`Setting`."""
    return dataclasses.field(default=default, metadata={"setting": Setting(help, **declaration)})


def positive_ints(text: str) -> tuple[int, ...]:
    """``--hidden-dims`` value ``"128,64"`` -> ``(128, 64)``."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or any(v <= 0 for v in values):
        # argparse prefixes "argument --hidden-dims: ", so the message names the flag.
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers like 128,64, got {text!r}")
    return values


def _two_floats(text: str) -> tuple[float, float]:
    """``--betas`` value ``"0.9,0.999"`` -> ``(0.9, 0.999)``."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 2:
        raise argparse.ArgumentTypeError(f"expected two comma-separated numbers like 0.9,0.999, got {text!r}")
    return values


def _check_positive_ints(flag: str, example: str) -> Callable[[Any], None]:
    """The check of a tuple of widths (``--hidden-dims``, ``--conv-channels``): positive integers, at least one."""

    def check(value: Any) -> None:
        ok = isinstance(value, (tuple, list)) and value and all(_is_int(h) and h > 0 for h in value)
        if not ok:
            raise JaxaeError(f"{flag} must be positive integers like {example}, got {value}")

    return check


def _check_betas(value: Any) -> None:
    ok = isinstance(value, (tuple, list)) and len(value) == 2 and all(_is_number(b) and 0 <= b < 1 for b in value)
    if not ok:
        shown = ",".join(map(str, value)) if isinstance(value, (tuple, list)) else repr(value)
        raise JaxaeError(f"--betas must be two numbers in [0, 1), got {shown}")


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a run; written to ``config.json`` and into checkpoints.

    The defaults are the document's: 20 epochs, batch 256, Adam 1e-3, MSE, [0, 1] inputs. Each
    field is declared once (see :mod:`jaxae.config`): its flag, bounds and resume rule come
    from that declaration. A config is validated where it is made (and it is frozen, so it stays
    valid): a setting no run can use raises :class:`~jaxae.errors.JaxaeError` at once, in one
    line naming its flag. Change one with ``dataclasses.replace(config, lr=5e-4)``.
    """

    variant: str = setting(
        "vanilla",
        "the autoencoder: " + ", ".join(VARIANTS),
        group="model",
        choices=lambda: tuple(VARIANTS),
        shape=True,
        model=True,
    )
    # None only in a run converted from PyTorch with --image-shape alone: it is trained or
    # evaluated on the --dataset given then.
    dataset: str | None = setting(
        "mnist-sample",
        "'mnist-sample' (embedded), a folder of IDX files (MNIST format, or (N, H, W, C) for colour), or a "
        "TFDS name such as fashion_mnist or cifar10",
        group="data",
    )
    tfds_data_dir: str | None = setting(
        None, "TFDS data directory (TFDS datasets only)", group="data", may_change_on_resume=True
    )
    epochs: int = setting(
        20, "epochs in all, counting those done before a --resume", bound=POSITIVE, may_change_on_resume=True
    )
    batch_size: int = setting(256, "global batch size", bound=POSITIVE)
    lr: float = setting(
        1e-3,
        "learning rate (the peak of a schedule)",
        bound=Bound(lambda v: v > 0, "a positive number"),
        sweep=True,
        may_change_on_resume=True,
        group="optimizer",
    )
    seed: int = setting(
        0,
        "seeds the initialisation, the data order and the noise: 0 to 2**32-1",
        check=check_seed,
        sweep=True,
        sweep_flag="--seeds",
    )
    normalize: str = setting(
        "unit",
        "input scaling: unit = [0,1]; seed = the document's Normalize((0.5,),(0.5,)) to [-1,1]",
        choices=tuple(NORMALIZATIONS),
        group="data",
        model=True,  # the scaling the weights were trained on: --init-from keeps it
    )
    init: str = setting(
        "torch", "parameter init: torch.nn.Linear's defaults or Flax's", choices=("torch", "flax"), group="model"
    )
    hidden_dims: tuple[int, ...] = setting(
        (128, 64),
        "encoder hidden widths, comma-separated; the decoder mirrors them",
        parse=positive_ints,
        check=_check_positive_ints("--hidden-dims", "128,64"),
        group="model",
        shape=True,
        model=True,
    )
    latent_dim: int = setting(32, "code size", bound=POSITIVE, group="model", shape=True, model=True)
    eval_batch_size: int = setting(1000, "test images per evaluation chunk", bound=POSITIVE, may_change_on_resume=True)
    arch: str = setting(
        "mlp",
        "mlp = the document's MLP (784-128-64-32 on 28x28 images; inputs H*W*C for others); conv = a small "
        "conv net for sides divisible by 2^stages, 4 by default (vanilla, denoising, vae, iwae, vqvae)",
        group="model",
        choices=("mlp", "conv"),
        shape=True,
        model=True,
    )
    conv_channels: tuple[int, ...] = setting(
        (16, 32),
        "--arch conv: the channels after each stride-2 convolution, comma-separated, one stage each (image sides "
        "divisible by 2^stages); the decoder mirrors them",
        parse=positive_ints,
        check=_check_positive_ints("--conv-channels", "16,32,64"),
        group="model",
        shape=True,
        model=True,
    )
    noise_std: float = setting(
        0.5,
        "Gaussian noise std, in pixel units (fraction of the data range)",
        bound=NON_NEGATIVE,
        group="denoising",
        sweep=True,
    )
    mask_prob: float = setting(
        0.0, "masking-noise probability per pixel", bound=UNIT_INTERVAL_RIGHT_OPEN, group="denoising", sweep=True
    )
    sparsity: str = setting(
        "l1",
        "l1: mean |code| on a ReLU code; kl: Bernoulli KL of a sigmoid code to --sparsity-target",
        choices=("l1", "kl"),
        group="sparse",
        model=True,
    )
    sparsity_weight: float = setting(
        0.01, "weight of the sparsity term", bound=NON_NEGATIVE, group="sparse", sweep=True
    )
    sparsity_target: float = setting(
        0.05, "target mean activation (kl)", bound=UNIT_INTERVAL_OPEN, group="sparse", sweep=True
    )
    beta: float = setting(1.0, "weight of the KL term", bound=NON_NEGATIVE, group="vae", sweep=True)
    likelihood: str = setting(
        "bernoulli",
        "pixel likelihood: bernoulli (sigmoid cross-entropy) or gaussian (squared error)",
        choices=("bernoulli", "gaussian"),
        group="vae",
    )
    iwae_samples: int = setting(
        5,
        "importance samples per image of the iwae variant's training bound (K; 1 is a one-sample estimate of the "
        "VAE's negative ELBO)",
        bound=POSITIVE,
        group="iwae",
    )
    codebook_size: int = setting(
        512, "codes in the vqvae variant's codebook (K)", bound=POSITIVE, group="vqvae", shape=True, model=True
    )
    commitment_weight: float = setting(
        0.25, "weight of the vqvae commitment loss ||z_e - sg(z_q)||^2", bound=NON_NEGATIVE, group="vqvae", sweep=True
    )
    codebook_decay: float = setting(
        0.99,
        "decay of the exponential moving averages that train the vqvae codebook",
        bound=UNIT_INTERVAL_RIGHT_OPEN,
        group="vqvae",
        sweep=True,
    )
    # torch.optim.Adam's defaults; "adamw" is torch.optim.AdamW (decoupled weight decay)
    optimizer: str = setting("adam", "adam or adamw (torch.optim.AdamW)", choices=OPTIMIZERS, group="optimizer")
    betas: tuple[float, float] = setting(
        (0.9, 0.999), "Adam's beta1,beta2", parse=_two_floats, check=_check_betas, group="optimizer"
    )
    eps: float = setting(1e-8, "Adam's eps", bound=NON_NEGATIVE, group="optimizer")
    weight_decay: float = setting(
        0.0, "adam: L2 term added to the gradient; adamw: decoupled decay", bound=NON_NEGATIVE, group="optimizer"
    )
    lr_schedule: str = setting(
        "constant",
        "constant; cosine: from --lr down to 0 over the run's steps; warmup_cosine: from 0 up to --lr over "
        "--warmup-steps, then cosine down to 0",
        choices=LR_SCHEDULES,
        may_change_on_resume=True,
        group="optimizer",
    )
    warmup_steps: int = setting(
        0,
        "steps of linear warm-up (--lr-schedule warmup_cosine)",
        bound=NON_NEGATIVE,
        may_change_on_resume=True,
        group="optimizer",
    )
    schedule_steps: int = setting(
        0,
        "the optimizer steps a cosine schedule runs over, after which the lr stays 0 (a run converted from "
        "torch's CosineAnnealingLR keeps its T_max); 0: the run's, --epochs x steps per epoch",
        bound=NON_NEGATIVE,
        may_change_on_resume=True,
        group="optimizer",
    )
    clip_grad_norm: float = setting(
        0.0,
        "clip the gradient to this global norm before the optimizer (as torch.nn.utils.clip_grad_norm_); 0: off",
        bound=NON_NEGATIVE,
        may_change_on_resume=True,
        group="optimizer",
    )

    dtype: str = setting(
        "float32",
        "the models' compute dtype: float32, or bfloat16 (mixed precision: parameters, optimizer state and the "
        "loss stay float32)",
        choices=DTYPES,
        group="precision",
        may_change_on_resume=True,
    )
    matmul_precision: str = setting(
        "default",
        "float32 matrix products and convolutions: default = the backend's (full float32 on CPU, TF32 on recent "
        "NVIDIA GPUs, one bfloat16 pass on TPU); high = 3 bfloat16 passes on TPU, TF32 on GPU; highest = full "
        "float32 everywhere",
        choices=MATMUL_PRECISIONS,
        group="precision",
        may_change_on_resume=True,
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raises :class:`JaxaeError` (one line naming the flag) for settings no run can use."""
        for f in dataclasses.fields(self):
            _check_field(f, getattr(self, f.name))
        variant = get_variant(self.variant)
        get_normalization(self.normalize)
        if self.arch not in variant.archs:
            raise JaxaeError(
                f"--arch {self.arch} is not available for the {self.variant} variant ({', '.join(variant.archs)})"
            )
        if self.warmup_steps and self.lr_schedule != "warmup_cosine":
            raise JaxaeError(
                f"--warmup-steps {self.warmup_steps} is for --lr-schedule warmup_cosine; this run's schedule is "
                f"{self.lr_schedule}"
            )
        if self.schedule_steps and self.lr_schedule == "constant":
            raise JaxaeError(
                f"--schedule-steps {self.schedule_steps} is the length of a --lr-schedule (cosine, warmup_cosine); "
                "this run's learning rate is constant"
            )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for key, value in d.items():
            if isinstance(value, tuple):
                d[key] = list(value)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise JaxaeError(f"unknown config keys: {', '.join(unknown)}")
        d = dict(d)
        for key, value in d.items():
            if isinstance(known[key].default, tuple) and isinstance(value, list):
                d[key] = tuple(value)
        return cls(**d)


def declaration(f: dataclasses.Field) -> Setting:
    """The :class:`Setting` a field was declared with."""
    return f.metadata["setting"]


def flag_of(name: str) -> str:
    """The ``train`` flag of a setting, ``"--latent-dim"`` for ``latent_dim``."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    given = declaration(fields[name]).flag if name in fields else None
    return given or "--" + name.replace("_", "-")


def _kind(f: dataclasses.Field) -> type:
    return type(f.default) if f.default is not None else str


def _check_field(f: dataclasses.Field, value: Any) -> None:
    s = declaration(f)
    flag = flag_of(f.name)
    kind = _kind(f)
    if s.check is not None:
        s.check(value)
        return
    if value is None and "None" in str(f.type):
        return
    if kind is str:
        if not isinstance(value, str):
            hint = ""
            if f.name == "dataset" and hasattr(value, "shape"):
                hint = "; give images in memory to fit(train=..., test=...) or as jaxae.Dataset.from_arrays"
            raise JaxaeError(f"{flag} must be a name, got {type(value).__name__}{hint}")
    elif kind is int:
        if not _is_int(value):
            raise JaxaeError(f"{flag} must be an integer, got {value!r}")
    elif kind is float:
        if not _is_number(value):
            hint = ""
            if f.name == "lr" and callable(value):
                hint = (
                    "; a schedule is --lr-schedule (constant, cosine, warmup_cosine) with --warmup-steps, "
                    "or pass your own optax optimizer to fit(tx=...)"
                )
            raise JaxaeError(f"{flag} must be a number, got {value!r}{hint}")
        # Refused here, before any data is loaded: inf or nan only shows up later as a
        # "diverged" loss whose advice (a smaller --lr) points the wrong way.
        if not math.isfinite(value):
            raise JaxaeError(f"{flag} must be a finite number, got {value!r}")
    choices = s.choices() if callable(s.choices) else s.choices
    if choices is not None and value not in choices:
        if f.name == "variant":
            get_variant(value)  # the registry's own message
        if f.name == "normalize":
            get_normalization(value)
        raise JaxaeError(f"unknown {flag} {value!r}; choose {' or '.join(choices)}")
    if s.bound is not None and not s.bound.holds(value):
        raise JaxaeError(f"{flag} must be {s.bound.text}, got {value}")


def settings() -> list[dataclasses.Field]:
    """The fields of :class:`TrainConfig`, in declaration order."""
    return list(dataclasses.fields(TrainConfig))


#: The settings ``jaxae sweep`` may give a list of values, one per model (the seed first).
SWEEPABLE = tuple(sorted((f.name for f in settings() if declaration(f).sweep), key=lambda n: (n != "seed", n != "lr")))
#: The settings that set the parameter shapes: one value per sweep.
SHAPE_SETTINGS = tuple(f.name for f in settings() if declaration(f).shape)
#: What ``--init-from`` takes from its checkpoint where no flag says otherwise: the model.
MODEL_SETTINGS = tuple(f.name for f in settings() if declaration(f).model)
#: The settings a resumed run may change: they shape only what comes next.
RESUME_MAY_CHANGE = frozenset(f.name for f in settings() if declaration(f).may_change_on_resume)


# -- the flags --------------------------------------------------------------------------------


def _format_default(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return "none" if value is None else str(value)


def _cli_type(f: dataclasses.Field) -> Callable[[str], Any]:
    s = declaration(f)
    if s.parse is not None:
        return s.parse
    return {int: int, float: float}.get(_kind(f), str)


def add_setting_flags(
    parser: argparse.ArgumentParser,
    *,
    sweep: bool = False,
    config_class: type = TrainConfig,
    only: dict[str, str | None] | None = None,
) -> None:
    """Adds a flag for every setting of ``config_class``, derived from its declaration.

    A flag left out is not in the parsed namespace at all (its default is ``SUPPRESS``), so
    :func:`given_settings` tells a flag given with the default value from one not given: a
    resumed run keeps the checkpoint's value for the flags left out. With ``sweep``, sweepable
    settings take a comma list (parsed by :func:`sweep_lists`) and shape settings one value.
    ``only``: just these settings, each with what the command does when it is left out (its
    help's default; None: the declared default), as ``jaxae convert`` takes a model's settings.
    """
    groups: dict[str, Any] = {}
    for f in dataclasses.fields(config_class):
        if only is not None and f.name not in only:
            continue
        s = declaration(f)
        if s.group not in groups:
            groups[s.group] = parser if s.group == "training" or only else parser.add_argument_group(s.group)
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        shown = (only or {}).get(f.name) or _format_default(default)
        help_text = f"{s.help} (default: {shown})"
        names = [s.flag or flag_of(f.name)]
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "metavar": s.metavar}
        if sweep and s.sweep:
            if s.sweep_flag:
                names.insert(0, s.sweep_flag)
            kwargs.update(type=str, help=f"{s.help}: one value or a comma list (default: {_format_default(default)})")
        elif sweep and s.shape:
            # nargs="+" only to catch a list and say why it is refused.
            kwargs.update(type=str, nargs="+", help=f"{help_text}; one value per sweep")
        else:
            static = s.choices if isinstance(s.choices, tuple) else None
            kwargs.update(type=_cli_type(f), choices=static, help=help_text)
            if static is not None:
                kwargs.pop("metavar")
        groups[s.group].add_argument(*names, **kwargs)


def given_settings(args: argparse.Namespace, config_class: type = TrainConfig) -> dict[str, Any]:
    """The settings whose flags were given, as ``{field: value}``."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(config_class) if hasattr(args, f.name)}


def _value_list(kind: type, flag: str) -> Callable[[str], list]:
    def parse(text: str) -> list:
        try:
            return [kind(v) for v in text.split(",")]
        except ValueError:
            kinds = "integers" if kind is int else "numbers"
            raise JaxaeError(f"{flag} takes one value or a comma list of {kinds}, e.g. 1,2,3; got {text!r}") from None

    return parse


def shape_message(name: str) -> str:
    return (
        f"{flag_of(name)} takes one value in a sweep: it changes the parameter shapes, and the models of "
        "one sweep are stacked into one program; run one sweep per value"
    )


def sweep_lists(given: dict[str, Any], config_class: type = TrainConfig) -> tuple[dict[str, Any], dict[str, list]]:
    """Splits the given flags of ``jaxae sweep`` into single values and the sweepable lists.

    Returns:
        ``(single, lists)``: the settings with one value each (a list's first value included,
        so ``single`` builds the base config) and ``{setting: values}`` for the sweepable ones.

    Raises:
        JaxaeError: a list for a shape setting, or a list that is not numbers.
    """
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    single, lists = {}, {}
    for name, value in given.items():
        s = declaration(fields[name])
        if s.sweep:
            flag = s.sweep_flag or flag_of(name)
            lists[name] = _value_list(_kind(fields[name]), flag)(value)
            single[name] = lists[name][0]
        elif s.shape:
            separators = ";/" if isinstance(fields[name].default, tuple) else ",;/"  # a tuple's value has commas
            if len(value) > 1 or any(sep in value[0] for sep in separators):
                raise JaxaeError(shape_message(name))
            try:
                single[name] = _cli_type(fields[name])(value[0])
            except (ValueError, argparse.ArgumentTypeError):
                raise JaxaeError(
                    f"{flag_of(name)}: cannot read {value[0]!r} ({declaration(fields[name]).help})"
                ) from None
        else:
            single[name] = value
    return single, lists
