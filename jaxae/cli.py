"""The ``jaxae`` command: parse flags, call the library. Bad input -> one line on stderr, exit 2."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import warnings
from collections.abc import Sequence

from jaxae.errors import CheckpointSaveError, JaxaeError, TrainingInterrupted


def _defaults():
    from jaxae.train import TrainConfig

    return TrainConfig()


class _OneLineErrorParser(argparse.ArgumentParser):
    """Flag errors as one line, like every other jaxae error (exit status 2, no usage dump)."""

    def error(self, message: str):
        self.exit(2, f"jaxae: error: {message} (see: {self.prog} --help)\n")


def _positive_ints(text: str) -> tuple[int, ...]:
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


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    d = _defaults()
    p.add_argument(
        "--variant",
        default=d.variant,
        help="vanilla, denoising, sparse or vae (default: %(default)s)",
    )
    p.add_argument(
        "--arch",
        choices=("mlp", "conv"),
        default=d.arch,
        help="mlp = the document's MLP (784-128-64-32 on 28x28 images; inputs H*W*C for others); conv = a small "
        "conv net for sides divisible by 4 (vanilla, denoising, vae) (default: %(default)s)",
    )
    p.add_argument(
        "--dataset",
        default=d.dataset,
        help="'mnist-sample' (embedded), a folder of IDX files (MNIST format, or (N, H, W, C) for colour), or a "
        "TFDS name such as fashion_mnist or cifar10 (default: %(default)s)",
    )
    p.add_argument("--tfds-data-dir", default=None, help="TFDS data directory (TFDS datasets only)")
    p.add_argument("--epochs", type=int, default=d.epochs, help="default: %(default)s")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch size (default: %(default)s)")
    p.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate (default: %(default)s)")
    _add_optimizer_flags(p, d)
    p.add_argument("--seed", type=int, default=d.seed, help="0 to 2**32-1 (default: %(default)s)")
    p.add_argument(
        "--normalize",
        choices=("unit", "seed"),
        default=d.normalize,
        help="input scaling: unit = [0,1]; seed = the document's Normalize((0.5,),(0.5,)) to [-1,1] "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--init",
        choices=("torch", "flax"),
        default=d.init,
        help="parameter init: torch.nn.Linear's defaults or Flax's (default: %(default)s)",
    )
    p.add_argument("--latent-dim", type=int, default=d.latent_dim, help="code size (default: %(default)s)")
    p.add_argument(
        "--hidden-dims",
        type=_positive_ints,
        default=d.hidden_dims,
        help="encoder hidden widths, comma-separated; the decoder mirrors them (default: 128,64)",
    )
    g = p.add_argument_group("denoising")
    g.add_argument(
        "--noise-std",
        type=float,
        default=d.noise_std,
        help="Gaussian noise std, in pixel units (fraction of the data range) (default: %(default)s)",
    )
    g.add_argument(
        "--mask-prob",
        type=float,
        default=d.mask_prob,
        help="masking-noise probability per pixel (default: %(default)s)",
    )
    g = p.add_argument_group("sparse")
    g.add_argument(
        "--sparsity",
        choices=("l1", "kl"),
        default=d.sparsity,
        help="l1: mean |code| on a ReLU code; kl: Bernoulli KL of a sigmoid code to --sparsity-target "
        "(default: %(default)s)",
    )
    g.add_argument("--sparsity-weight", type=float, default=d.sparsity_weight, help="default: %(default)s")
    g.add_argument("--sparsity-target", type=float, default=d.sparsity_target, help="default: %(default)s")
    g = p.add_argument_group("vae")
    g.add_argument("--beta", type=float, default=d.beta, help="weight of the KL term (default: %(default)s)")
    g.add_argument(
        "--likelihood",
        choices=("bernoulli", "gaussian"),
        default=d.likelihood,
        help="pixel likelihood: bernoulli (sigmoid cross-entropy) or gaussian (squared error) (default: %(default)s)",
    )


def _add_optimizer_flags(p: argparse.ArgumentParser, d) -> None:
    g = p.add_argument_group("optimizer", "torch.optim.Adam's settings and defaults; adamw is torch.optim.AdamW")
    g.add_argument("--optimizer", choices=("adam", "adamw"), default=d.optimizer, help="default: %(default)s")
    g.add_argument(
        "--betas",
        type=_two_floats,
        default=d.betas,
        help="Adam's beta1,beta2 (default: 0.9,0.999)",
    )
    g.add_argument("--eps", type=float, default=d.eps, help="default: %(default)s")
    g.add_argument(
        "--weight-decay",
        type=float,
        default=d.weight_decay,
        help="adam: L2 term added to the gradient; adamw: decoupled decay (default: %(default)s)",
    )


def _config_from_args(args: argparse.Namespace):
    from jaxae.train import TrainConfig

    return TrainConfig(
        variant=args.variant,
        dataset=args.dataset,
        tfds_data_dir=args.tfds_data_dir,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        normalize=args.normalize,
        init=args.init,
        hidden_dims=args.hidden_dims,
        latent_dim=args.latent_dim,
        arch=args.arch,
        noise_std=args.noise_std,
        mask_prob=args.mask_prob,
        sparsity=args.sparsity,
        sparsity_weight=args.sparsity_weight,
        sparsity_target=args.sparsity_target,
        beta=args.beta,
        likelihood=args.likelihood,
        optimizer=args.optimizer,
        betas=args.betas,
        eps=args.eps,
        weight_decay=args.weight_decay,
    )


def _add_parallel_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "devices and hosts",
        "Data-parallel training. The global --batch-size is split evenly over the devices, and the "
        "same seed gives the same results on any number of devices. For a multi-process run start "
        "one process per host with the same flags and its own --process-id; process 0 writes the "
        "outputs (--workdir should be on a shared file system for the checkpoint).",
    )
    g.add_argument(
        "--parallel",
        choices=("auto", "none", "pmap", "shard"),
        default="auto",
        help="none: one device; pmap: jax.pmap over this host's devices; shard: jax.jit over a "
        "device mesh of every process, batch sharded along 'data'; auto: shard when more than one "
        "device is visible, else none (default: %(default)s)",
    )
    g.add_argument(
        "--coordinator",
        metavar="HOST:PORT",
        default=os.environ.get("JAX_COORDINATOR_ADDRESS"),
        help="address of process 0 for a multi-process run (default: $JAX_COORDINATOR_ADDRESS)",
    )
    g.add_argument(
        "--num-processes",
        type=int,
        metavar="N",
        default=os.environ.get("JAX_NUM_PROCESSES"),  # argparse applies type= to string defaults
        help="number of processes in the run (default: $JAX_NUM_PROCESSES)",
    )
    g.add_argument(
        "--process-id",
        type=int,
        metavar="I",
        default=os.environ.get("JAX_PROCESS_ID"),
        help="this process's index, 0..N-1 (default: $JAX_PROCESS_ID)",
    )
    g.add_argument(
        "--coordinator-timeout",
        type=float,
        metavar="SECONDS",
        default=60,
        help="how long to wait for every process to reach the coordinator before giving up (default: %(default)s)",
    )
    g.add_argument(
        "--distributed",
        action="store_true",
        help="join a multi-process run whose settings JAX detects from a cluster launcher (SLURM, "
        "Open MPI, Cloud TPU, Kubernetes); implied by --coordinator/--num-processes/--process-id",
    )


def _strategy_from_args(args: argparse.Namespace):
    from jaxae import parallel

    if args.distributed or any(v is not None for v in (args.coordinator, args.num_processes, args.process_id)):
        # Before anything touches a device: the backend must see every process.
        parallel.initialize_distributed(
            args.coordinator, args.num_processes, args.process_id, timeout=args.coordinator_timeout
        )
    return parallel.get_strategy(args.parallel)


def cmd_train(args: argparse.Namespace) -> int:
    from jaxae.loop import fit

    config = _with_saved_settings(args, _config_from_args(args))
    config.validate()
    strategy = _strategy_from_args(args)
    # A warning is one line on stderr, like an error (Python's own format adds the source line).
    # Only the display is swapped, not the filters (as catch_warnings would restore them): the
    # filters checkpoint.py adds against Orbax's shutdown noise must outlive this call.
    show = warnings.showwarning
    warnings.showwarning = lambda message, *_, **__: print(f"jaxae: warning: {message}", file=sys.stderr)
    try:
        result = fit(
            config,
            args.workdir,
            progress=not args.no_progress,
            strategy=strategy,
            init_from=args.init_from,
            resume=args.resume,
            save_every=args.save_every,
            keep=args.keep,
        )
    finally:
        warnings.showwarning = show
    if not strategy.is_primary:
        return 0
    if result.start_epoch >= config.epochs:
        print(
            f"jaxae: {args.workdir} is already at epoch {result.start_epoch} (--epochs {config.epochs}); "
            "nothing to train. Raise --epochs to train longer",
            file=sys.stderr,
        )
    last = result.history[-1] if result.history else {"epoch": result.start_epoch}
    summary = {k: last[k] for k in last if k.startswith("test_")}
    print(json.dumps({"workdir": args.workdir, "epochs": last["epoch"], "devices": strategy.device_count, **summary}))
    return 0


def _value_list(kind, flag: str):
    """``"1e-3,5e-4"`` -> ``[0.001, 0.0005]``: a sweep flag's comma list (JaxaeError if not numbers)."""

    def parse(text: str) -> list:
        try:
            values = [kind(v) for v in text.split(",")]
        except ValueError:
            kinds = "integers" if kind is int else "numbers"
            raise JaxaeError(f"{flag} takes one value or a comma list of {kinds}, e.g. 1,2,3; got {text!r}") from None
        return values

    return parse


