"""Parity of jaxae with the document's PyTorch model, on weights PyTorch trained.

Command:   .venv/bin/python experiments/torch_parity.py [--epochs 20] [--seeds 5]
Runtime:   about 4 minutes on a 2-core CPU.
Expected:  `jaxae convert --check` passes on the PyTorch-trained weights: outputs ~9e-7 apart at
           most (unit preset; the seed preset's outputs collapse to ~0), parameters exactly equal,
           and `jaxae evaluate` gives PyTorch's test MSE to 1e-7; export gives back the state_dict
           bit for bit. MSE gradients ~1e-10 apart (~2e-9 on trained weights); one Adam step
           <= ~8e-8 from fresh weights, ~1e-6 from trained ones (PyTorch against itself with the
           batch rows permuted: ~7e-8 and ~6e-7). Over 100 free-running steps the losses stay
           within ~2e-5 relative and 99.4-99.9 % of the weights within 1e-4, while a few end up to
           ~1e-2 apart: about as far as two PyTorch runs whose initial weights differ by one ulp,
           because a ReLU input within rounding of 0 can fall either way.
Writes:    experiments/results/torch_parity/{report-unit.json, report-seed.json, summary.json};
           the .pt files and converted checkpoints under runs/torch_parity/ (not committed).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
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

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results" / "torch_parity"
RUNS = Path("runs") / "torch_parity"  # relative to ROOT, so reports name portable paths


def normalized(images_u8: np.ndarray, preset: str) -> np.ndarray:
    """torchvision's ToTensor (+ Normalize for "seed"), flattened: float32 [N, 784]."""
    return jaxae.NORMALIZATIONS[preset].table[images_u8.reshape(len(images_u8), -1)]


def numpy_state_dict(module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def train_reference(train: np.ndarray, preset: str, epochs: int) -> torch.nn.Module:
    """The tutorial's training loop: shuffled batches of 256, Adam 1e-3, MSELoss."""
    torch.manual_seed(0)
    model = torch_reference.Autoencoder()
    data = torch.from_numpy(normalized(train, preset))
    loader = torch.utils.data.DataLoader(data, batch_size=256, shuffle=True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.MSELoss()
    for _ in range(epochs):
        for img in loader:
            loss = loss_fn(model(img), img)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model


def cli(*args: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "jaxae", *args], capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(proc.stdout)


def gradient_and_step_diffs(weights: dict[str, np.ndarray], batch_u8: np.ndarray, preset: str) -> dict[str, float]:
    model = torch_reference.Autoencoder()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    x = torch.from_numpy(normalized(batch_u8, preset))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    torch.nn.functional.mse_loss(model(x), x).backward()
    torch_grads = {k: p.grad.numpy().copy() for k, p in model.named_parameters()}
    opt.step()

    flax_model = jaxae.from_torch(weights)
    graphdef, params = nnx.split(flax_model)
    xj = jnp.asarray(x.numpy())
    grads = jax.jit(jax.grad(lambda p: jnp.mean(jnp.square(nnx.merge(graphdef, p)(xj) - xj))))(params)
    jax_grads = convert.to_numpy_state_dict(nnx.to_pure_dict(grads))
    trainer, state = jaxae.create_train_state(flax_model, optax.adam(1e-3), "vanilla", preset)
    state, _ = trainer.jit_train_step(state, jnp.asarray(batch_u8))
    stepped = convert.to_numpy_state_dict(state.params)
    # PyTorch against itself: the same batch with its rows in another order (same maths,
    # another summation order).
    again = torch_reference.Autoencoder()
    again.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    opt_again = torch.optim.Adam(again.parameters(), lr=1e-3)
    permuted = x[torch.from_numpy(np.random.default_rng(0).permutation(len(x)))]
    torch.nn.functional.mse_loss(again(permuted), permuted).backward()
    again_grads = {k: p.grad.numpy().copy() for k, p in again.named_parameters()}
    opt_again.step()
    stepped_torch, stepped_again = numpy_state_dict(model), numpy_state_dict(again)
    return {
        "gradients_max_abs": max(float(np.abs(torch_grads[k]).max()) for k in weights),
        "gradients_max_abs_diff": max(float(np.abs(jax_grads[k] - torch_grads[k]).max()) for k in weights),
        "adam_step_max_abs_diff": max(float(np.abs(stepped[k] - stepped_torch[k]).max()) for k in weights),
        "torch_vs_torch_rows_permuted": {
            "gradients_max_abs_diff": max(float(np.abs(again_grads[k] - torch_grads[k]).max()) for k in weights),
            "adam_step_max_abs_diff": max(float(np.abs(stepped_again[k] - stepped_torch[k]).max()) for k in weights),
        },
    }


def batch_order(n: int, steps: int, batch_size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    epochs = -(-steps * batch_size // n)
    return np.concatenate([rng.permutation(n) for _ in range(epochs)])[: steps * batch_size].reshape(steps, batch_size)


def torch_trajectory(initial, train, order, preset):
    model = torch_reference.Autoencoder()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in initial.items()})
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for ids in order:
        x = torch.from_numpy(normalized(train[ids], preset))
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), x)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return numpy_state_dict(model), np.array(losses)


