"""A PyTorch training run moved to jaxae and back, Adam and AdamW state included.

Command:   .venv/bin/python experiments/torch_run.py
Runtime:   about a minute on a 2-core CPU.
Expected:  for Adam (betas 0.8,0.95, eps 1e-6) and AdamW (weight decay 0.05), a 784-256-64-16
           MLP trained by PyTorch for 2 epochs on the embedded sample (batch 64), written as the
           tutorial's general checkpoint, converted with `jaxae convert` (sizes, optimizer,
           epoch and step read from the file): the next step's loss within ~1e-7 relative and
           weights within ~3e-8; 50 further steps over the same batches: per-step losses within
           ~3e-7 relative for Adam; for AdamW (eps 1e-8) the runs part (~2e-4), less than PyTorch
           parts from itself when its weights start one ulp apart (~1e-2); `jaxae export
           --with-optimizer` gives back the weights, moments, step and settings bit for bit,
           and torch.optim loads them.
Writes:    experiments/results/torch_run.json.
"""

from __future__ import annotations

import copy
import json
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch

from jaxae import checkpoint, cli, convert, torch_reference
from jaxae.data import NORMALIZATIONS, load_dataset

OUT = Path(__file__).parent / "results" / "torch_run.json"
HIDDEN, LATENT, BATCH, EPOCHS, MORE = (256, 64), 16, 64, 2, 50
OPTIMIZERS = {
    "adam": lambda p: torch.optim.Adam(p, lr=1e-3, betas=(0.8, 0.95), eps=1e-6),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.05),
}


def torch_step(model, opt, x):
    opt.zero_grad()
    loss = torch.mean(torch.square(model(x) - x))
    loss.backward()
    opt.step()
    return loss.item()


def main() -> None:
    torch.set_num_threads(2)
    train = load_dataset("mnist-sample", "train")
    u8 = train.images.reshape(len(train), -1)
    table = NORMALIZATIONS["unit"].table
    rng = np.random.default_rng(0)
    row_order = np.random.default_rng(1)  # its own stream: the batches do not depend on it
    results = {"model": f"784-{'-'.join(map(str, HIDDEN))}-{LATENT}", "batch_size": BATCH, "trained_epochs": EPOCHS}
    for name, make_opt in OPTIMIZERS.items():
        torch.manual_seed(0)
        model = torch_reference.MLPAutoencoder(784, HIDDEN, LATENT)
        opt = make_opt(model.parameters())
        steps = 0
        for _ in range(EPOCHS):
            for ids in np.array_split(rng.permutation(len(u8)), len(u8) // BATCH):
                torch_step(model, opt, torch.from_numpy(table[u8[ids]]))
                steps += 1
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            torch.save(
                {
                    "epoch": EPOCHS,
                    "model_state_dict": model.state_dict(),
                    "optimizer_state_dict": opt.state_dict(),
                    "loss": 0.0,
                },
                tmp / "run.pt",
            )
            start = time.perf_counter()
            assert cli.main(["convert", str(tmp / "run.pt"), "--out", str(tmp / "jax")]) == 0
            convert_seconds = time.perf_counter() - start
            start = time.perf_counter()
            argv = ["export", "--workdir", str(tmp / "jax"), "--out", str(tmp / "back.pt"), "--with-optimizer"]
            assert cli.main(argv) == 0
            export_seconds = time.perf_counter() - start
            back = torch.load(tmp / "back.pt", weights_only=True)
            trainer, state, config = checkpoint.restore(tmp / "jax")

        sent = opt.state_dict()
        exact = all(torch.equal(back["model_state_dict"][k], v) for k, v in model.state_dict().items())
        exact &= back["optimizer_state_dict"]["param_groups"] == sent["param_groups"]
        exact &= all(
            torch.equal(back["optimizer_state_dict"]["state"][i][f], entry[f])
            for i, entry in sent["state"].items()
            for f in ("step", "exp_avg", "exp_avg_sq")
        )
        reloaded = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
        reloaded([torch.nn.Parameter(p.detach().clone()) for p in model.parameters()]).load_state_dict(
            back["optimizer_state_dict"]
        )

        # PyTorch against itself, each batch's rows in another order (the same loss, summed in
        # another order): how far two runs part from rounding alone
        twin = copy.deepcopy(model)
        twin_opt = make_opt(twin.parameters())
        twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # load_state_dict shares tensors
        batches = [rng.permutation(len(u8))[:BATCH] for _ in range(MORE)]
        twin_rel = []
        step = jax.jit(trainer.train_step)
        rel, first = [], {}
        with jax.default_matmul_precision("highest"):
            for i, ids in enumerate(batches):
                state, metrics = step(state, jnp.asarray(u8[ids]))
                x = torch.from_numpy(table[u8[ids]])
                torch_loss = torch_step(model, opt, x)
                rel.append(abs(float(metrics["loss"]) - torch_loss) / torch_loss)
                twin_loss = torch_step(twin, twin_opt, x[torch.from_numpy(row_order.permutation(BATCH))])
                twin_rel.append(abs(twin_loss - torch_loss) / torch_loss)
                if i == 0:
                    got = convert.to_numpy_state_dict(state.params)
                    first = {
                        "loss_rel_diff": rel[0],
                        "max_abs_diff_weights": max(
                            float(np.max(np.abs(got[k] - v.numpy()))) for k, v in model.state_dict().items()
                        ),
                    }
        got = convert.to_numpy_state_dict(state.params)
        results[name] = {
            "settings": {k: getattr(config, k) for k in ("optimizer", "lr", "betas", "eps", "weight_decay")},
            "steps_in_torch": steps,
            "migrated": {"step": int(state.step) - MORE, "epoch": int(state.epoch)},
            "next_step": first,
            f"{MORE}_steps": {
                "max_loss_rel_diff": max(rel),
                "median_loss_rel_diff": float(np.median(rel)),
                "loss_rel_diff_per_step": [float(f"{r:.2g}") for r in rel],
                "max_abs_diff_weights_after": max(
                    float(np.max(np.abs(got[k] - v.numpy()))) for k, v in model.state_dict().items()
                ),
                "torch_vs_torch_rows_permuted_max_loss_rel_diff": max(twin_rel),
                "torch_vs_torch_rows_permuted_loss_rel_diff_per_step": [float(f"{r:.2g}") for r in twin_rel],
            },
            "round_trip_bit_exact": bool(exact),
            "convert_seconds": round(convert_seconds, 2),
            "export_seconds": round(export_seconds, 2),
        }
        print(name, json.dumps(results[name]))
    OUT.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
