"""The ``jaxae`` command: parse flags, call the library. Bad input -> one line on stderr, exit 2."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from jaxae.errors import JaxaeError, TrainingInterrupted


def _defaults():
    from jaxae.train import TrainConfig

    return TrainConfig()


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    d = _defaults()
    p.add_argument("--variant", default=d.variant, help="autoencoder variant (default: %(default)s)")
    p.add_argument(
        "--dataset",
        default=d.dataset,
        help="'mnist-sample' (embedded), a folder of MNIST-format IDX files, or a TFDS name "
        "such as mnist or fashion_mnist (default: %(default)s)",
    )
    p.add_argument("--tfds-data-dir", default=None, help="TFDS data directory (TFDS datasets only)")
    p.add_argument("--epochs", type=int, default=d.epochs, help="default: %(default)s")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch size (default: %(default)s)")
    p.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate (default: %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="default: %(default)s")
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
        type=lambda s: tuple(int(v) for v in s.split(",")),
        default=d.hidden_dims,
        help="encoder hidden widths, comma-separated; the decoder mirrors them (default: 128,64)",
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
    )


def cmd_train(args: argparse.Namespace) -> int:
    from jaxae.train import fit

    config = _config_from_args(args)
    result = fit(
        config,
        args.workdir,
        progress=not args.no_progress,
        resume=args.resume,
        save_every=args.save_every,
        keep=args.keep,
    )
    if result.start_epoch >= config.epochs:
        print(
            f"jaxae: {args.workdir} is already at epoch {result.start_epoch} (--epochs {config.epochs}); "
            "nothing to train. Raise --epochs to train longer",
            file=sys.stderr,
        )
    last = result.history[-1] if result.history else {"epoch": result.start_epoch}
    summary = {k: last[k] for k in last if k.startswith("test_")}
    print(json.dumps({"workdir": args.workdir, "epochs": last["epoch"], **summary}))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    import jax

    from jaxae import checkpoint
    from jaxae.data import load_dataset

    trainer, state, config = checkpoint.restore(args.workdir, args.step)
    test = load_dataset(config.dataset, "test", config.tfds_data_dir)
    images = jax.device_put(test.images.reshape(len(test), -1))
    metrics = trainer.jit_evaluate(state, images, batch_size=min(config.eval_batch_size, len(test)))
    out = {"step": int(state.step), "epoch": int(state.epoch), "dataset": config.dataset}
    out.update({f"test_{k}": float(v) for k, v in jax.device_get(metrics).items()})
    print(json.dumps(out))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxae", description="JAX/Flax autoencoders: the PyTorch MNIST tutorial and its variants."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model; writes metrics, figures and a checkpoint to --workdir")
    _add_train_flags(p)
    p.add_argument("--workdir", default="runs/latest", help="output folder (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
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

    p = sub.add_parser("evaluate", help="print a trained model's test metrics as JSON")
    p.add_argument("--workdir", required=True, help="a folder written by 'jaxae train'")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest complete one)")
    p.set_defaults(func=cmd_evaluate)
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
    except KeyboardInterrupt:
        print("jaxae: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
