"""jaxae: the PyTorch MNIST autoencoder tutorial and its variants in JAX/Flax NNX.

The public API, re-exported::

    import jaxae, optax
    from flax import nnx

    model = jaxae.Autoencoder(rngs=nnx.Rngs(0))
    trainer, state = jaxae.create_train_state(model, optax.adam(1e-3), "vanilla")
    images = jaxae.load_dataset("mnist-sample", "train").images
"""

from jaxae._version import __version__
from jaxae.convert import TWINS, from_torch, parity_report, read_state_dict, to_torch_state_dict
from jaxae.data import (
    NORMALIZATIONS,
    Dataset,
    Normalization,
    dataset_image_shape,
    get_normalization,
    load_dataset,
    read_idx,
    write_idx_folder,
)
from jaxae.errors import CheckpointSaveError, DataError, JaxaeError, TrainingInterrupted
from jaxae.generation import generation_score, train_classifier
from jaxae.loop import FitResult, fit
from jaxae.models import VAE, VQVAE, Autoencoder, ConvAutoencoder, ConvVAE, ConvVQVAE
from jaxae.objectives import VARIANTS, Objective, Variant, get_variant, importance_weighted_nll, reconstruction_mse
from jaxae.parallel import Strategy, get_strategy
from jaxae.probe import linear_probe
from jaxae.sweep import SweepResult, fit_sweep, sweep_configs
from jaxae.train import (
    TrainConfig,
    Trainer,
    TrainState,
    build,
    create_train_state,
    encode,
    sample_pixels,
    summarize_epoch,
)

__all__ = [
    "__version__",
    "VAE",
    "Autoencoder",
    "ConvAutoencoder",
    "ConvVAE",
    "VQVAE",
    "ConvVQVAE",
    "generation_score",
    "train_classifier",
    "sample_pixels",
    "Strategy",
    "get_strategy",
    "importance_weighted_nll",
    "linear_probe",
    "CheckpointSaveError",
    "DataError",
    "TrainingInterrupted",
    "Dataset",
    "FitResult",
    "JaxaeError",
    "NORMALIZATIONS",
    "Normalization",
    "Objective",
    "TrainConfig",
    "TrainState",
    "TWINS",
    "Trainer",
    "VARIANTS",
    "Variant",
    "build",
    "create_train_state",
    "dataset_image_shape",
    "encode",
    "fit",
    "from_torch",
    "get_normalization",
    "get_variant",
    "load_dataset",
    "parity_report",
    "read_idx",
    "read_state_dict",
    "reconstruction_mse",
    "summarize_epoch",
    "SweepResult",
    "fit_sweep",
    "sweep_configs",
    "to_torch_state_dict",
    "write_idx_folder",
]