def jax_trajectory(initial, train, order, preset):
    trainer, state = jaxae.create_train_state(jaxae.from_torch(initial), optax.adam(1e-3), "vanilla", preset)
    images = jnp.asarray(train.reshape(len(train), -1))
    losses = []
    for ids in order:
        state, metrics = trainer.jit_train_step(state, images[ids])
        losses.append(float(metrics["loss"]))
    return convert.to_numpy_state_dict(state.params), np.array(losses)


def compare(final, losses, ref_final, ref_losses, initial) -> dict[str, float]:
    diff = np.concatenate([np.abs(final[k] - ref_final[k]).ravel() for k in ref_final]).astype(np.float64)
    travelled = np.sqrt(sum(np.sum(np.square(ref_final[k] - initial[k], dtype=np.float64)) for k in initial))
    return {
        "loss_max_rel_diff": float(np.max(np.abs(losses - ref_losses) / ref_losses)),
        "params_max_abs_diff": float(diff.max()),
        "params_p99_9_abs_diff": float(np.quantile(diff, 0.999)),
        "params_fraction_within_1e-4": float(np.mean(diff <= 1e-4)),
        "params_diff_norm_over_distance_travelled": float(np.sqrt(np.sum(diff**2)) / travelled),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20, help="PyTorch training epochs on the sample")
    parser.add_argument("--seeds", type=int, default=5, help="100-step trajectories compared")
    args = parser.parse_args()
    torch.set_default_dtype(torch.float32)
    jax.config.update("jax_default_matmul_precision", "highest")
    RESULTS.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(ROOT / RUNS, ignore_errors=True)
    (ROOT / RUNS).mkdir(parents=True)
    train = jaxae.load_dataset("mnist-sample", "train").images
    test = jaxae.load_dataset("mnist-sample", "test").images
    summary: dict = {"torch": torch.__version__, "jax": jax.__version__, "device": str(jax.devices()[0])}

    for preset in ("unit", "seed"):
        t0 = time.perf_counter()
        model = train_reference(train, preset, args.epochs)
        pt = RUNS / f"autoencoder-{preset}.pt"
        torch.save(model.state_dict(), ROOT / pt)
        x = torch.from_numpy(normalized(test, preset))
        with torch.no_grad():
            torch_test_mse = torch.nn.functional.mse_loss(model(x), x).item()
        out = RUNS / f"converted-{preset}"
        report = cli("convert", str(pt), "--out", str(out), "--normalize", preset, "--check")
        (RESULTS / f"report-{preset}.json").write_text(json.dumps(report, indent=2) + "\n")
        evaluated = cli("evaluate", "--workdir", str(out))
        cli("export", "--workdir", str(out), "--out", str(RUNS / f"exported-{preset}.pt"))
        back = torch.load(ROOT / RUNS / f"exported-{preset}.pt", weights_only=True)
        original = model.state_dict()
        summary[preset] = {
            "torch_training_epochs": args.epochs,
            "torch_test_mse": torch_test_mse,
            "jaxae_evaluate_test_mse": evaluated["test_mse"],
            "convert_check_passed": report["passed"],
            "outputs_max_abs_diff": report["max_abs_diff_outputs"],
            "parameters_max_abs_diff": report["max_abs_diff_parameters"],
            "export_round_trip_bit_exact": list(back) == list(original)
            and all(torch.equal(back[k], original[k]) for k in original),
            "trained_weights": gradient_and_step_diffs(numpy_state_dict(model), train[:256], preset),
            "seconds": time.perf_counter() - t0,
        }
        print(preset, json.dumps(summary[preset]), flush=True)

    trajectories = []
    for seed in range(args.seeds):
        t0 = time.perf_counter()
        torch.manual_seed(seed)
        initial = numpy_state_dict(torch_reference.Autoencoder())
        order = batch_order(len(train), 100, 256, seed)
        ref_final, ref_losses = torch_trajectory(initial, train, order, "unit")
        one_ulp = {k: np.nextafter(v, np.float32(np.inf)) for k, v in initial.items()}
        row = {
            "seed": seed,
            "fresh_weights": gradient_and_step_diffs(initial, train[order[0]], "unit"),
            "jaxae_vs_torch": compare(*jax_trajectory(initial, train, order, "unit"), ref_final, ref_losses, initial),
            "torch_vs_torch_from_weights_1ulp_apart": compare(
                *torch_trajectory(one_ulp, train, order, "unit"), ref_final, ref_losses, initial
            ),
            "seconds": time.perf_counter() - t0,
        }
        print(json.dumps(row), flush=True)
        trajectories.append(row)
    summary["trajectories_100_steps_unit"] = trajectories
    (RESULTS / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
