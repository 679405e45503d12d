"""The ``jaxae`` command: parse flags, call the library. Bad input -> one line on stderr, exit 2."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from collections.abc import Sequence

from jaxae.errors import CheckpointSaveError, JaxaeError, TrainingInterrupted


class _OneLineErrorParser(argparse.ArgumentParser):
    """Flag errors as one line, like every other jaxae error (exit status 2, no usage dump)."""

    def error(self, message: str):
        self.exit(2, f"jaxae: error: {message} (see: {self.prog} --help)\n")


def _add_run_flags(p: argparse.ArgumentParser, command: str) -> None:
    """The flags of a run's folder and its checkpoints, the same in ``train`` and ``sweep``."""
    sweep = command == "sweep"
    p.add_argument(
        "--workdir",
        default="runs/sweep" if sweep else "runs/latest",
        help="the sweep's folder, one run folder per model inside (default: %(default)s)"
        if sweep
        else "output folder (default: %(default)s)",
    )
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument(
        "--no-figures", dest="figures", action="store_false", help="no figures (reconstructions, loss curves)"
    )
    p.add_argument(
        "--no-events",
        dest="events",
        action="store_false",
        help="no TensorBoard event files (every record's numbers as scalars, in "
        + ("each model's folder's events/)" if sweep else "WORKDIR/events/)"),
    )
    p.add_argument(
        "--profile",
        default=None,
        metavar="DIR",
        help="trace the first epoch (after compiling) with jax.profiler into DIR: a *.xplane.pb that "
        "TensorBoard's profile plugin or XProf opens",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the sweep in --workdir, every model from its latest complete checkpoint; --epochs is the "
        "total, and every other flag must be given as when the sweep started"
        if sweep
        else "continue the run in --workdir from its latest complete checkpoint; --epochs is the total. The "
        "settings left out are the checkpoint's; those that shape only what comes next (--epochs, --lr and its "
        "schedule, --clip-grad-norm, --eval-batch-size) may change, the others must stay",
    )
    p.add_argument("--save-every", type=int, default=1, help="save a checkpoint every N epochs (default: %(default)s)")
    if not sweep:
        p.add_argument(
            "--save-every-steps",
            type=int,
            default=None,
            metavar="N",
            help="also save inside an epoch, every N steps, and stop there on a signal: a preemption loses at most "
            "N steps and --resume continues inside the epoch to the uninterrupted result (default: only at epoch "
            "ends)",
        )
    p.add_argument(
        "--keep",
        type=int,
        default=3,
        help="keep the K latest checkpoints (per model), plus the best by test loss (default: %(default)s)",
    )


def _add_checkpoint_flags(p: argparse.ArgumentParser) -> None:
    """The flags of the commands that read one checkpoint of a run (evaluate, export)."""
    p.add_argument("--workdir", required=True, help="a folder written by 'jaxae train' or 'jaxae convert'")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest complete one)")


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


def _given_to(fn, args: argparse.Namespace) -> dict:
    """The flags of ``args`` that ``fn`` takes by name (each flag's ``dest`` is the parameter's name).

    In ``train`` and ``sweep`` the settings' flags go into the config, never to ``fn``: a setting
    a ``TrainConfig`` subclass names ``model`` or ``devices`` is no argument of ``fit``.
    """
    import dataclasses
    import inspect

    settings = {f.name for f in dataclasses.fields(args.config_class)} if hasattr(args, "config_class") else set()
    params = inspect.signature(fn).parameters
    return {name: getattr(args, name) for name in params if hasattr(args, name) and name not in settings}


def _strategy_from_args(args: argparse.Namespace):
    from jaxae import parallel

    if args.distributed or any(v is not None for v in (args.coordinator, args.num_processes, args.process_id)):
        # Before anything touches a device: the backend must see every process.
        parallel.initialize_distributed(
            args.coordinator, args.num_processes, args.process_id, timeout=args.coordinator_timeout
        )
    return parallel.get_strategy(args.parallel)


def train_config(args: argparse.Namespace):
    """The :class:`~jaxae.TrainConfig` of ``jaxae train``'s flags (see :func:`jaxae.rundir.run_config`)."""
    from jaxae.config import given_settings
    from jaxae.rundir import run_config

    return run_config(
        given_settings(args, args.config_class),
        resume_from=args.workdir if args.resume else None,
        init_from=args.init_from,
        config_class=args.config_class,
    )