# Sweep flags that may take a comma list, as (flag, TrainConfig field, type).
_SWEEP_LISTS = (
    ("--lr", "lr", float),
    ("--noise-std", "noise_std", float),
    ("--mask-prob", "mask_prob", float),
    ("--sparsity-weight", "sparsity_weight", float),
    ("--sparsity-target", "sparsity_target", float),
    ("--beta", "beta", float),
)


def _add_sweep_flags(p: argparse.ArgumentParser) -> None:
    """Every ``train`` flag; the shape-keeping settings take comma lists, the shape settings one value."""
    d = _defaults()
    _add_train_flags(p)
    p.add_argument(
        "--seeds",
        "--seed",
        dest="seeds",
        default=str(d.seed),
        help="comma list of seeds, e.g. 0,1,2 (default: 0)",
    )
    for flag, field, _ in _SWEEP_LISTS:
        p.add_argument(
            flag,
            dest=field,
            default=str(getattr(d, field)),
            help="one value or a comma list",
        )
    # Shape settings: nargs="+" only to catch a list and say why it is refused.
    p.add_argument("--variant", nargs="+", default=[d.variant], help="one variant (default: %(default)s)")
    p.add_argument("--arch", nargs="+", default=[d.arch], help="mlp or conv, one value (default: mlp)")
    p.add_argument("--latent-dim", nargs="+", type=str, default=[str(d.latent_dim)], help="one code size")
    p.add_argument(
        "--hidden-dims",
        nargs="+",
        default=[",".join(map(str, d.hidden_dims))],
        help="one comma-separated list of encoder widths, e.g. 128,64 (default: 128,64)",
    )


