"""Parity of every PyTorch twin with its jaxae model, on fresh and on PyTorch-trained weights.

Command:   .venv/bin/python experiments/twin_parity.py [--steps 320]
Runtime:   about 2 minutes on a 2-core CPU (most of it PyTorch training the conv twins).
Expected:  for every (variant, arch) of jaxae.TWINS, and the sparse variant's KL code:
           reconstructions of the 1,000 test digits 6e-8 apart on fresh weights, up to ~2e-6 on
           trained ones; codes and VAE heads ~1e-6 relative to their size; gradients of each
           variant's own loss (its noise fixed) about as far apart as PyTorch against itself
           with the batch rows permuted (up to 2e-5 where the VAEs' gradients reach 10), except
           the trained denoising conv model, where one pre-activation within 1e-7 of 0 passes
           the ReLU in JAX's float32 only (4e-6); one Adam step <= ~1e-7 wherever the gradient
           is >= 1e-6 (100 eps; 1e-5 in that model), more where it is within rounding of 0.
Writes:    experiments/results/twin_parity.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from flax import nnx

import jaxae
from jaxae import convert, torch_reference
from jaxae.data import get_normalization
from jaxae.models import gaussian_sample
from jaxae.train import TrainConfig

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "twin_parity.json"
CASES = [TrainConfig(variant=v, arch=a) for v, a in jaxae.TWINS] + [TrainConfig(variant="sparse", sparsity="kl")]
BATCH = 256


def case_name(config: TrainConfig) -> str:
    return f"{config.variant}-{config.arch}" + ("-kl" if config.variant == "sparse" and config.sparsity == "kl" else "")


def numpy_state_dict(module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def normalized(images_u8: np.ndarray, preset: str) -> np.ndarray:
    return jaxae.NORMALIZATIONS[preset].table[images_u8.reshape(len(images_u8), -1)]


def twin(config: TrainConfig, seed: int, weights: dict | None = None):
    torch.manual_seed(seed)
    module = jaxae.TWINS[(config.variant, config.arch)].torch_module(config, (28, 28, 1))
    if weights is not None:
        module.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    return module


def train_in_torch(config: TrainConfig, images: np.ndarray, steps: int) -> dict[str, np.ndarray]:
    """``steps`` Adam(1e-3) steps of the variant's own loss, batches of 256, PyTorch's noise."""
    module = twin(config, seed=1)
    opt = torch.optim.Adam(module.parameters(), lr=1e-3)
    data = torch.from_numpy(normalized(images, config.normalize))
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = torch.randint(len(data), (BATCH,), generator=g)
        opt.zero_grad()
        torch_reference.variant_loss(module, data[ids], config).backward()
        opt.step()
    return numpy_state_dict(module)


def fixed_noise(config: TrainConfig, objective, x: np.ndarray, keys) -> dict[str, np.ndarray]:
    if config.variant == "denoising":
        return {"noisy": np.array(objective.corrupt(jnp.asarray(x), keys))}
    if config.variant == "vae":
        zeros = jnp.zeros((len(x), config.latent_dim), jnp.float32)
        return {"eps": np.array(jax.vmap(gaussian_sample)(keys, zeros, zeros))}
    return {}


def torch_step(config, weights, x, noise):
    """Gradients and one Adam step in PyTorch from ``weights`` on ``x``."""
    module = twin(config, 0, weights)
    opt = torch.optim.Adam(module.parameters(), lr=1e-3)
    loss = torch_reference.variant_loss(
        module, torch.from_numpy(x), config, **{k: torch.from_numpy(v) for k, v in noise.items()}
    )
    loss.backward()
    grads = {k: p.grad.numpy().copy() for k, p in module.named_parameters()}
    opt.step()
    return loss.item(), grads, numpy_state_dict(module)


def max_diff(a: dict, b: dict) -> float:
    return max(float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) for k in a)


def max_rel_diff(a: dict, b: dict) -> float:
    """The largest difference relative to its parameter's largest value (floored at 1)."""
    return max(float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) / max(1.0, float(np.abs(b[k]).max())) for k in a)


def adam_diffs(after: dict, reference: dict, grads: dict) -> tuple[float, float]:
    """(max over elements whose gradient is >= 1e-6 (100 eps), max over all)."""
    firm = max(
        float(np.max(np.abs(after[k].astype(np.float64) - reference[k])[np.abs(grads[k]) >= 1e-6], initial=0.0))
        for k in after
    )
    return firm, max_diff(after, reference)


