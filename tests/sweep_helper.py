"""Runs in its own process for tests/test_sweep.py, with 4 fake CPU devices.

``python tests/sweep_helper.py OUT`` trains seeds 0-4 on one device, then the same five over
the 4 devices (models spread, the grid padded to 8) and seeds 0-1 over them (each model
data-parallel), and writes the placements and every model's test losses to OUT (JSON).
"""

from __future__ import annotations

import json
import sys

import jax

jax.config.update("jax_num_cpu_devices", 4)

from jaxae.sweep import fit_sweep, sweep_configs  # noqa: E402
from jaxae.train import TrainConfig  # noqa: E402


def main(out: str) -> None:
    base = TrainConfig(epochs=2, batch_size=256)
    runs = {
        "five/none": sweep_configs(base, seed=[0, 1, 2, 3, 4]),
        "five/shard": sweep_configs(base, seed=[0, 1, 2, 3, 4]),
        "two/shard": sweep_configs(base, seed=[0, 1]),
    }
    report: dict = {"devices": jax.device_count()}
    for name, configs in runs.items():
        result = fit_sweep(configs, None, strategy=name.split("/")[1], progress=False)
        report[name] = {
            "placement": result.placement,
            "test_loss": [[r["test_loss"] for r in h] for h in result.histories],
        }
    with open(out, "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main(sys.argv[1])