def _sweep_configs_from_args(args: argparse.Namespace):
    from jaxae.sweep import SHAPE_SETTINGS, check_size, sweep_configs

    for field in SHAPE_SETTINGS:
        given = getattr(args, field)
        separators = ";/" if field == "hidden_dims" else ",;/"
        if len(given) > 1 or any(sep in given[0] for sep in separators):
            from jaxae.sweep import _shape_message

            raise JaxaeError(_shape_message(field))
        setattr(args, field, given[0])
    if args.arch not in ("mlp", "conv"):
        raise JaxaeError(f"unknown --arch {args.arch!r}; choose mlp or conv")
    try:
        args.latent_dim = int(args.latent_dim)
        args.hidden_dims = tuple(int(v) for v in args.hidden_dims.split(","))
    except ValueError:
        raise JaxaeError("--latent-dim takes one integer and --hidden-dims one comma list of integers") from None
    # Parsed here, not by argparse, so a bad list is the one-line error every other bad input gives.
    lists = {"seed": _value_list(int, "--seeds")(args.seeds)}
    lists.update({field: _value_list(kind, flag)(getattr(args, field)) for flag, field, kind in _SWEEP_LISTS})
    args.seed = lists["seed"][0]
    for _, field, _ in _SWEEP_LISTS:
        setattr(args, field, lists[field][0])
    base = _config_from_args(args)
    base.validate()
    # From the grid's size, before its configs are made: a grid far too large is refused at once.
    check_size(base, math.prod(len(v) for v in lists.values()), args.parallel)
    return sweep_configs(base, **{k: v for k, v in lists.items() if len(v) > 1 or k == "seed"})


def cmd_sweep(args: argparse.Namespace) -> int:
    from jaxae.sweep import fit_sweep

    configs = _sweep_configs_from_args(args)
    result = fit_sweep(
        configs,
        args.workdir,
        strategy=args.parallel,
        resume=args.resume,
        progress=not args.no_progress,
        save_every=args.save_every,
        keep=args.keep,
        figures=not args.no_figures,
    )
    if result.start_epoch >= configs[0].epochs:
        print(f"jaxae: {args.workdir} is already at epoch {result.start_epoch}; nothing to train", file=sys.stderr)
    summary = result.summary
    print(
        json.dumps(
            {
                "workdir": args.workdir,
                "models": summary["models"],
                "placement": summary["placement"],
                "groups": summary["groups"],
            }
        )
    )
    diverged = [(r["workdir"], r["diverged_at_epoch"]) for r in summary["runs"] if "diverged_at_epoch" in r]
    if diverged:
        which = ", ".join(f"{name} at epoch {epoch}" for name, epoch in diverged)
        print(
            f"jaxae: error: {len(diverged)} of {summary['models']} models diverged ({which}); the others trained, "
            f"and {args.workdir}/summary.json leaves the diverged ones out of their groups. Try a smaller --lr",
            file=sys.stderr,
        )
        return 1
    return 0


# What --init-from takes from its checkpoint when the flags are left at their defaults: the model.
_MODEL_FIELDS = ("variant", "arch", "hidden_dims", "latent_dim", "sparsity")


def _with_saved_settings(args: argparse.Namespace, config):
    """``config`` with the checkpoint's settings where a flag was left at its default.

    ``--resume`` takes every setting a resumed run may not change (so a converted PyTorch run
    continues with ``--resume --epochs N`` alone); ``--init-from`` takes the model's sizes.
    """
    import dataclasses

    from jaxae import checkpoint
    from jaxae.train import TrainConfig

    source = args.workdir if args.resume else args.init_from
    if source is None:
        return config
    try:
        _, meta = checkpoint.read_meta(source)
        saved = TrainConfig.from_dict(meta["config"])
    except JaxaeError:
        return config  # fit() says what is wrong with it, in its own words
    if args.resume:
        fields = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in checkpoint.RESUME_MAY_CHANGE]
    else:
        fields = _MODEL_FIELDS
    defaults = TrainConfig()
    changes = {f: getattr(saved, f) for f in fields if getattr(config, f) == getattr(defaults, f)}
    if changes.get("dataset", "") is None:  # converted with --image-shape alone: trained on --dataset
        del changes["dataset"]
    return dataclasses.replace(config, **changes)