def measure(config: TrainConfig, weights: dict, train: np.ndarray, test: np.ndarray) -> dict:
    module = twin(config, 0, weights)
    model = jaxae.from_torch(weights, config=config)
    report = jaxae.parity_report(weights, model, test, config)
    x_test = normalized(test, config.normalize)
    with torch.no_grad():
        xt = torch.from_numpy(x_test)
        if config.variant == "vae":
            mean, logvar = module.encode_distribution(xt)
            torch_codes = {"mean": mean.numpy(), "logvar": logvar.numpy()}
        else:
            torch_codes = {"code": getattr(module, "encode", module.encoder)(xt).numpy()}
    flax_codes = jax.jit(
        lambda m, x: (
            dict(zip(("mean", "logvar"), m.encode_distribution(x), strict=True))
            if config.variant == "vae"
            else {"code": m.encode(x)}
        )
    )(model, jnp.asarray(x_test))
    flax_codes = {k: np.asarray(v) for k, v in flax_codes.items()}

    # gradients and one Adam step of the variant's loss, its noise drawn by jaxae for both
    batch = train[:BATCH]
    x = normalized(batch, config.normalize)
    objective = jaxae.get_variant(config.variant).build_objective(config, get_normalization(config.normalize))
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.key(11), jnp.arange(len(x)))
    noise = fixed_noise(config, objective, x, keys)
    loss, grads, stepped = torch_step(config, weights, x, noise)
    perm = np.random.default_rng(0).permutation(len(x))
    _, grads_perm, stepped_perm = torch_step(config, weights, x[perm], {k: v[perm] for k, v in noise.items()})

    graphdef, params = nnx.split(model)
    jax_grads = jax.jit(jax.grad(lambda p, x: jnp.mean(objective.loss(nnx.merge(graphdef, p), x, keys)[0])))(
        params, jnp.asarray(x)
    )
    jax_grads = convert.to_numpy_state_dict(nnx.to_pure_dict(jax_grads), config.variant, config.arch)
    fixed = dataclasses.replace(objective, loss=lambda m, x, _: objective.loss(m, x, keys))
    trainer, state = jaxae.create_train_state(model, optax.adam(1e-3), fixed, config.normalize)
    state, metrics = trainer.jit_train_step(state, jnp.asarray(batch))
    jax_stepped = convert.to_numpy_state_dict(state.params, config.variant, config.arch)
    adam_firm, adam_all = adam_diffs(jax_stepped, stepped, grads)
    self_firm, self_all = adam_diffs(stepped_perm, stepped, grads)
    return {
        "outputs_max_abs_diff": report["max_abs_diff_outputs"],
        "outputs_mean_abs_diff": report["mean_abs_diff_outputs"],
        "parameters_max_abs_diff": report["max_abs_diff_parameters"],
        "codes_max_abs_diff": {k: float(np.max(np.abs(flax_codes[k] - torch_codes[k]))) for k in torch_codes},
        "codes_max_abs": {k: float(np.max(np.abs(torch_codes[k]))) for k in torch_codes},
        "mse_torch": report["mse_torch"],
        "mse_flax": report["mse_flax"],
        "loss_torch": loss,
        "loss_flax": float(metrics["loss"]),
        "largest_gradient": max(float(np.abs(g).max()) for g in grads.values()),
        "gradients_max_abs_diff": max_diff(jax_grads, grads),
        "gradients_max_rel_diff": max_rel_diff(jax_grads, grads),
        "gradients_torch_rows_permuted_max_abs_diff": max_diff(grads_perm, grads),
        "adam_step_max_abs_diff_where_grad_ge_1e-6": adam_firm,
        "adam_step_max_abs_diff": adam_all,
        "adam_step_torch_rows_permuted": {"where_grad_ge_1e-6": self_firm, "all": self_all},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--steps",
        type=int,
        default=320,
        help="PyTorch training steps for the trained weights (320: 20 epochs of the sample)",
    )
    args = parser.parse_args()
    train = jaxae.load_dataset("mnist-sample", "train").images
    test = jaxae.load_dataset("mnist-sample", "test").images
    results = {}
    with jax.default_matmul_precision("highest"):
        for config in CASES:
            t0 = time.perf_counter()
            fresh = numpy_state_dict(twin(config, seed=0))
            trained = train_in_torch(config, train, args.steps)
            results[case_name(config)] = {
                "fresh": measure(config, fresh, train, test),
                f"trained_{args.steps}_steps": measure(config, trained, train, test),
            }
            print(case_name(config), f"{time.perf_counter() - t0:.0f}s", json.dumps(results[case_name(config)]))
    summary = {
        "dataset": "mnist-sample",
        "normalize": "unit",
        "batch": BATCH,
        "dtype": "float32",
        "jax_matmul_precision": "highest",
        "device": str(jax.devices()[0]),
        "twins": results,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(summary, indent=2) + "\n")
    print("wrote", OUT)


if __name__ == "__main__":
    main()
