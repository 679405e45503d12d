"""Reading the files PyTorch users save, and writing them back.

Reading: a bare ``state_dict``, the tutorial's general checkpoint (``model_state_dict`` /
``optimizer_state_dict``, or ``model``/``optimizer``, ``state_dict``/``optimizer``), a
PyTorch Lightning ``.ckpt`` (``state_dict``, ``optimizer_states``, ``lr_schedulers``,
``epoch``, ``global_step``) and ``.safetensors``. The file kind is told by content, not by
name; ``.pt`` files are only read with ``torch.load(..., weights_only=True)``, so a file that
would run code when unpickled is refused, not run.

Writing: :func:`save_state_dict` and :func:`save_torch_checkpoint`, each file complete or absent.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import pickle
import re
import struct
import tempfile
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jaxae import torch_reference
from jaxae.errors import JaxaeError

FORMATS = ("torch", "safetensors")
# Where general checkpoints keep the model's and the optimizer's state_dicts, in the spellings
# people use (the tutorial's first); the model's is the first of these that holds only tensors.
_MODEL_KEYS = ("model_state_dict", "state_dict", "model")
_OPTIMIZER_KEYS = ("optimizer_state_dict", "optimizer", "optim", "optimizer_state")
_SCHEDULER_KEYS = ("scheduler_state_dict", "scheduler", "lr_scheduler", "lr_scheduler_state_dict", "lr_schedulers")


@dataclasses.dataclass
class TorchFile:
    """What a PyTorch file holds, read.

    Attributes:
        tensors: the model's state_dict as float32 numpy arrays, in file order (which is the
            order of ``model.parameters()`` for models without buffers).
        container: what the file is, for messages and summaries (e.g. ``"a Lightning checkpoint"``).
        source: the path, or ``"the state_dict"``.
        optimizer: the optimizer's ``state_dict()`` as saved, or None.
        epoch: completed epochs, if the file records them.
        step: the optimizer steps taken (Lightning's ``global_step``), if the file records them.
        scheduler: the key holding a learning-rate scheduler's state, if any (one of the usual names,
            or any key whose value is a scheduler's ``state_dict()``).
        scheduler_state: that scheduler's ``state_dict()`` (None: none, or Lightning's several).
        notes: how epoch and step were read, for the summary.
    """

    tensors: dict[str, np.ndarray]
    container: str
    source: str
    optimizer: Mapping | None = None
    epoch: int | None = None
    step: int | None = None
    scheduler: str | None = None
    scheduler_state: Mapping | None = None
    notes: list[str] = dataclasses.field(default_factory=list)


def read_torch_file(source: str | os.PathLike | Mapping[str, Any], *, allow_nonfinite: bool = False) -> TorchFile:
    """Reads a PyTorch file (or an in-memory checkpoint dict) into a :class:`TorchFile`.

    Args:
        source: a ``.pt``/``.pth``/``.ckpt``/``.safetensors`` file (the kind is told by content),
            or a mapping (a state_dict or a checkpoint dict).
        allow_nonfinite: accept tensors holding NaN or Inf (refused by default: a model with
            them computes NaN, and some fused kernels hide that behind a finite loss).

    Raises:
        JaxaeError: a missing, truncated, hostile or non-torch file, a dict without a
            state_dict, non-float values, or (unless ``allow_nonfinite``) NaN or Inf values.
    """
    if isinstance(source, Mapping):
        where, obj = "the state_dict", source
    else:
        path = Path(source)
        where = str(path)
        if not path.is_file():
            raise JaxaeError(
                f"{path} does not exist (or is not a file); give a .pt/.pth/.ckpt state_dict or checkpoint, "
                "or a .safetensors file"
            )
        kind = _file_kind(path)
        if kind == "safetensors":
            tensors = _as_float32_arrays(_read_safetensors(path), where)
            if not allow_nonfinite:
                check_finite(tensors, where)
            return TorchFile(tensors, "a safetensors file", where)
        if kind != "torch":
            raise JaxaeError(
                f"{path} is neither a PyTorch file (written by torch.save) nor a safetensors file; "
                "save the model with torch.save(model.state_dict(), 'model.pt')"
            )
        obj = _read_torch(path)
    found = _container(obj, where)
    found.tensors = _as_float32_arrays(found.tensors, where)
    if not allow_nonfinite:
        check_finite(found.tensors, where)
    return found


def read_state_dict(
    source: str | os.PathLike | Mapping[str, Any], *, allow_nonfinite: bool = False
) -> dict[str, np.ndarray]:
    """A state_dict from a file or a mapping, as float32 numpy arrays (keys in file order).

    A checkpoint (general or Lightning) gives its model's state_dict; see :func:`read_torch_file`.

    Raises:
        JaxaeError: as :func:`read_torch_file`.
    """
    return read_torch_file(source, allow_nonfinite=allow_nonfinite).tensors


def _listed(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _is_tensor(value: Any) -> bool:
    return hasattr(value, "detach") or isinstance(value, np.ndarray)


def _all_tensors(mapping: Any) -> bool:
    return isinstance(mapping, Mapping) and len(mapping) > 0 and all(_is_tensor(v) for v in mapping.values())


# A jaxae state counts steps and epochs in int32.
MAX_COUNT = 2**31 - 1


def _count(value: Any, name: str, where: str) -> int | None:
    """An epoch or step count the file records, or None where it records none (or a negative one).

    Raises:
        JaxaeError: a count that is not a whole number, or one past what a jaxae state holds.
    """
    if hasattr(value, "item"):
        value = value.item()
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
        return None
    if not (math.isfinite(value) and value == int(value)):
        raise JaxaeError(f"{where}: its {name} is {value!r}, not a whole number; save the count of completed {name}s")
    if value > MAX_COUNT:
        raise JaxaeError(
            f"{where}: its {name} is {int(value)}, past the {MAX_COUNT} (2**31 - 1) a jaxae checkpoint counts; "
            f"save the real count of completed {name}s"
        )
    return int(value)


def _container(obj: Mapping, where: str) -> TorchFile:
    """Tells a bare state_dict, a general checkpoint and a Lightning checkpoint apart."""
    if not obj or all(_is_tensor(v) for v in obj.values()) or not any(isinstance(v, Mapping) for v in obj.values()):
        # a state_dict (non-tensor values are named by _as_float32_arrays)
        return TorchFile(dict(obj), "a state_dict", where)
    if "optimizer_states" in obj or "pytorch-lightning_version" in obj:
        return _lightning(obj, where)
    model_key = next((k for k in _MODEL_KEYS if _all_tensors(obj.get(k))), None)
    if model_key is None:
        keys = ", ".join(repr(k) for k in list(obj)[:8])
        held = next((k for k in _MODEL_KEYS if k in obj), None)
        if held is not None:  # the key is there, holding something else
            value = obj[held]
            if value is None:
                what = "None"
            elif isinstance(value, Mapping):
                what = "a dict that is not all tensors" if value else "an empty dict"
            else:
                what = f"a {type(value).__name__}"
            raise JaxaeError(
                f"{where} is a dict ({keys}) whose {held!r} holds {what}, not a model state_dict; "
                f"save one with torch.save({{{held!r}: model.state_dict(), ...}}, PATH)"
            )
        raise JaxaeError(
            f"{where} is a dict ({keys}) without a model state_dict under {', '.join(_MODEL_KEYS)}; "
            "save one with torch.save({'model_state_dict': model.state_dict(), ...}, PATH)"
        )
    optimizer_key = next((k for k in _OPTIMIZER_KEYS if isinstance(obj.get(k), Mapping)), None)
    found = TorchFile(
        dict(obj[model_key]),
        f"a general checkpoint ({model_key!r}" + (f", {optimizer_key!r})" if optimizer_key else ")"),
        where,
        optimizer=obj[optimizer_key] if optimizer_key else None,
        epoch=_count(obj.get("epoch"), "epoch", where),
        step=_count(obj.get("global_step", obj.get("step")), "step", where),
        scheduler=next((k for k in _SCHEDULER_KEYS if obj.get(k)), None)
        or next((k for k, v in obj.items() if _is_scheduler_state(v)), None),
    )
    if found.scheduler is not None:
        found.scheduler_state = _one_scheduler_state(obj[found.scheduler])
    if found.epoch is not None:
        found.notes.append(f"epoch {found.epoch} read as completed epochs")
    return found


def _is_scheduler_state(value: Any) -> bool:
    """Whether ``value`` is a ``torch.optim.lr_scheduler`` state_dict, under whatever key it was saved."""
    return (
        isinstance(value, Mapping) and "last_epoch" in value and bool({"base_lrs", "_last_lr", "min_lrs"} & set(value))
    )


def _one_scheduler_state(value: Any) -> Mapping | None:
    """A scheduler's state_dict, or the one of a list of them (Lightning's ``lr_schedulers``)."""
    if isinstance(value, (list, tuple)) and len(value) == 1:
        value = value[0]
    return value if _is_scheduler_state(value) else None


def _lightning(obj: Mapping, where: str) -> TorchFile:
    if not _all_tensors(obj.get("state_dict")):
        raise JaxaeError(f"{where} looks like a Lightning checkpoint but has no 'state_dict' of tensors")
    optimizers = obj.get("optimizer_states") or []
    if len(optimizers) > 1:
        raise JaxaeError(
            f"{where} holds {len(optimizers)} optimizers (Lightning optimizer_states); converting supports one"
        )
    found = TorchFile(
        dict(obj["state_dict"]),
        "a Lightning checkpoint",
        where,
        optimizer=optimizers[0] if optimizers else None,
        step=_count(obj.get("global_step"), "step", where),
        scheduler="lr_schedulers" if obj.get("lr_schedulers") else None,
        scheduler_state=_one_scheduler_state(obj.get("lr_schedulers")),
    )
    completed = _lightning_completed_epochs(obj, where)
    epoch = _count(obj.get("epoch"), "epoch", where)
    if completed is not None:
        found.epoch = completed
        found.notes.append(f"epoch {completed}: the completed epochs of Lightning's fit loop")
    elif epoch is not None:
        # Lightning saves the 0-based index of the epoch it was in (ModelCheckpoint writes
        # epoch=0-step=N.ckpt after the first epoch): at an epoch end that is one fewer than done.
        found.epoch = epoch + 1
        found.notes.append(f"epoch {epoch + 1}: Lightning's 0-based epoch {epoch}, saved at its end")
    return found


def _lightning_completed_epochs(obj: Mapping, where: str) -> int | None:
    try:
        completed = obj["loops"]["fit_loop"]["epoch_progress"]["current"]["completed"]
    except (KeyError, TypeError):
        return None
    return _count(completed, "epoch", where)


def nonfinite_counts(array: np.ndarray) -> tuple[int, int]:
    """``(NaN count, Inf count)`` of ``array`` (+Inf and -Inf together)."""
    return int(np.count_nonzero(np.isnan(array))), int(np.count_nonzero(np.isinf(array)))


def check_finite(state_dict: Mapping[str, np.ndarray], where: str) -> None:
    """Raises :class:`JaxaeError` naming the tensors of ``state_dict`` that hold NaN or Inf.

    Checked on the float32 arrays, so a float64 value too large for float32 counts as Inf,
    as it would in the converted model.
    """
    bad = []
    for key, array in state_dict.items():
        nan, inf = nonfinite_counts(array)
        if nan or inf:
            counts = " and ".join(f"{n} {name}" for n, name in ((nan, "NaN"), (inf, "Inf")) if n)
            bad.append(f"{key} has {counts} of {array.size} values")
    if bad:
        raise JaxaeError(
            f"{where}: {_listed(bad, limit=3)}; a model with non-finite weights computes NaN. "
            "Pass --allow-nonfinite (allow_nonfinite=True) to convert it anyway"
        )


def _file_kind(path: Path) -> str | None:
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        # torch.save writes a zip archive; its legacy format and raw pickles start with PROTO.
        return "torch"
    if len(head) == 9 and head[8:9] == b"{":
        (header_len,) = struct.unpack("<Q", head[:8])
        if header_len <= path.stat().st_size - 8:
            return "safetensors"
    return None


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__


def _read_torch(path: Path) -> Any:
    torch = torch_reference.require_torch()
    try:
        with warnings.catch_warnings():
            # e.g. "Detected pickle protocol 4": the error below says all there is to say.
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        what = f"it references {found.group(1)}" if found else "it holds pickle content beyond tensors"
        raise JaxaeError(
            f"refused to load {path}: {what}, which a weights-only load does not build because "
            "unpickling it could run code; save the weights alone with torch.save(model.state_dict(), PATH)"
        ) from None
    except Exception as e:
        # torch.load reports a damaged file as RuntimeError, EOFError, KeyError, ValueError, ...
        raise JaxaeError(f"cannot read {path} as a PyTorch file (truncated or corrupt?): {_first_line(e)}") from None
    if not isinstance(obj, Mapping):
        raise JaxaeError(
            f"{path} holds a {type(obj).__name__}, not a state_dict (a dict of tensors); "
            "save one with torch.save(model.state_dict(), PATH)"
        )
    return obj


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    try:
        import safetensors.numpy
    except ImportError:
        raise JaxaeError(
            f"reading {path} needs safetensors, which is not installed: {torch_reference.INSTALL_HINT}"
        ) from None
    try:
        return safetensors.numpy.load_file(path)
    except Exception as e:
        # SafetensorError for a bad header, TypeError/ValueError for dtypes numpy lacks.
        raise JaxaeError(
            f"cannot read {path} as a safetensors file (truncated or corrupt?): {_first_line(e)}"
        ) from None


def _torch_float32(tensor: Any, key: str, where: str) -> np.ndarray:
    if not tensor.is_floating_point():
        raise JaxaeError(f"{where}: {key} holds {tensor.dtype} values; expected floating-point weights")
    if str(tensor.layout) != "torch.strided":
        raise JaxaeError(f"{where}: {key} is a {tensor.layout} tensor; expected dense weights (save tensor.to_dense())")
    try:
        return tensor.detach().cpu().float().numpy()
    except (TypeError, RuntimeError, ValueError, NotImplementedError) as e:  # a meta or nested tensor: no values
        raise JaxaeError(f"{where}: {key} cannot be read as a dense float tensor: {_first_line(e)}") from None


def _as_float32_arrays(tensors: Mapping, where: str) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for key, value in tensors.items():
        if not isinstance(key, str):
            raise JaxaeError(f"{where} has a non-string key {key!r}; a state_dict maps names to tensors")
        if not key.isprintable():  # no module has such a name, and it would break one-line messages
            raise JaxaeError(
                f"{where} has a key {key!r} with unprintable characters; a state_dict maps names to tensors"
            )
        if hasattr(value, "detach"):  # a torch.Tensor; no torch import needed to recognise it
            value = _torch_float32(value, key, where)
        elif isinstance(value, np.ndarray):
            # ml_dtypes' bfloat16 and float8 (from safetensors) are floats numpy does not class as such
            if not (np.issubdtype(value.dtype, np.floating) or value.dtype.name.startswith(("bfloat16", "float8"))):
                raise JaxaeError(f"{where}: {key} holds {value.dtype} values; expected floating-point weights")
        else:
            raise JaxaeError(f"{where}: {key} holds a {type(value).__name__}, not a tensor")
        out[key] = np.array(value, dtype=np.float32, copy=True)
    return out


def check_output_file(path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Raises :class:`JaxaeError` unless a state_dict can be written to ``path``.

    Checked before any work, so a bad ``--out`` fails at once: ``path`` must not be a folder,
    must not exist unless ``overwrite``, and its nearest existing parent must be a folder.
    Whether the folder is writable shows when the file is written (:func:`save_state_dict`).
    """
    path = Path(path)
    if path.is_dir():
        raise JaxaeError(f"--out {path} is a folder; give a file name such as {path / 'model.pt'}")
    if path.exists() and not overwrite:
        raise JaxaeError(f"--out {path} already exists; give a new file name, or pass --force to overwrite it")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise JaxaeError(f"cannot write --out {path}: {parent} is a file, not a folder; give a path in a folder")
    return path


