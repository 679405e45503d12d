import os
import shutil
import signal
import tempfile

import numpy as np
import pytest

# One compilation cache for the whole session, this process and the real processes tests start:
# many tests compile the same small programs (the document's model on the sample), and XLA's
# compile is most of their time on a CPU (the suite takes 8 minutes with it, 9.5 without, on the
# project's 2-core machine). Fresh per session, so no run depends on an earlier one.
_XLA_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _XLA_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxae-test-xla-cache-")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


# Cases of parametrized tests that only `make test-all` runs (the tests marked slow): the other
# cases of the same test check the same property in `make test`, which must stay under 10
# minutes on the project's 2-core machine. Whole tests are marked where they are defined.
SLOW_CASES = {
    "test_checkpoint.py::test_sigint_sigterm_save_a_final_checkpoint_and_exit[SIGINT]",
    "test_colour.py::test_every_variant_trains_evaluates_probes_and_draws_in_colour[denoising-mlp]",
    "test_colour.py::test_every_variant_trains_evaluates_probes_and_draws_in_colour[iwae-mlp]",
    "test_colour.py::test_every_variant_trains_evaluates_probes_and_draws_in_colour[vae-mlp]",
    "test_colour.py::test_every_variant_trains_evaluates_probes_and_draws_in_colour[vqvae-mlp]",
    "test_colour.py::test_every_variant_trains_on_the_committed_tfds_data[denoising-mlp]",
    "test_colour.py::test_every_variant_trains_on_the_committed_tfds_data[iwae-mlp]",
    "test_colour.py::test_every_variant_trains_on_the_committed_tfds_data[vae-mlp]",
    "test_colour.py::test_every_variant_trains_on_the_committed_tfds_data[vqvae-mlp]",
    "test_convert.py::test_forward_outputs_match_on_the_whole_test_split[vanilla-conv-fresh-unit]",
    "test_stream.py::test_stream_and_memory_give_the_same_numbers_on_the_sample[vqvae]",
    "test_stream.py::test_stream_and_memory_give_the_same_numbers_on_the_sample[vae]",
    "test_convert.py::test_forward_outputs_match_on_the_whole_test_split[vqvae-conv-fresh-unit]",
    "test_convert.py::test_one_adam_step_matches_torch_optim_adam[vqvae-conv-unit]",
    "test_convert_run.py::test_cli_converts_a_colour_run_and_exports_it_back_exactly[mlp]",
    "test_objectives.py::test_every_variant_trains_and_lowers_its_loss[denoising-conv]",
    "test_objectives.py::test_every_variant_trains_and_lowers_its_loss[iwae-conv]",
    "test_objectives.py::test_every_variant_trains_and_lowers_its_loss[iwae-mlp]",
    "test_objectives.py::test_every_variant_trains_and_lowers_its_loss[vae-conv]",
    "test_objectives.py::test_every_variant_trains_and_lowers_its_loss[vanilla-conv]",
    "test_objectives.py::test_the_iw_bound_with_100000_samples_compiles_within_its_memory_budget[conv-image_shape1]",
    "test_precision.py::test_bfloat16_computes_in_bfloat16_and_keeps_parameters_state_and_loss_float32[vae-conv]",
    "test_precision.py::test_bfloat16_computes_in_bfloat16_and_keeps_parameters_state_and_loss_float32[vae-mlp]",
    "test_precision.py::test_bfloat16_computes_in_bfloat16_and_keeps_parameters_state_and_loss_float32[vanilla-conv]",
    "test_sweep.py::test_swept_loss_weights_give_the_train_step_of_each_config[denoising-values0]",
    "test_sweep.py::test_swept_loss_weights_give_the_train_step_of_each_config[vae-values2]",
    "test_train.py::test_smallest_allowed_images_train_and_draw_their_figures[vae-mlp-8-12]",
    "test_colour.py::test_every_variant_trains_evaluates_probes_and_draws_in_colour[vanilla-mlp]",
    "test_convert_run.py::test_colour_adam_state_converts_exactly_and_takes_torch_s_next_step[conv-image_shape1]",
    "test_sweep.py::test_swept_loss_weights_give_the_train_step_of_each_config[sparse-values1]",
    "test_convert.py::test_one_adam_step_matches_torch_optim_adam[iwae-conv-unit]",
    "test_models.py::test_patches_and_native_lowerings_give_the_same_outputs_and_gradients[ConvTranspose2x-3-5-shape6]",
    "test_convert.py::test_cli_convert_check_a_vae[conv]",
    "test_convert.py::test_torch_to_flax_to_torch_is_exact[vanilla-conv]",
    "test_convert.py::test_one_adam_step_matches_torch_optim_adam[vae-conv-unit]",
    "test_convert.py::test_one_adam_step_matches_torch_optim_adam[denoising-conv-unit]",
    "test_convert.py::test_any_image_shape_converts_exactly_both_ways[vanilla-mlp-16x16x3]",
    "test_objectives.py::test_the_iw_bound_with_100000_samples_compiles_within_its_memory_budget[conv-image_shape2]",
    "test_checkpoint.py::test_the_image_shape_is_saved_and_a_model_for_other_images_is_refused[conv]",
}


@pytest.hookimpl(tryfirst=True)  # before -m "not slow" deselects by the marks
def pytest_collection_modifyitems(config, items):
    found = set()
    for item in items:
        case = f"{item.path.name}::{item.name}"
        if case in SLOW_CASES:
            item.add_marker(pytest.mark.slow)
            found.add(case)
    # A renamed case would quietly move back into make test; when whole files were collected
    # (make test, make test-all), every case named here must exist.
    if not any("::" in arg for arg in config.args):
        files = {item.path.name for item in items}
        missing = sorted(case for case in SLOW_CASES - found if case.split("::")[0] in files)
        if missing:
            raise pytest.UsageError(f"tests/conftest.py SLOW_CASES names cases that do not exist: {missing}")


def pytest_sessionfinish(session, exitstatus):
    if _XLA_CACHE is not None:
        shutil.rmtree(_XLA_CACHE, ignore_errors=True)


from jaxae.data import load_dataset, write_idx  # noqa: E402 (after the cache settings: it imports JAX)


@pytest.fixture
def handled_sigint():
    """SIGINT handled as in an interactive Python while the test runs: a runner started in the
    background of a shell (``make test &``, nohup) ignores it, and a run then keeps it ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture(scope="session")
def sample_train():
    return load_dataset("mnist-sample", "train")


@pytest.fixture(scope="session")
def sample_test():
    return load_dataset("mnist-sample", "test")


@pytest.fixture
def idx_folder(tmp_path, sample_train, sample_test):
    """A small MNIST-format dataset folder: 512 train / 128 test real digits, uncompressed train."""
    rng = np.random.default_rng(0)
    tr = rng.choice(len(sample_train), 512, replace=False)
    te = rng.choice(len(sample_test), 128, replace=False)
    write_idx(tmp_path / "train-images-idx3-ubyte", sample_train.images[tr, :, :, 0])
    write_idx(tmp_path / "train-labels-idx1-ubyte", sample_train.labels[tr])
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", sample_test.images[te, :, :, 0])
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", sample_test.labels[te])
    return tmp_path