def cmd_train(args: argparse.Namespace) -> int:
    from jaxae.loop import fit

    if args.resume or args.init_from:
        # The checkpoint's settings are read through Orbax, which starts JAX: join the run first.
        strategy = _strategy_from_args(args)
        config = train_config(args)
    else:
        config = train_config(args)  # bad settings fail before waiting on the other processes
        strategy = _strategy_from_args(args)
    # A warning is one line on stderr, like an error (Python's own format adds the source line).
    # Only the display is swapped, not the filters (as catch_warnings would restore them): the
    # filters checkpoint.py adds against Orbax's shutdown noise must outlive this call.
    show = warnings.showwarning
    warnings.showwarning = lambda message, *_, **__: print(f"jaxae: warning: {message}", file=sys.stderr)
    try:
        result = fit(config, strategy=strategy, **_given_to(fit, args))
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
    watched = {k: last[k] for k in ("peak_device_bytes", "peak_host_bytes") if k in last}
    if result.history[result.start_epoch :]:
        watched["compile_seconds"] = round(result.compile_seconds, 3)
    print(
        json.dumps(
            {
                "workdir": args.workdir,
                "epochs": last["epoch"],
                "devices": strategy.device_count,
                "input": result.input,
                **summary,
                **watched,
            }
        )
    )
    return 0


def _sweep_configs_from_args(args: argparse.Namespace):
    from jaxae.config import given_settings, sweep_lists
    from jaxae.sweep import check_size, sweep_configs

    # Parsed here, not by argparse, so a bad list is the one-line error every other bad input gives.
    single, lists = sweep_lists(given_settings(args, args.config_class), args.config_class)
    base = args.config_class(**single)
    lists.setdefault("seed", [base.seed])
    # From the grid's size, before its configs are made: a grid far too large is refused at once.
    check_size(base, math.prod(len(v) for v in lists.values()), args.strategy)
    return sweep_configs(base, **{k: v for k, v in lists.items() if len(v) > 1 or k == "seed"})


def cmd_sweep(args: argparse.Namespace) -> int:
    from jaxae.sweep import fit_sweep

    configs = _sweep_configs_from_args(args)
    result = fit_sweep(configs, **_given_to(fit_sweep, args))
    if result.start_epoch >= configs[0].epochs:
        print(f"jaxae: {args.workdir} is already at epoch {result.start_epoch}; nothing to train", file=sys.stderr)
    summary = result.summary
    print(json.dumps({"workdir": args.workdir, **{k: summary[k] for k in ("models", "placement", "groups")}}))
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


def cmd_evaluate(args: argparse.Namespace) -> int:
    from jaxae.loop import evaluate_run

    out = evaluate_run(**_given_to(evaluate_run, args))
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


def cmd_convert(args: argparse.Namespace) -> int:
    from jaxae.convert.run import convert_checkpoint

    result = convert_checkpoint(**_given_to(convert_checkpoint, args))
    report = result.report
    if not result.passed:
        print(json.dumps(report, indent=2))
        print(
            f"jaxae: parity check failed: max abs difference {report['max_abs_diff_outputs']:.3g} (outputs), "
            f"{report['max_abs_diff_parameters']:.3g} (parameters), above --tolerance {args.tolerance:g}; "
            f"nothing written to {args.out}",
            file=sys.stderr,
        )
        return 1
    if report is not None:
        print(json.dumps({**result.summary, **report}, indent=2))
    else:
        print(json.dumps(result.summary))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from jaxae.convert.run import export_checkpoint

    print(json.dumps(export_checkpoint(**_given_to(export_checkpoint, args))))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from jaxae import bench, torch_reference

    torch_reference.require_torch()
    return bench.main(args)