def cmd_evaluate(args: argparse.Namespace) -> int:
    import jax

    from jaxae.data import load_dataset

    trainer, state, config = _restore_for_its_dataset(
        args.workdir, args.step, need_dataset=True, dataset=args.dataset, data_dir=args.tfds_data_dir
    )
    test = load_dataset(config.dataset, "test", config.tfds_data_dir)
    images = jax.device_put(test.images.reshape(len(test), -1))
    metrics = trainer.jit_evaluate(state, images, batch_size=min(config.eval_batch_size, len(test)))
    out = {"step": int(state.step), "epoch": int(state.epoch), "dataset": config.dataset}
    out.update({f"test_{k}": float(v) for k, v in jax.device_get(metrics).items()})
    if args.iw_samples:
        from jaxae.objectives import importance_weighted_nll, iw_chunk

        if config.variant != "vae":
            raise JaxaeError(f"--iw-samples needs a vae run; {args.workdir} holds a {config.variant} model")
        if args.iw_samples < 1:
            raise JaxaeError(f"--iw-samples must be at least 1, got {args.iw_samples}")
        batch = min(100, len(test))
        # Samples decoded in chunks that fit the memory: any K runs, a K that fits in one is unchunked.
        chunk = iw_chunk(config.arch, tuple(test.image_shape), batch)
        if chunk < args.iw_samples:
            print(
                f"jaxae: --iw-samples {args.iw_samples}: decoding {chunk} samples per image at a time "
                f"({-(-args.iw_samples // chunk)} chunks per batch of {batch} images)",
                file=sys.stderr,
            )
        fn = importance_weighted_nll(trainer.normalization, config.likelihood, args.iw_samples, chunk)
        nll = trainer.jit_mean_over(state, images, fn=fn, batch_size=batch)
        out["test_nll_iw"] = float(nll["nll_iw"])
        out["iw_samples"] = args.iw_samples
    if args.probe:
        from jaxae.probe import linear_probe

        train = load_dataset(config.dataset, "train", config.tfds_data_dir)
        out.update(linear_probe(trainer, state, train, test))
    undefined = sorted(k for k, v in out.items() if isinstance(v, float) and not math.isfinite(v))
    if undefined:
        # JSON has no NaN: print null, and fail so that scripts notice a broken model.
        out.update({k: None for k in undefined})
        print(json.dumps(out))
        print(
            f"jaxae: error: {', '.join(undefined)} are not finite: the model in {args.workdir} has NaN or Inf "
            "parameters or outputs",
            file=sys.stderr,
        )
        return 1
    print(json.dumps(out))
    return 0


def _image_shape_flag(text: str) -> tuple[int, int, int]:
    """``--image-shape`` value ``"32,32,3"`` -> ``(32, 32, 3)``, under the rules every dataset's images pass."""
    from jaxae.data import MIN_IMAGE_SIDE, check_image_shape

    try:
        values = tuple(int(v) for v in text.split(","))
        if len(values) != 3:
            raise ValueError(text)
        check_image_shape(values, "--image-shape")
    except (ValueError, JaxaeError):
        raise argparse.ArgumentTypeError(
            f"expected H,W,C with sides of at least {MIN_IMAGE_SIDE} and 1 or 3 channels, like 32,32,3; got {text!r}"
        ) from None
    return values  # type: ignore[return-value]


def _restore_for_its_dataset(
    workdir: str, step: int | None, *, need_dataset: bool, dataset: str | None = None, data_dir: str | None = None
):
    """``checkpoint.restore`` for the images of the run's dataset (or ``dataset``, replacing it in the
    returned config), whose shape is read from its headers.

    A checkpoint whose model is for other images (the dataset's files were replaced by images of
    another shape with as many values) is one line instead of numbers computed on misread
    pixels; an older checkpoint, which recorded only a guess of its image shape, takes the
    dataset's. Without ``need_dataset`` a dataset that cannot be read is passed over.
    """
    import dataclasses

    from jaxae import checkpoint
    from jaxae.data import dataset_image_shape, shape_text

    _, meta = checkpoint.read_meta(workdir, step)
    config = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    if dataset is None:
        dataset, data_dir = config.get("dataset", "mnist-sample"), config.get("tfds_data_dir")
    try:
        shape = dataset_image_shape(dataset, data_dir)
    except JaxaeError:
        if need_dataset:
            raise
        shape = None
    try:
        trainer, state, saved = checkpoint.restore(workdir, step, image_shape=shape)
    except checkpoint.ImageShapeError as e:
        raise JaxaeError(f"{e}; the {dataset} images are {shape_text(shape)} now") from None
    return trainer, state, dataclasses.replace(saved, dataset=dataset, tfds_data_dir=data_dir)