def _publish(tmp: str, path: Path, overwrite: bool) -> None:
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        # A hard link fails if the name exists: a file that appeared since the check is kept.
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links
        if path.exists():
            raise FileExistsError(path) from None
        os.replace(tmp, path)


def save_state_dict(
    state_dict: Mapping[str, np.ndarray], path: str | os.PathLike, fmt: str = "torch", *, overwrite: bool = False
) -> Path:
    """Writes a numpy state_dict as ``torch.save`` output (``fmt="torch"``) or safetensors.

    The file appears complete or not at all (written to a temporary name, then renamed).

    Args:
        state_dict: name -> numpy array.
        path: the file to write; its folder is created if missing.
        fmt: ``"torch"`` or ``"safetensors"``.
        overwrite: replace an existing file (refused by default: it may be the only copy of a model).

    Raises:
        JaxaeError: an unknown format, a folder or an existing file at ``path``, or a location
            that cannot be written (read-only, no permission, a file where a folder should be).
    """
    if fmt not in FORMATS:
        raise JaxaeError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "torch":
        torch = torch_reference.require_torch()

        def write(tmp: str) -> None:
            torch.save(collections.OrderedDict((k, torch.from_numpy(v)) for k, v in state_dict.items()), tmp)

    else:
        try:
            import safetensors.numpy
        except ImportError:
            raise JaxaeError(f"writing safetensors needs safetensors: {torch_reference.INSTALL_HINT}") from None

        def write(tmp: str) -> None:
            # metadata {"format": "pt"} is what Hugging Face loaders expect of a torch state_dict.
            safetensors.numpy.save_file(dict(state_dict), tmp, metadata={"format": "pt"})

    return _save(write, path, overwrite)


