"""``jaxae convert`` and ``jaxae export`` as library functions: a PyTorch file -> a checkpoint folder
and back. The command line only parses their flags and prints what they return.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from jaxae import checkpoint, convert
from jaxae.config import TrainConfig
from jaxae.convert.parity import DEFAULT_TOLERANCE
from jaxae.data import dataset_image_shape, load_dataset, shape_text
from jaxae.errors import JaxaeError
from jaxae.rundir import WorkdirLock, restore_for_dataset
from jaxae.train import build


@dataclasses.dataclass
class Conversion:
    """What :func:`convert_checkpoint` did: ``summary`` (None when the parity check failed and
    nothing was written), the parity ``report`` (None without ``check``), and whether it passed."""

    summary: dict[str, Any] | None
    report: dict[str, Any] | None
    passed: bool


def convert_checkpoint(
    source: str,
    out: str | Path,
    *,
    variant: str | None = None,
    arch: str | None = None,
    hidden_dims: tuple[int, ...] | None = None,
    latent_dim: int | None = None,
    image_shape: tuple[int, int, int] | None = None,
    dataset: str | None = None,
    tfds_data_dir: str | None = None,
    normalize: str = "unit",
    sparsity: str = "l1",
    rename: Sequence[str] = (),
    no_optimizer: bool = False,
    optimizer_kind: str | None = None,
    constant_lr: bool = False,
    allow_nonfinite: bool = False,
    check: bool = False,
    tolerance: float = DEFAULT_TOLERANCE,
    force: bool = False,
) -> Conversion:
    """``jaxae convert``: a PyTorch file -> a checkpoint folder ``out`` that ``evaluate`` and ``train`` accept.

    Everything is read and checked before anything is written; with ``check`` both models run
    on the test split, and a difference above ``tolerance`` writes nothing. The arguments are the
    command's flags (``jaxae convert --help``); ``optimizer_kind`` is ``--optimizer``.

    Returns:
        The :class:`Conversion`: what was written (``summary``) and the parity report.

    Raises:
        JaxaeError: a file, flag or folder that cannot be converted, in one line.
    """
    dataset = dataset
    if dataset is None and (image_shape is None or check):
        dataset = TrainConfig().dataset  # the images the shape is read from, or --check runs on
    base = TrainConfig(
        dataset=dataset,
        tfds_data_dir=tfds_data_dir,
        normalize=normalize,
        sparsity=sparsity,
    )
    if variant is not None:
        convert.get_twin(variant, arch or "mlp")
    if not tolerance >= 0:
        raise JaxaeError(f"--tolerance must be a non-negative number, got {tolerance}")
    out = Path(out)
    replacing = _check_convert_out(out, checkpoint.checkpoint_dir(out), force=force)
    # Everything is read and checked before anything is written. The converted run is for
    # --dataset: its images give the model's image shape, unless --image-shape says it.
    renames = convert.parse_renames(rename)
    image_shape, test = image_shape, None
    given_text = shape_text(image_shape or ())
    given_as, fix = "--image-shape is", "give the image shape the model was trained on"
    if image_shape is None or check:
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
        source,
        base,
        variant=variant,
        arch=arch,
        hidden_dims=hidden_dims,
        latent_dim=latent_dim,
        image_shape=image_shape,
        rename=renames,
        allow_nonfinite=allow_nonfinite,
        image_shape_given_as=given_as,
        image_shape_fix=fix,
    )
    file = found.file
    optimizer = None if no_optimizer else file.optimizer
    config = found.config
    schedule = carried = None
    if optimizer is not None:
        settings = convert.optimizer_settings(optimizer, source, optimizer_kind)
        schedule = convert.lr_schedule_evidence(file)
        if schedule and not constant_lr:
            carried = convert.schedule_from_torch(file, source)
            if carried is not None:  # the run's schedule, continued exactly
                settings = {**settings, **carried}
                schedule = None
        if schedule and not constant_lr:
            raise JaxaeError(
                f"{source} holds {schedule}: its learning rate followed a schedule, which jaxae cannot continue "
                f"(it trains at a constant --lr); pass --constant-lr to continue at the lr it had reached "
                f"({settings['lr']:g}), or --no-optimizer to convert the weights alone"
            )
        config = dataclasses.replace(config, **settings)
    convert.get_twin(config.variant, config.arch)
    trainer, state = build(config, found.image_shape)
    params = convert.params_from_torch(
        found.state_dict,
        state.params,
        config.variant,
        arch=config.arch,
        what=found.description,
        source=source,
        image_shape=found.image_shape,
    )
    run = {}
    # The file's parameter order (and its optimizer's groups), which export writes back.
    groups = [list(found.state_dict)]
    order_note = None
    if optimizer is not None:
        groups, order_note = convert.optimizer_parameter_groups(
            optimizer, found.state_dict, source, names=dict(zip(file.tensors, found.state_dict, strict=True))
        )
        links = convert.links_for(convert.get_twin(config.variant, config.arch), params, found.image_shape)
        opt_state, adam_step = convert.opt_state_from_torch(
            optimizer,
            [key for group in groups for key in group],
            links,
            trainer.tx,
            params,
            source,
            allow_nonfinite=allow_nonfinite,
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
    if check:
        report = convert.parity_report(
            found.state_dict, trainer.model(params), test.images, config, tolerance=tolerance
        )
        report = {"source": source, "dataset": config.dataset, "split": "test", **report}
        if not report["passed"]:
            return Conversion(summary=None, report=report, passed=False)  # nothing written

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
        "source": source,
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
    if carried:
        notes.append(
            f"CosineAnnealingLR(T_max={carried['schedule_steps']}) carried: --lr-schedule cosine --schedule-steps "
            f"{carried['schedule_steps']} at --lr {carried['lr']:g}, continuing at Adam's step"
        )
    if test is None and config.dataset is None:
        notes.append(
            f"image shape {given_text} from --image-shape; no dataset recorded: give --dataset to evaluate, "
            "and to train --resume (the first one given is recorded)"
        )
    elif test is None:
        notes.append(f"image shape {given_text} from --image-shape; the {config.dataset} images were not read")
    if notes:
        summary["notes"] = notes
    return Conversion(summary=summary, report=report, passed=True)


_CONVERT_FILES = ("config.json", "parity.json", "torch_layout.json")


def _only_a_conversion(out) -> bool:
    """Whether ``out`` holds an earlier conversion and nothing else: its files, one checkpoint, never trained."""
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


def export_checkpoint(
    workdir: str | Path,
    out: str | Path,
    *,
    step: int | None = None,
    fmt: str | None = None,
    with_optimizer: bool = False,
    force: bool = False,
) -> dict[str, Any]:
    """``jaxae export``: a checkpoint -> a PyTorch ``state_dict`` (``.pt``) or ``.safetensors`` file.

    A run converted from a PyTorch file goes back in that file's parameter order; with
    ``with_optimizer``, the tutorial's general checkpoint (model and ``torch.optim.Adam``/``AdamW``
    state, epoch, global step).

    Returns:
        The summary ``jaxae export`` prints: the file written, format, variant, arch, step, ...
    """
    fmt = fmt or ("safetensors" if Path(out).suffix == ".safetensors" else "torch")
    if with_optimizer and fmt != "torch":
        raise JaxaeError("--with-optimizer writes a torch.save checkpoint; give --format torch (a .pt file)")
    convert.check_output_file(out, overwrite=force)  # before the restore: fail before work
    _, meta = checkpoint.read_meta(workdir, step)
    if checkpoint.saved_image_shape(meta) is None:  # an older checkpoint: its dataset says the shape
        trainer, state, config = restore_for_dataset(workdir, step, need_dataset=False, optimizer=with_optimizer)
    else:
        trainer, state, config = checkpoint.restore(workdir, step, optimizer=with_optimizer)
    # the images the run's model takes; an older checkpoint's shape may be a flat size: then the
    # links read it off the parameters where they can
    image_shape = tuple(checkpoint.input_shape_of(state))
    image_shape = image_shape if len(image_shape) == 3 else None
    twin = convert.get_twin(config.variant, config.arch)
    links = convert.links_for(twin, state.params, image_shape)
    state_dict = convert.to_numpy_state_dict(state.params, config.variant, config.arch, image_shape)
    summary = {"format": fmt, "variant": config.variant, "arch": config.arch, "step": int(state.step)}
    # A run converted from a PyTorch file goes back in that file's order: its optimizer state is by position.
    layout = convert.read_torch_layout(workdir, list(state_dict))
    groups, named = None, False
    if layout is not None:
        order, groups, named = layout
        state_dict = {key: state_dict[key] for key in order}
        if order != [link.torch_key for link in links] or len(groups) > 1:
            summary["parameter_order"] = f"the converted file's ({convert.TORCH_LAYOUT_FILE})"
    if image_shape is not None:
        summary["image_shape"] = list(image_shape)
    if with_optimizer:
        from jaxae.torch_reference import require_torch

        torch = require_torch()
        optimizer = convert.torch_optimizer_state_dict(state.opt_state, links, config, groups, named=named)
        general = {
            "epoch": int(state.epoch),
            "global_step": int(state.step),
            "model_state_dict": {k: torch.from_numpy(v) for k, v in state_dict.items()},
            "optimizer_state_dict": optimizer,
        }
        notes = []
        if config.lr_schedule != "constant":
            general["scheduler_state_dict"], note = torch_scheduler_state(torch, workdir, config, state, optimizer)
            notes.append(note)
        path = convert.save_torch_checkpoint(general, out, overwrite=force)
        summary.update(epoch=int(state.epoch), optimizer=config.optimizer)
        if config.clip_grad_norm:
            notes.append(
                f"the run clips gradients (--clip-grad-norm {config.clip_grad_norm:g}): in torch, call "
                f"torch.nn.utils.clip_grad_norm_(model.parameters(), {config.clip_grad_norm:g}) before each step"
            )
        if notes:
            summary["notes"] = notes
    else:
        path = convert.save_state_dict(state_dict, out, fmt, overwrite=force)
    return {"out": str(path), **summary, "tensors": len(state_dict)}


def torch_scheduler_state(
    torch: Any, workdir: str | Path, config: TrainConfig, state: Any, optimizer: dict[str, Any]
) -> tuple[dict[str, Any], str]:
    """The rest of a run's learning-rate schedule as a ``torch.optim.lr_scheduler.CosineAnnealingLR``
    stepped once per batch: its ``state_dict()``, and a note on how to load it. ``optimizer``'s
    param_groups get the scheduler's ``initial_lr`` and the lr of the next step.

    ``cosine`` is ``CosineAnnealingLR(T_max=the run's steps, eta_min=0)``. A ``warmup_cosine`` run
    past its warm-up continues as ``CosineAnnealingLR(T_max=the steps after the warm-up)``; one
    still warming up has no torch scheduler of the same meaning (``LinearLR`` cannot start at 0)
    and is refused.

    Raises:
        JaxaeError: a run in its warm-up, or one that has not trained an epoch (its steps per
            epoch, which the schedule's length needs, are unknown).
    """
    from jaxae.train import _adam_count, learning_rate, schedule_length

    step, epoch = int(state.step), int(state.epoch)
    steps_per_epoch = step // epoch if epoch and step % epoch == 0 else None
    if steps_per_epoch is None and not config.schedule_steps:
        raise JaxaeError(
            f"{workdir} has not trained whole epochs (step {step}, epoch {epoch}), so its --lr-schedule "
            f"{config.lr_schedule}'s length is unknown: export the weights without --with-optimizer"
        )
    count = int(_adam_count(state.opt_state))  # the schedule's position: the updates done
    total = schedule_length(config, steps_per_epoch)
    start = config.warmup_steps if config.lr_schedule == "warmup_cosine" else 0
    if count < start:
        raise JaxaeError(
            f"{workdir} is in its warm-up (update {count} of --warmup-steps {start}), which no torch scheduler "
            "matches (torch's LinearLR cannot start at 0): export after the warm-up, or without --with-optimizer"
        )
    lr_now = learning_rate(config, steps_per_epoch, count)
    for group in optimizer["param_groups"]:
        group.update(lr=lr_now, initial_lr=config.lr)
    param = torch.nn.Parameter(torch.zeros(1))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        torch.optim.SGD([param], lr=config.lr), T_max=total - start, eta_min=0.0
    )
    scheduler_state = scheduler.state_dict()
    groups = len(optimizer["param_groups"])
    scheduler_state.update(
        last_epoch=count - start,
        _step_count=count - start + 1,
        base_lrs=[config.lr] * groups,
        _last_lr=[lr_now] * groups,
    )
    note = (
        f"scheduler_state_dict: torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max={total - start}), "
        f"stepped after every optimizer step; create it, then load_state_dict(checkpoint['scheduler_state_dict']) "
        f"(it is at step {count - start} of {total - start}, lr {lr_now:.6g})"
    )
    return scheduler_state, note
