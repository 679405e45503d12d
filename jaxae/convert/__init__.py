"""PyTorch files <-> jaxae models and runs: weights, Adam/AdamW state, a parity report.

The package, in the order a conversion goes:

* ``jaxae.convert.files``: reading what PyTorch users save (a bare ``state_dict``, the
  tutorial's general checkpoint, a Lightning ``.ckpt``, ``.safetensors``; ``torch.load`` only
  with ``weights_only=True``), and writing state_dicts and checkpoints back, atomically.
* ``jaxae.convert.layouts``: the twins' key maps (:data:`TWINS`, :class:`ParamLink`),
  ``--rename`` and prefix stripping (``module.``, ``_orig_mod.``, ``model.``), and reading the
  model (family, arch, sizes) off the tensors.
* ``jaxae.convert.weights``: :func:`match` (a file -> the model it fits), :func:`from_torch`,
  and Flax params -> state_dicts (:func:`to_torch_state_dict`).
* ``jaxae.convert.optimizer``: ``torch.optim.Adam``/``AdamW`` state <-> optax state.
* ``jaxae.convert.parity``: both frameworks' models on the same images (:func:`parity_report`).

::

    import jaxae

    model = jaxae.from_torch("autoencoder.pt")          # an nnx.Module: model(x), x float32 [N, 784]
    state_dict = jaxae.to_torch_state_dict(model)       # torch_model.load_state_dict(state_dict, strict=True)
"""

from jaxae.convert.files import (
    FORMATS,
    TorchFile,
    check_finite,
    check_output_file,
    nonfinite_counts,
    read_state_dict,
    read_torch_file,
    save_state_dict,
    save_torch_checkpoint,
)
from jaxae.convert.layouts import (
    INPUT_DIM,
    TWINS,
    InferredModel,
    ParamLink,
    TorchTwin,
    check_state_dict,
    get_twin,
    infer_model,
    links_for,
    model_description,
    parse_renames,
    rename_keys,
    strip_prefix,
    suggest_renames,
    supported_twins,
)
from jaxae.convert.optimizer import opt_state_from_torch, optimizer_settings, torch_optimizer_state_dict
from jaxae.convert.parity import DEFAULT_TOLERANCE, flax_outputs, parity_report, torch_outputs
from jaxae.convert.weights import (
    Match,
    fresh_model,
    from_torch,
    match,
    model_from_match,
    params_from_torch,
    to_numpy_state_dict,
    to_torch_state_dict,
)

__all__ = [
    "DEFAULT_TOLERANCE",
    "FORMATS",
    "INPUT_DIM",
    "TWINS",
    "InferredModel",
    "Match",
    "ParamLink",
    "TorchFile",
    "TorchTwin",
    "check_finite",
    "check_output_file",
    "check_state_dict",
    "flax_outputs",
    "fresh_model",
    "from_torch",
    "get_twin",
    "infer_model",
    "links_for",
    "match",
    "model_description",
    "model_from_match",
    "nonfinite_counts",
    "opt_state_from_torch",
    "optimizer_settings",
    "params_from_torch",
    "parity_report",
    "parse_renames",
    "read_state_dict",
    "read_torch_file",
    "rename_keys",
    "save_state_dict",
    "save_torch_checkpoint",
    "strip_prefix",
    "suggest_renames",
    "supported_twins",
    "to_numpy_state_dict",
    "to_torch_state_dict",
    "torch_optimizer_state_dict",
    "torch_outputs",
]