def _save(write: Callable[[str], None], path: str | os.PathLike, overwrite: bool) -> Path:
    """Runs ``write(tmp)`` on a temporary file next to ``path``, then publishes it as ``path``."""
    path = check_output_file(path, overwrite=overwrite)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            write(tmp)
        except OSError:
            raise
        except Exception as e:  # torch's zip writer reports a failed write (a full disk) as RuntimeError
            raise OSError(_first_line(e)) from None
        _publish(tmp, path, overwrite)
    except FileExistsError:
        raise JaxaeError(
            f"--out {path} already exists; give a new file name, or pass --force to overwrite it"
        ) from None
    except OSError as e:
        raise JaxaeError(f"cannot write --out {path}: {e.strerror or e}; give a writable location") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return path


def save_torch_checkpoint(obj: Mapping[str, Any], path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Writes ``obj`` (a dict of tensors, numbers and dicts) with ``torch.save``, complete or not at all.

    Raises:
        JaxaeError: as :func:`save_state_dict`.
    """
    torch = torch_reference.require_torch()
    return _save(lambda tmp: torch.save(obj, tmp), path, overwrite)


# Beside a converted checkpoint: the PyTorch file's parameter order, which export writes back.
TORCH_LAYOUT_FILE = "torch_layout.json"


def write_torch_layout(
    folder: str | os.PathLike, state_dict_keys: list[str], optimizer_groups: list[list[str]], *, named: bool = False
) -> Path:
    """Records a converted file's order: its ``state_dict`` keys, and its optimizer's parameter groups.

    A torch optimizer's state is by position, so it loads back only into an optimizer whose
    parameters come in the same order and groups (a model that registers ``decoder`` before
    ``encoder``, ``[{"params": decoder}, {"params": encoder}]``): ``jaxae export`` writes them so.
    ``named``: the optimizer saved its ``param_names``, and export writes them too.
    """
    path = Path(folder) / TORCH_LAYOUT_FILE
    tmp = path.with_name(path.name + ".tmp")
    record = {"state_dict_keys": state_dict_keys, "optimizer_groups": optimizer_groups, "param_names": named}
    tmp.write_text(json.dumps(record) + "\n")
    os.replace(tmp, path)
    return path


def read_torch_layout(folder: str | os.PathLike, keys: list[str]) -> tuple[list[str], list[list[str]], bool] | None:
    """The order :func:`write_torch_layout` recorded for a model with these state_dict ``keys``
    (state_dict keys, optimizer groups, whether they were named); None if none.

    Raises:
        JaxaeError: a record that cannot be read, or that does not list ``keys`` each once.
    """
    path = Path(folder) / TORCH_LAYOUT_FILE
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
        order, groups = list(record["state_dict_keys"]), [list(g) for g in record["optimizer_groups"]]
        named = bool(record.get("param_names", False))
        valid = sorted(order) == sorted(keys) and sorted(k for g in groups for k in g) == sorted(keys)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise JaxaeError(
            f"cannot read {path} ({type(e).__name__}); restore it, or delete it to export in jaxae's order"
        ) from None
    if not valid:
        raise JaxaeError(
            f"{path} does not list this model's parameters, each once; restore it, or delete it to export in "
            "jaxae's order"
        )
    return order, groups, named
