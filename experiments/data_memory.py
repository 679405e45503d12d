"""Peak anonymous memory of one training epoch: 1 device, D devices of ``--parallel shard`` and ``pmap``,
and the train split streamed (``--input stream``).

Command:   .venv/bin/python experiments/data_memory.py [--images 100000] [--test-images 10000]
           [--side 64] [--devices 4] [--runs none,shard,pmap,none:stream,shard:stream] [--compare-with DIR]
Runtime:   about 6 minutes on a 2-core CPU (each run trains one epoch of the MLP); the 2.6 GB
           folder (``--images 160000 --side 128 --test-images 1000 --runs none:stream``) about 2.
Expected:  ``shard`` over D devices peaks at about the one-device run's anonymous memory (the
           dataset is held once across the devices), where ``pmap`` holds D copies; a streamed
           run holds a few steps of rows, not the split: its peak is about that of JAX and the
           model alone, whatever the dataset's size. With ``--compare-with`` a checkout of
           another commit is measured in the same run (its memory runs only).
Writes:    experiments/results/data_memory.json (or --out)

A plain (uncompressed) IDX folder of random ``side x side`` grayscale images is written to a
temporary folder; each run is ``jaxae train --epochs 1`` in its own process with
``--xla_force_host_platform_device_count=D``, and this script reads the child's ``RssAnon``
(memory no file backs: the process's own arrays, which is what a device copy is on a CPU) and
``VmRSS`` from ``/proc`` every 10 ms. Linux only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def _status_kib(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("RssAnon", "VmRSS"):
                    out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


def _write_random_folder(folder: Path, images: int, test_images: int, side: int) -> None:
    """A plain IDX folder of random images, the train file written in pieces (it may be larger than memory)."""
    from jaxae.data import write_idx

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    with open(folder / "train-images-idx3-ubyte", "wb") as f:
        f.write(bytes([0, 0, 0x08, 3]) + np.array([images, side, side], ">u4").tobytes())
        for start in range(0, images, 10_000):
            f.write(rng.integers(0, 256, (min(10_000, images - start), side, side), dtype=np.uint8).tobytes())
    write_idx(folder / "train-labels-idx1-ubyte", np.zeros(images, np.uint8))
    write_idx(folder / "t10k-images-idx3-ubyte", rng.integers(0, 256, (test_images, side, side), dtype=np.uint8))
    write_idx(folder / "t10k-labels-idx1-ubyte", np.zeros(test_images, np.uint8))


def _commit(repo: Path) -> str:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True)
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo, capture_output=True, text=True
    )
    return (head.stdout.strip() or "unknown") + (" + changes" if dirty.stdout.strip() else "")


def measure(repo: Path, dataset: Path, devices: int, strategy: str, workdir: Path, input: str = "memory") -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    env.update(PYTHONPATH=str(repo), JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    command = [sys.executable, "-m", "jaxae", "train", "--dataset", str(dataset), "--epochs", "1"]
    command += ["--parallel", strategy, "--workdir", str(workdir), "--no-progress", "--no-figures", "--no-events"]
    if input != "memory":  # a checkout from before --input knows only memory
        command += ["--input", input]
    t0 = time.perf_counter()
    proc = subprocess.Popen(command, env=env, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = {"RssAnon": 0, "VmRSS": 0}
    while proc.poll() is None:
        for key, value in _status_kib(proc.pid).items():
            peak[key] = max(peak[key], value)
        time.sleep(0.01)
    out, err = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{err[-2000:]}")
    summary = json.loads(out.strip().splitlines()[-1])
    return {
        "devices": devices,
        "strategy": strategy,
        "input": input,
        "peak_anon_mib": round(peak["RssAnon"] / 1024, 1),
        "peak_rss_mib": round(peak["VmRSS"] / 1024, 1),
        "test_loss": summary.get("test_loss"),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--test-images", type=int, default=10_000)
    parser.add_argument("--side", type=int, default=64)
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument(
        "--runs",
        default="none,shard,pmap,none:stream,shard:stream",
        help="comma list of STRATEGY[:INPUT] (none runs on 1 device, the others on --devices)",
    )
    parser.add_argument("--compare-with", type=Path, default=None, help="a checkout of another commit, measured too")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "data_memory.json")
    args = parser.parse_args()

    runs = []
    for spec in args.runs.split(","):
        strategy, _, input = spec.partition(":")
        runs.append((1 if strategy == "none" else args.devices, strategy, input or "memory"))
    repos = [("this", REPO)] + ([("compared", args.compare_with.resolve())] if args.compare_with else [])
    with tempfile.TemporaryDirectory(prefix="jaxae-data-memory-") as tmp:
        folder = Path(tmp) / "data"
        _write_random_folder(folder, args.images, args.test_images, args.side)
        size = sum(f.stat().st_size for f in folder.iterdir())
        print(f"dataset: {args.images} + {args.test_images} images of {args.side}x{args.side}, {size / 2**20:.0f} MiB")
        rows = []
        for label, repo in repos:
            for devices, strategy, input in runs:
                if label == "compared" and input != "memory":
                    continue
                row = {
                    "code": label,
                    "commit": _commit(repo),
                    **measure(repo, folder, devices, strategy, Path(tmp) / f"run-{len(rows)}", input),
                }
                rows.append(row)
                print(
                    f"{label:9s} {strategy:6s} x{devices} {input:6s}: peak anonymous {row['peak_anon_mib']:7.1f} MiB, "
                    f"peak RSS {row['peak_rss_mib']:7.1f} MiB, test loss {row['test_loss']:.6f}, {row['seconds']} s",
                    flush=True,
                )
    for label, _ in repos:
        one = next((r for r in rows if r["code"] == label and r["devices"] == 1 and r["input"] == "memory"), None)
        for r in rows:
            if one is not None and r["code"] == label and r is not one:
                r["anon_vs_one_device"] = round(r["peak_anon_mib"] / one["peak_anon_mib"], 3)
                print(
                    f"{label:9s} {r['strategy']} x{r['devices']} {r['input']} / one device in memory: "
                    f"{r['anon_vs_one_device']:.2f}x"
                )
    result = {
        "dataset": {"train": args.images, "test": args.test_images, "side": args.side, "mib": round(size / 2**20, 1)},
        "machine": f"{os.cpu_count()} CPUs, {sys.platform}",
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
