"""Runs in its own process for tests/test_parallel.py, with 4 fake CPU devices.

The device count has to be fixed before JAX starts, so the multi-device half of the tests
lives here: ``python tests/parallel_helper.py OUT DATASET EPOCHS BATCH VARIANT...`` trains
every variant with every strategy and writes what the tests compare to OUT (a ``.json`` of
histories, compile counts and errors, and a ``.npz`` of final states).
"""

from __future__ import annotations

import contextlib
import io
import json
import sys

import jax

jax.config.update("jax_num_cpu_devices", 4)

import numpy as np  # noqa: E402

from jaxae import cli  # noqa: E402
from jaxae.errors import JaxaeError  # noqa: E402
from jaxae.loop import fit  # noqa: E402
from jaxae.parallel import get_strategy  # noqa: E402
from jaxae.train import TrainConfig  # noqa: E402

STRATEGIES = ("none", "pmap", "shard")
STREAM_VARIANTS = ("vanilla", "vqvae")


def compile_counter() -> list[float]:
    events: list[float] = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            events.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    return events


def main(out: str, dataset: str, epochs: int, batch_size: int, variants: list[str]) -> None:
    compiles = compile_counter()
    report: dict = {"devices": jax.device_count(), "auto": get_strategy("auto").name, "runs": {}, "errors": {}}
    arrays: dict[str, np.ndarray] = {}
    for variant in variants:
        config = TrainConfig(variant=variant, dataset=dataset, epochs=epochs, batch_size=batch_size)
        # shard-stream: --input stream over the 4 devices, each gathering its own columns of a batch
        # (vanilla, and vqvae, whose codebook update sums over the devices' real rows).
        for name in (*STRATEGIES, *(("shard-stream",) if variant in STREAM_VARIANTS else ())):
            strategy = get_strategy(name.split("-")[0])
            after_epoch: list[int] = []

            def count_compiles(record, after_epoch=after_epoch):
                after_epoch.append(len(compiles))

            input = "stream" if name.endswith("-stream") else "memory"
            result = fit(config, progress=False, strategy=strategy, callbacks=[count_compiles], input=input)
            report["runs"][f"{variant}/{name}"] = {
                "device_count": strategy.device_count,
                "history": result.history,
                "compiles_after_epoch": after_epoch,
            }
            for i, leaf in enumerate(jax.tree.leaves(result.state)):
                arrays[f"{variant}/{name}/{i}"] = np.asarray(leaf)

    # A global batch the 4 devices do not divide: the library error and the CLI's exit 2.
    bad = batch_size + 2
    for name in ("pmap", "shard"):
        try:
            fit(TrainConfig(dataset=dataset, epochs=1, batch_size=bad), progress=False, strategy=name)
            report["errors"][name] = None
        except JaxaeError as e:
            report["errors"][name] = str(e)
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            code = cli.main(
                ["train", "--dataset", dataset, "--batch-size", str(bad), "--parallel", name]
                + ["--workdir", out + "-bad-batch", "--no-progress"]
            )
        report["errors"][f"cli/{name}"] = {"code": code, "stderr": stderr.getvalue()}

    # The shard strategy holds a split once across the devices, also where they do not divide
    # its rows (509 train, 103 test: blocks of 128 and 26, the last ones padded).
    config = TrainConfig(dataset=dataset, epochs=2, batch_size=batch_size)
    from jaxae.data import load_dataset

    train, test = (load_dataset(dataset, split) for split in ("train", "test"))
    odd = {"train": (train.images[:509], train.labels[:509]), "test": (test.images[:103], test.labels[:103])}
    shard = get_strategy("shard")
    placed = shard.put_data(odd["train"][0].reshape(509, -1))
    report["held_once"] = {
        "shape": list(placed.shape),
        "device_rows": [s.data.shape[0] for s in placed.data.addressable_shards],
        "devices": sorted(str(s.device) for s in placed.data.addressable_shards),
        "padding_zero": bool(np.all(np.asarray(placed.data)[509:] == 0)),
        "rows_equal": bool(np.array_equal(np.asarray(placed.data)[:509], odd["train"][0].reshape(509, -1))),
    }
    for name in ("none", "shard"):
        result = fit(config, progress=False, strategy=name, train=odd["train"], test=odd["test"])
        report["runs"][f"odd/{name}"] = {"history": result.history}
        for i, leaf in enumerate(jax.tree.leaves(result.state)):
            arrays[f"odd/{name}/{i}"] = np.asarray(leaf)

    np.savez(out + ".npz", **arrays)
    with open(out + ".json", "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5:])