def cmd_convert(args: argparse.Namespace) -> int:
    import dataclasses
    from pathlib import Path

    import jax.numpy as jnp

    from jaxae import checkpoint, convert
    from jaxae.data import dataset_image_shape, load_dataset, shape_text
    from jaxae.train import TrainConfig, build

    dataset = args.dataset
    if dataset is None and (args.image_shape is None or args.check):
        dataset = TrainConfig().dataset  # the images the shape is read from, or --check runs on
    base = TrainConfig(
        dataset=dataset,
        tfds_data_dir=args.tfds_data_dir,
        normalize=args.normalize,
        sparsity=args.sparsity,
    )
    base.validate()
    if args.variant is not None:
        convert.get_twin(args.variant, args.arch or "mlp")
    if not args.tolerance >= 0:
        raise JaxaeError(f"--tolerance must be a non-negative number, got {args.tolerance}")
    out = Path(args.out)
    replacing = _check_convert_out(out, checkpoint.checkpoint_dir(out), force=args.force)
    # Everything is read and checked before anything is written. The converted run is for
    # --dataset: its images give the model's image shape, unless --image-shape says it.
    renames = convert.parse_renames(args.rename)
    image_shape, test = args.image_shape, None
    given_text = shape_text(image_shape or ())
    given_as, fix = "--image-shape is", "give the image shape the model was trained on"
    if image_shape is None or args.check:
        test = load_dataset(base.dataset, "test", base.tfds_data_dir)
        test_shape = shape_text(test.image_shape)
        if image_shape is None:
            image_shape = test.image_shape
            given_as = f"the {base.dataset} images are"
            fix = "give --dataset with the model's images or --image-shape H,W,C"
        elif tuple(test.image_shape) != tuple(image_shape):
            raise JaxaeError(
                f"--check runs on the {base.dataset} test images, which are {test_shape}, but --image-shape is "
                f"{given_text}; give --dataset with the model's images, or leave --check out"
            )
    elif base.dataset is not None:
        # The converted run records --dataset, and later runs read its images as the model's: where
        # the dataset can be read (headers only), it must agree with --image-shape.
        try:
            dataset_shape = dataset_image_shape(base.dataset, base.tfds_data_dir)
        except JaxaeError:
            dataset_shape = None
        if dataset_shape is not None and tuple(dataset_shape) != tuple(image_shape):
            raise JaxaeError(
                f"--image-shape is {given_text} but the {base.dataset} images, which the converted run is for, are "
                f"{shape_text(dataset_shape)}; give --dataset with the model's images"
            )
    found = convert.match(
        args.model,
        base,
        variant=args.variant,
        arch=args.arch,
        hidden_dims=args.hidden_dims,
        latent_dim=args.latent_dim,
        image_shape=image_shape,
        rename=renames,
        allow_nonfinite=args.allow_nonfinite,
        image_shape_given_as=given_as,
        image_shape_fix=fix,
    )
    file = found.file
    optimizer = None if args.no_optimizer else file.optimizer
    config = found.config
    schedule = None
    if optimizer is not None:
        settings = convert.optimizer_settings(optimizer, args.model, args.optimizer)
        schedule = convert.lr_schedule_evidence(file)
        if schedule and not args.constant_lr:
            raise JaxaeError(
                f"{args.model} holds {schedule}: its learning rate followed a schedule, which jaxae cannot continue "
                f"(it trains at a constant --lr); pass --constant-lr to continue at the lr it had reached "
                f"({settings['lr']:g}), or --no-optimizer to convert the weights alone"
            )
        config = dataclasses.replace(config, **settings)
    config.validate()
    convert.get_twin(config.variant, config.arch)
    trainer, state = build(config, found.image_shape)
    params = convert.params_from_torch(
        found.state_dict,
        state.params,
        config.variant,
        arch=config.arch,
        what=found.description,
        source=args.model,
        image_shape=found.image_shape,
    )
    run = {}
    # The file's parameter order (and its optimizer's groups), which export writes back.
    groups = [list(found.state_dict)]
    order_note = None
    if optimizer is not None:
        groups, order_note = convert.optimizer_parameter_groups(
            optimizer, found.state_dict, args.model, names=dict(zip(file.tensors, found.state_dict, strict=True))
        )
        links = convert.links_for(convert.get_twin(config.variant, config.arch), params, found.image_shape)
        opt_state, adam_step = convert.opt_state_from_torch(
            optimizer,
            [key for group in groups for key in group],
            links,
            trainer.tx,
            params,
            args.model,
            allow_nonfinite=args.allow_nonfinite,
        )
        step = file.step if file.step is not None else adam_step
        epoch = file.epoch or 0
        state = state.replace(
            params=params,
            opt_state=opt_state,
            step=jnp.asarray(step, jnp.int32),
            epoch=jnp.asarray(epoch, jnp.int32),
        )
        run = {"optimizer": {**settings, "step": adam_step}, "epoch": epoch, "step": step}
    else:
        state = state.replace(params=params, opt_state=trainer.tx.init(params))

    report = None
    if args.check:
        report = convert.parity_report(
            found.state_dict, trainer.model(params), test.images, config, tolerance=args.tolerance
        )
        report = {"source": args.model, "dataset": config.dataset, "split": "test", **report}
        if not report["passed"]:
            print(json.dumps(report, indent=2))
            print(
                f"jaxae: parity check failed: max abs difference {report['max_abs_diff_outputs']:.3g} (outputs), "
                f"{report['max_abs_diff_parameters']:.3g} (parameters), above --tolerance {args.tolerance:g}; "
                f"nothing written to {out}",
                file=sys.stderr,
            )
            return 1

    named = optimizer is not None and all("param_names" in g for g in optimizer["param_groups"])

    def write(folder: Path) -> None:
        checkpoint.save(folder, state, config)
        (folder / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        convert.write_torch_layout(folder, list(found.state_dict), groups, named=named)
        if report is not None:
            (folder / "parity.json").write_text(json.dumps(report, indent=2) + "\n")
        else:  # --force without --check: a parity.json left from an earlier conversion describes other weights
            (folder / "parity.json").unlink(missing_ok=True)

    if replacing:
        _replace_conversion(out, write)
    else:
        write(out)
    summary = {
        "workdir": str(out),
        "source": args.model,
        "read": file.container,
        "variant": config.variant,
        "arch": config.arch,
        "image_shape": list(found.image_shape),
        "tensors": len(found.state_dict),
    }
    if found.stripped:
        summary["stripped"] = found.stripped
    if found.inferred:
        summary["inferred"] = {k: list(v) if isinstance(v, tuple) else v for k, v in found.inferred.items()}
    summary.update(run)
    notes = found.notes + file.notes
    if file.optimizer is not None and optimizer is None:
        notes.append("optimizer state left out (--no-optimizer): a fresh Adam")
    if order_note:
        notes.append(order_note)
    if schedule:
        notes.append(f"{schedule} not carried (--constant-lr): training continues at lr {config.lr:g}, constant")
    if test is None and config.dataset is None:
        notes.append(
            f"image shape {given_text} from --image-shape; no dataset recorded: give --dataset to evaluate, "
            "and to train --resume (the first one given is recorded)"
        )
    elif test is None:
        notes.append(f"image shape {given_text} from --image-shape; the {config.dataset} images were not read")
    if notes:
        summary["notes"] = notes
    if report is not None:
        print(json.dumps({**summary, **report}, indent=2))
    else:
        print(json.dumps(summary))
    return 0


_CONVERT_FILES = ("config.json", "parity.json", "torch_layout.json")


def _only_a_conversion(out) -> bool:
    """Whether ``out`` holds an earlier conversion and nothing else: its files, one checkpoint, never trained."""
    from jaxae import checkpoint

    try:
        names = {p.name for p in out.iterdir() if not p.name.startswith(".jaxae")}
        if not ({"config.json", checkpoint.CHECKPOINT_DIR} <= names <= {*_CONVERT_FILES, checkpoint.CHECKPOINT_DIR}):
            return False  # metrics.jsonl, figures or anything else: a run trained here, or the user's files
        return len(checkpoint.complete_steps(out)) == 1 and not checkpoint.unfinished_saves(out)
    except (OSError, JaxaeError):
        return False


def _check_convert_out(out, checkpoints, *, force: bool) -> bool:
    """Refuses an --out that convert would write over: checkpoints always, its JSON files unless --force;
    with --force, an earlier conversion (and nothing else) is replaced: returns whether it will be."""
    nearest = out
    while not nearest.exists() and nearest != nearest.parent:
        nearest = nearest.parent
    if not nearest.is_dir():
        raise JaxaeError(f"--out {out}: {nearest} is a file, not a folder; give a new folder for the checkpoint")
    if checkpoints.exists():
        if force and _only_a_conversion(out):
            _check_writable(out.parent, out)
            return True
        # --force never deletes a training run's checkpoints: they may be its only copy.
        raise JaxaeError(
            f"--out {out} already holds checkpoints ({checkpoints}) of a run that is not only an earlier conversion, "
            "which convert never replaces (not even with --force); convert into a new folder"
        )
    existing = [name for name in _CONVERT_FILES if (out / name).exists()]
    if existing and not force:
        raise JaxaeError(
            f"--out {out} already holds {' and '.join(existing)}, which convert would overwrite; "
            "convert into a new folder, or pass --force to replace them"
        )
    _check_writable(nearest, out)
    return False


def _check_writable(folder, out) -> None:
    try:  # before any work, and leaving nothing behind: can this process write there at all?
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise JaxaeError(
            f"--out {out} cannot be written ({e.strerror or e}); give a folder this process can write"
        ) from None


def _replace_conversion(out, write) -> None:
    """Replaces the earlier conversion in ``out`` by what ``write(folder)`` writes, losing neither.

    The new conversion is written complete beside ``out`` first; then, under ``out``'s lock (no
    run may be starting there), the old folder is moved aside, the new one moved in, and the old
    one deleted. A failure before the swap leaves the earlier conversion as it was.
    """
    import shutil

    from jaxae.loop import WorkdirLock

    new = out.with_name(f".{out.name}.jaxae-convert-{os.getpid()}")
    old = out.with_name(f".{out.name}.jaxae-replaced-{os.getpid()}")
    try:
        write(new)
        with WorkdirLock(out):
            if not _only_a_conversion(out):  # a run started there since the check
                raise JaxaeError(f"--out {out} changed while converting: it holds a run now; nothing was replaced")
            os.replace(out, old)
        try:
            os.replace(new, out)
        except OSError:
            os.replace(old, out)  # the earlier conversion back where it was
            raise
    finally:
        shutil.rmtree(new, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)


def cmd_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from jaxae import checkpoint, convert

    fmt = args.format or ("safetensors" if Path(args.out).suffix == ".safetensors" else "torch")
    if args.with_optimizer and fmt != "torch":
        raise JaxaeError("--with-optimizer writes a torch.save checkpoint; give --format torch (a .pt file)")
    convert.check_output_file(args.out, overwrite=args.force)  # before the restore: fail before work
    _, meta = checkpoint.read_meta(args.workdir, args.step)
    if checkpoint.saved_image_shape(meta) is None:  # an older checkpoint: its dataset says the shape
        trainer, state, config = _restore_for_its_dataset(args.workdir, args.step, need_dataset=False)
    else:
        trainer, state, config = checkpoint.restore(args.workdir, args.step)
    # the images the run's model takes; an older checkpoint's shape may be a flat size: then the
    # links read it off the parameters where they can
    image_shape = tuple(checkpoint.input_shape_of(state))
    image_shape = image_shape if len(image_shape) == 3 else None
    twin = convert.get_twin(config.variant, config.arch)
    links = convert.links_for(twin, state.params, image_shape)
    state_dict = convert.to_numpy_state_dict(state.params, config.variant, config.arch, image_shape)
    summary = {"format": fmt, "variant": config.variant, "arch": config.arch, "step": int(state.step)}
    # A run converted from a PyTorch file goes back in that file's order: its optimizer state is by position.
    layout = convert.read_torch_layout(args.workdir, list(state_dict))
    groups, named = None, False
    if layout is not None:
        order, groups, named = layout
        state_dict = {key: state_dict[key] for key in order}
        if order != [link.torch_key for link in links] or len(groups) > 1:
            summary["parameter_order"] = f"the converted file's ({convert.TORCH_LAYOUT_FILE})"
    if image_shape is not None:
        summary["image_shape"] = list(image_shape)
    if args.with_optimizer:
        from jaxae.torch_reference import require_torch

        torch = require_torch()
        general = {
            "epoch": int(state.epoch),
            "global_step": int(state.step),
            "model_state_dict": {k: torch.from_numpy(v) for k, v in state_dict.items()},
            "optimizer_state_dict": convert.torch_optimizer_state_dict(
                state.opt_state, links, config, groups, named=named
            ),
        }
        path = convert.save_torch_checkpoint(general, args.out, overwrite=args.force)
        summary.update(epoch=int(state.epoch), optimizer=config.optimizer)
    else:
        path = convert.save_state_dict(state_dict, args.out, fmt, overwrite=args.force)
    print(json.dumps({"out": str(path), **summary, "tensors": len(state_dict)}))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from jaxae import bench, torch_reference

    torch_reference.require_torch()
    if any(b <= 0 for b in args.batch_sizes):
        raise JaxaeError(f"--batch-sizes must be positive, got {args.batch_sizes}")
    return bench.main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineErrorParser(
        prog="jaxae", description="JAX/Flax autoencoders: the PyTorch MNIST tutorial and its variants."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model; writes metrics, figures and a checkpoint to --workdir")
    _add_train_flags(p)
    p.add_argument("--workdir", default="runs/latest", help="output folder (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_parallel_flags(p)
    p.add_argument(
        "--init-from",
        metavar="DIR",
        default=None,
        help="start from the parameters of the checkpoint in DIR (e.g. written by 'jaxae convert'), "
        "with a fresh optimizer state",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --workdir from its latest complete checkpoint; --epochs is the total",
    )
    p.add_argument("--save-every", type=int, default=1, help="save a checkpoint every N epochs (default: %(default)s)")
    p.add_argument(
        "--keep",
        type=int,
        default=3,
        help="keep the K latest checkpoints, plus the best by test loss (default: %(default)s)",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "sweep",
        help="train a grid of models (seeds, learning rates, loss weights) as one compiled program",
        conflict_handler="resolve",  # the list flags replace train's single-value ones
    )
    _add_sweep_flags(p)
    p.add_argument("--workdir", default="runs/sweep", help="the sweep's folder, one run folder per model inside")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-figures", action="store_true", help="no per-model figures (large grids)")
    p.add_argument(
        "--parallel",
        choices=("auto", "none", "pmap", "shard"),
        default="auto",
        help="none: one device; otherwise every visible device: models spread over them when the grid has at "
        "least as many models as devices, else each model data-parallel (default: %(default)s)",
    )
    p.add_argument("--resume", action="store_true", help="continue the sweep in --workdir; --epochs is the total")
    p.add_argument("--save-every", type=int, default=1, help="checkpoint every N epochs (default: %(default)s)")
    p.add_argument("--keep", type=int, default=3, help="checkpoints kept per model, plus the best (default: 3)")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("evaluate", help="print a trained model's test metrics as JSON")
    p.add_argument("--workdir", required=True, help="a folder written by 'jaxae train'")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest complete one)")
    p.add_argument(
        "--dataset",
        default=None,
        help="evaluate on this dataset's test split, of the model's image shape (default: the run's)",
    )
    p.add_argument("--tfds-data-dir", default=None, help="TFDS data directory (with --dataset, TFDS datasets only)")
    p.add_argument(
        "--iw-samples",
        type=int,
        default=0,
        metavar="K",
        help="vae: add test_nll_iw, the importance-weighted NLL bound with K samples (nats)",
    )
    p.add_argument(
        "--probe",
        action="store_true",
        help="train a linear classifier on the frozen train-split codes; report probe_accuracy on the test "
        "split next to probe_accuracy_pixels (the same classifier on raw pixels)",
    )
    p.set_defaults(func=cmd_evaluate)

    from jaxae.convert import DEFAULT_TOLERANCE

    d = _defaults()
    p = sub.add_parser(
        "convert",
        help="a PyTorch state_dict (.pt/.pth/.safetensors) -> a checkpoint folder that evaluate and train accept",
    )
    p.add_argument(
        "model",
        metavar="MODEL.pt",
        help="torch.save(model.state_dict()) output, a training checkpoint (the tutorial's general checkpoint, "
        "a Lightning .ckpt) or a .safetensors file",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="a new folder for the checkpoint")
    p.add_argument(
        "--force",
        action="store_true",
        help="replace an earlier conversion in --out (its checkpoint and config.json, parity.json, "
        "torch_layout.json; the new one is written complete before the old one goes); a folder where a run "
        "trained, or holding other files, is still refused",
    )
    p.add_argument(
        "--allow-nonfinite",
        action="store_true",
        help="convert weights holding NaN or Inf (refused by default: such a model computes NaN)",
    )
    p.add_argument(
        "--variant",
        default=None,
        help="vanilla, denoising, sparse or vae: the model's (default: vae for a file with mean/logvar heads, "
        "else vanilla: a linear code)",
    )
    p.add_argument(
        "--arch",
        choices=("mlp", "conv"),
        default=None,
        help="mlp: the document's layout; conv: the conv twin (vanilla, denoising, vae) of "
        "jaxae.torch_reference (default: from the tensors; checked against them when given)",
    )
    p.add_argument(
        "--rename",
        action="append",
        default=[],
        metavar="OLD=NEW",
        help="rename keys starting with OLD (e.g. fc1.=encoder.0.); repeatable",
    )
    p.add_argument(
        "--no-optimizer",
        action="store_true",
        help="leave out the optimizer state a training checkpoint holds (start a fresh Adam)",
    )
    p.add_argument(
        "--optimizer",
        choices=("adam", "adamw"),
        default=None,
        help="only for files of torch releases that do not record it: whether the optimizer was Adam or AdamW",
    )
    p.add_argument(
        "--constant-lr",
        action="store_true",
        help="a run whose file shows a learning-rate schedule (a scheduler's state, or initial_lr in the "
        "optimizer's param_groups): continue it at the lr it had reached, as a constant (refused by default)",
    )
    p.add_argument(
        "--sparsity",
        choices=("l1", "kl"),
        default=d.sparsity,
        help="sparse only: l1 = a ReLU code, kl = a Sigmoid code, as trained (default: %(default)s)",
    )
    p.add_argument(
        "--normalize",
        choices=("unit", "seed"),
        default=d.normalize,
        help="the input scaling the PyTorch model was trained with; recorded for evaluate/train and used "
        "by --check (default: %(default)s)",
    )
    p.add_argument(
        "--dataset",
        default=None,
        help="recorded for evaluate/train; the image shape is read from it, and --check uses its test split "
        "(default: mnist-sample; with --image-shape and no --check: none, given later to evaluate and train)",
    )
    p.add_argument("--tfds-data-dir", default=None, help="TFDS data directory (TFDS datasets only)")
    p.add_argument(
        "--image-shape",
        type=_image_shape_flag,
        default=None,
        metavar="H,W,C",
        help="the images the PyTorch model takes (it takes them NCHW); default: --dataset's; give it to "
        "convert without the dataset at hand",
    )
    p.add_argument(
        "--latent-dim", type=int, default=None, help="code size (default: from the tensors; checked when given)"
    )
    p.add_argument(
        "--hidden-dims",
        type=_positive_ints,
        default=None,
        help="encoder hidden widths, comma-separated (default: from the tensors; checked when given)",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="run both models on the test split and print a JSON parity report; exit status 1 and "
        "nothing written when a difference is above --tolerance",
    )
    p.add_argument(
        "--tolerance",
        type=float,
        default=DEFAULT_TOLERANCE,
        help="largest max abs difference of outputs and parameters that passes --check (default: %(default)g)",
    )
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("export", help="a checkpoint -> a PyTorch state_dict (.pt) or .safetensors file")
    p.add_argument("--workdir", required=True, help="a folder written by 'jaxae train' or 'jaxae convert'")
    p.add_argument("--out", required=True, metavar="FILE", help="a new file to write, e.g. model.pt")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.add_argument(
        "--format",
        choices=("torch", "safetensors"),
        default=None,
        help="torch (torch.save) or safetensors (default: safetensors if FILE ends in .safetensors, else torch)",
    )
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument(
        "--with-optimizer",
        action="store_true",
        help="write the tutorial's general checkpoint: model_state_dict, optimizer_state_dict (torch.optim.Adam "
        "or AdamW loads it), epoch, global_step",
    )
    p.set_defaults(func=cmd_export)
    p = sub.add_parser(
        "bench",
        help="time jaxae's training against the document's PyTorch loop on this machine, in one run",
    )
    p.add_argument(
        "--dataset",
        default="mnist-sample",
        help="train split to time on, e.g. ../shared/data/fashion-mnist (default: %(default)s)",
    )
    p.add_argument(
        "--batch-sizes",
        type=lambda s: list(_positive_ints(s)),
        default=[256, 1024, 4096],
        help="comma-separated; the first is the headline (default: 256,1024,4096)",
    )
    p.add_argument("--epochs", type=int, default=0, help="epochs per method per round (default: 2; 3 with --quick)")
    p.add_argument(
        "--rounds", type=int, default=0, help="interleaved rounds, medians reported (default: 5; 3 with --quick)"
    )
    p.add_argument(
        "--quick", action="store_true", help="fewer rounds, no torch.compile: under a minute on a 2-core CPU"
    )
    p.add_argument("--no-torch-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the figures as JSON")
    p.set_defaults(func=cmd_bench)
    return parser


def _resume_command(argv: Sequence[str]) -> str:
    import shlex

    return shlex.join(["jaxae", *argv, *([] if "--resume" in argv else ["--resume"])])


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except TrainingInterrupted as e:
        how = f"; resume with: {_resume_command(argv)}" if e.checkpoint else ""
        print(f"jaxae: {e}{how}", file=sys.stderr)
        return e.exit_status
    except JaxaeError as e:
        print(f"jaxae: error: {e}", file=sys.stderr)
        return 2
    except CheckpointSaveError as e:  # the storage failed, not the input
        print(f"jaxae: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # the machine failed (a full disk, a vanished mount), not the input
        where = f": {e.filename}" if e.filename else ""
        print(f"jaxae: error: {e.strerror or e}{where}; nothing saved before it was lost", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("jaxae: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
