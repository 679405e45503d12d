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

    model = jaxae.from_torch("autoencoder.pt")          # an nnx.Module: model(x), x float32 [N, 28, 28, 1]
    state_dict = jaxae.to_torch_state_dict(model)       # torch_model.load_state_dict(state_dict, strict=True)
    colour = jaxae.from_torch("cifar_ae.pt", image_shape=(32, 32, 3))  # model(x), x NHWC [N, 32, 32, 3]

PyTorch models take images NCHW (an MLP their ``x.view(N, -1)``: ``(c, h, w)`` order), jaxae's
NHWC (``(h, w, c)``): the weights that touch the image are reordered, exactly, both ways. The
image shape is read off the tensors where they determine it (784 inputs: 28x28x1); otherwise
it is given (``image_shape=``, ``--image-shape``).
"""

from jaxae.convert.files import (
    FORMATS,
    TORCH_LAYOUT_FILE,
    TorchFile,
    check_finite,
    check_output_file,
    nonfinite_counts,
    read_state_dict,
    read_torch_file,
    read_torch_layout,
    save_state_dict,
    save_torch_checkpoint,
    write_torch_layout,
)
from jaxae.convert.layouts import (
    INPUT_DIM,
    TWINS,
    ImageInput,
    InferredModel,
    ParamLink,
    TorchTwin,
    check_image_shape,
    check_state_dict,
    get_twin,
    infer_model,
    links_for,
    model_description,
    parse_renames,
    rename_keys,
    resolve_image_shape,
    strip_prefix,
    suggest_renames,
    supported_twins,
)
from jaxae.convert.optimizer import (
    lr_schedule_evidence,
    opt_state_from_torch,
    optimizer_parameter_groups,
    optimizer_settings,
    schedule_from_torch,
    torch_optimizer_state_dict,
)
from jaxae.convert.parity import DEFAULT_TOLERANCE, flax_outputs, parity_report, torch_outputs
from jaxae.convert.weights import (
    Match,
    fresh_model,
    from_torch,
    match,
    model_from_match,
    model_image_shape,
    params_from_torch,
    to_numpy_state_dict,
    to_torch_state_dict,
)

__all__ = [
    "DEFAULT_TOLERANCE",
    "FORMATS",
    "TORCH_LAYOUT_FILE",
    "INPUT_DIM",
    "TWINS",
    "ImageInput",
    "InferredModel",
    "Match",
    "ParamLink",
    "TorchFile",
    "TorchTwin",
    "check_finite",
    "check_image_shape",
    "check_output_file",
    "check_state_dict",
    "flax_outputs",
    "fresh_model",
    "from_torch",
    "get_twin",
    "infer_model",
    "links_for",
    "lr_schedule_evidence",
    "schedule_from_torch",
    "match",
    "model_description",
    "model_from_match",
    "model_image_shape",
    "nonfinite_counts",
    "opt_state_from_torch",
    "optimizer_parameter_groups",
    "optimizer_settings",
    "params_from_torch",
    "parity_report",
    "parse_renames",
    "read_state_dict",
    "read_torch_file",
    "read_torch_layout",
    "rename_keys",
    "resolve_image_shape",
    "save_state_dict",
    "save_torch_checkpoint",
    "strip_prefix",
    "suggest_renames",
    "supported_twins",
    "to_numpy_state_dict",
    "to_torch_state_dict",
    "torch_optimizer_state_dict",
    "torch_outputs",
    "write_torch_layout",
]