def build_parser(config_class: type | None = None) -> argparse.ArgumentParser:
    """The ``jaxae`` parser. ``config_class``: the settings of ``train`` and ``sweep`` (a
    :class:`~jaxae.TrainConfig` subclass adds its own; every flag is derived from the fields)."""
    from jaxae.config import TrainConfig, add_setting_flags

    config_class = config_class or TrainConfig
    parser = _OneLineErrorParser(
        prog="jaxae", description="JAX/Flax autoencoders: the PyTorch MNIST tutorial and its variants."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model; writes metrics, figures and a checkpoint to --workdir")
    add_setting_flags(p, config_class=config_class)
    _add_run_flags(p, "train")
    _add_parallel_flags(p)
    p.add_argument(
        "--input",
        choices=("auto", "memory", "stream"),
        default="auto",
        help="memory: the train split on the devices, each epoch one compiled scan (fastest); stream: the split "
        "stays on the host (plain IDX files memory-mapped) and the devices get a few steps of rows at a time, for "
        "data larger than their memory; auto: memory where the splits take at most half of the memory they would "
        "live in (a GPU's or TPU's; on CPU devices the host's available memory), saying so where it streams. The same "
        "numbers either way (default: %(default)s)",
    )
    p.add_argument(
        "--init-from",
        metavar="DIR",
        default=None,
        help="start from the parameters of the checkpoint in DIR (e.g. written by 'jaxae convert'), "
        "with a fresh optimizer state; the model's settings not given are its",
    )
    p.set_defaults(func=cmd_train, config_class=config_class)

    p = sub.add_parser(
        "sweep", help="train a grid of models (seeds, learning rates, loss weights) as one compiled program"
    )
    add_setting_flags(p, sweep=True, config_class=config_class)
    _add_run_flags(p, "sweep")
    p.add_argument(
        "--parallel",
        dest="strategy",
        choices=("auto", "none", "pmap", "shard"),
        default="auto",
        help="none: one device; otherwise every visible device: models spread over them when the grid has at "
        "least as many models as devices, else each model data-parallel (default: %(default)s)",
    )
    p.set_defaults(func=cmd_sweep, config_class=config_class)

    p = sub.add_parser("evaluate", help="print a trained model's test metrics as JSON")
    _add_checkpoint_flags(p)
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
    p.add_argument(
        "--generation",
        action="store_true",
        help="vae, iwae, vqvae: add a generation score (fd, real_fd, precision, recall) in the features of "
        "a classifier trained on the dataset's labels, cached in the workdir (not FID: see docs/results.md)",
    )
    p.add_argument(
        "--generation-samples",
        type=int,
        default=None,
        metavar="N",
        help="the generation score's samples and real images per set (default: the test split's size, at most 10000)",
    )
    add_setting_flags(p, only={"dtype": "the run's", "matmul_precision": "the run's"})
    p.set_defaults(func=cmd_evaluate)

    from jaxae.convert import DEFAULT_TOLERANCE

    p = sub.add_parser(
        "convert",
        help="a PyTorch state_dict (.pt/.pth/.safetensors) -> a checkpoint folder that evaluate and train accept",
    )
    p.add_argument(
        "source",
        metavar="MODEL.pt",
        help="torch.save(model.state_dict()) output, a training checkpoint (the tutorial's general checkpoint, "
        "a Lightning .ckpt) or a .safetensors file",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="a new folder for the checkpoint")
    from_tensors = "from the tensors; checked against them when given"
    model_settings = {
        "variant": "vae for a file with mean/logvar heads, else vanilla: a linear code",
        "arch": from_tensors,
        "hidden_dims": from_tensors,
        "latent_dim": from_tensors,
        "sparsity": "l1; give the code the model was trained with",
        "normalize": "unit; give the scaling the model was trained with: it is recorded, and --check uses it",
        "dataset": "mnist-sample; the image shape is read from it and --check uses its test split; with "
        "--image-shape and no --check, none: given later to evaluate and train",
        "tfds_data_dir": None,
    }
    add_setting_flags(p, config_class=config_class, only=model_settings)
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
        dest="optimizer_kind",
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
        "--image-shape",
        type=_image_shape_flag,
        default=None,
        metavar="H,W,C",
        help="the images the PyTorch model takes (it takes them NCHW); default: --dataset's; give it to "
        "convert without the dataset at hand",
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
    _add_checkpoint_flags(p)
    p.add_argument("--out", required=True, metavar="FILE", help="a new file to write, e.g. model.pt")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.add_argument(
        "--format",
        dest="fmt",
        choices=("torch", "safetensors"),
        default=None,
        help="torch (torch.save) or safetensors (default: safetensors if FILE ends in .safetensors, else torch)",
    )
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
    from jaxae.bench import add_arguments

    add_arguments(p)
    p.set_defaults(func=cmd_bench)
    return parser


def _resume_command(argv: Sequence[str]) -> str:
    import shlex

    return shlex.join(["jaxae", *argv, *([] if "--resume" in argv else ["--resume"])])


def main(argv: Sequence[str] | None = None, *, config_class: type | None = None) -> int:
    """Runs ``jaxae`` with ``argv``; returns its exit status. ``config_class``: see :func:`build_parser`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(config_class).parse_args(argv)
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
