"""``jaxae bench``: jaxae's training against the document's PyTorch loop, in one run.

On the same data, the document's model, Adam 1e-3 and the same batch size, it times whole
training epochs (after a warm-up epoch) of

1. ``jaxae``: the real training path (``Trainer.train_epoch``, the scan ``fit()`` runs);
2. ``torch``: the document's loop with the data preloaded as one float tensor (the strongest
   fair eager baseline), ``torch.set_num_threads`` set to the cores JAX uses;
3. ``torch_dataloader``: the document's pipeline as written, a ``DataLoader(batch_size,
   shuffle=True)`` over a dataset that converts each image on access (PIL image, ToTensor,
   Normalize((0.5,), (0.5,))), as torchvision's MNIST does;
4. ``torch_compile``: (2) under ``torch.compile``, when it works here.

The methods run in interleaved rounds and each figure is the median over rounds, so a
burst of load on a noisy machine hits all of them alike. It also measures the device's peak
fp32 matmul rate in the same run (before and after the methods, keeping the higher) and
reports the roofline fraction: the model's matmul FLOPs per sample (forward and backward,
counted from the layer sizes) x samples/s / peak; the roofline is printed only in the final
table, once the peak is final.

Load from other processes does not hit the methods alike, though: PyTorch's OpenMP threads
spin and wait on each other and slow down far more than XLA's. So the run watches for
contention (:func:`contention`): a 1-minute load average above the cores in use, or rounds of
one method that disagree by more than :data:`SPREAD_LIMIT`; it then warns, and the JSON says
``"contended": true`` with the evidence.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxae.data import dataset_image_shape, load_dataset, shape_text
from jaxae.errors import JaxaeError
from jaxae.parallel import put_dataset
from jaxae.train import TrainConfig, build

_DOCUMENT_IMAGES = (28, 28, 1)  # the document's model and its PyTorch twin take these only


def mlp_flops_per_sample(dims: tuple[int, ...] = (784, 128, 64, 32, 64, 128, 784)) -> int:
    """Matmul FLOPs of one training sample through an MLP with these layer widths.

    Forward ``2 * in * out`` per layer; backward the same again for the weight gradient, and
    again for the input gradient of every layer but the first (the data needs none).
    Elementwise work (bias, ReLU, Sigmoid, loss, Adam) is left out, as rooflines do.
    """
    layers = list(zip(dims[:-1], dims[1:], strict=True))
    macs = sum(i * o for i, o in layers)
    return 2 * macs + 2 * macs + 2 * (macs - layers[0][0] * layers[0][1])


def peak_matmul_flops(n: int | None = None, reps: int = 10, precision: str = "highest") -> float:
    """The best fp32 FLOP/s of an ``n x n @ n x n`` matmul on the default device.

    It runs at ``precision`` (``jax.default_matmul_precision``), the one the timed training
    steps use, so the roofline compares like with like: :func:`peak_name` says what it is.
    """
    n = n or (2048 if jax.default_backend() == "cpu" else 8192)
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    with jax.default_matmul_precision(precision):
        matmul = jax.jit(lambda a, b: a @ b).lower(a, b).compile()
    jax.block_until_ready(matmul(a, b))
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(matmul(a, b))
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def peak_name(precision: str, backend: str | None = None) -> str:
    """What a float32 matmul at ``precision`` runs as on ``backend`` (default: JAX's): the name
    of the peak a roofline divides by."""
    backend = backend or jax.default_backend()
    if backend == "gpu":
        return "fp32" if precision == "highest" else "TF32"
    if backend == "tpu":
        return {"highest": "fp32 (6 bf16 passes)", "high": "bf16x3"}.get(precision, "bf16 (1 pass)")
    return "fp32"


def set_torch_precision(precision: str) -> None:
    """PyTorch at the float32 precision JAX runs at: full fp32 for ``highest`` (PyTorch's own
    default for matmuls, though not for cuDNN's convolutions, which allow TF32), TF32 on an
    NVIDIA GPU otherwise. A CPU computes full fp32 either way."""
    import torch

    tf32 = precision != "highest"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def device_name() -> str:
    device = jax.devices()[0]
    if device.platform == "cpu":
        import platform

        model = ""
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        return f"cpu: {model or platform.processor()} ({cpu_threads()} cores)"
    return f"{device.platform}: {device.device_kind}"


def cpu_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def torch_device() -> str:
    """PyTorch runs where JAX runs: CUDA when JAX is on an NVIDIA GPU and torch sees one."""
    import torch

    return "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"


class JaxMethod:
    """jaxae's real training path: the compiled epoch ``fit()`` runs, of the document's model or
    of ``config``'s."""

    name = "jaxae"

    def __init__(self, images: np.ndarray, batch_size: int, config: TrainConfig | None = None):
        config = dataclasses.replace(config or TrainConfig(), batch_size=batch_size)
        self.trainer, self.state = build(config, images.shape[1:])
        self.images = put_dataset(images.reshape(len(images), -1))
        t0 = time.perf_counter()
        self.epoch = self.trainer.jit_train_epoch.lower(self.state, self.images, batch_size=batch_size).compile()
        self.compile_seconds = time.perf_counter() - t0

    def run_epoch(self) -> float:
        self.state, metrics = self.epoch(self.state, self.images)
        return float(jax.device_get(metrics["loss"][-1]))  # waits for the epoch to finish


class TorchMethod:
    """The document's loop on data preloaded as one float tensor, optionally torch.compile'd."""

    def __init__(self, images: np.ndarray, batch_size: int, compile: bool = False):
        import torch

        from jaxae import torch_reference

        self.torch = torch
        self.device = torch_device()
        self.name = "torch_compile" if compile else "torch"
        torch.manual_seed(0)
        self.model = torch_reference.Autoencoder().to(self.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.criterion = torch.nn.MSELoss()
        self.data = torch.tensor(images.reshape(len(images), -1)).to(self.device).float().div(255)
        self.batch_size = batch_size
        self.compile_seconds = 0.0
        self.step = self._step
        if compile:
            self.step = torch.compile(self._step)
            t0 = time.perf_counter()
            self.step(self.data[:batch_size])
            self.compile_seconds = time.perf_counter() - t0

    def _step(self, batch):
        output = self.model(batch)
        loss = self.criterion(output, batch)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return loss

    def run_epoch(self) -> float:
        perm = self.torch.randperm(len(self.data), device=self.device)
        loss = None
        for i in range(0, len(self.data), self.batch_size):
            loss = self.step(self.data[perm[i : i + self.batch_size]])
        return loss.item()  # waits for the device


class TwinMethod:
    """A model's PyTorch twin (``TWINS[(variant, arch)].torch_module``) trained by the same loss
    (:func:`jaxae.torch_reference.variant_loss`) with ``torch.optim.Adam(lr=1e-3)``, on data
    preloaded as one float tensor, as :class:`TorchMethod` trains the document's model."""

    name = "torch"

    def __init__(self, images: np.ndarray, batch_size: int, config: TrainConfig):
        import torch

        from jaxae import torch_reference
        from jaxae.convert.layouts import TWINS
        from jaxae.data import get_normalization

        self.torch, self.config, self.batch_size = torch, config, batch_size
        self.device = torch_device()
        self.variant_loss = torch_reference.variant_loss
        torch.manual_seed(0)
        self.model = TWINS[(config.variant, config.arch)].torch_module(config, tuple(images.shape[1:])).to(self.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        norm = get_normalization(config.normalize)
        x = torch.tensor(images).permute(0, 3, 1, 2).reshape(len(images), -1).float().div(255)  # (c, h, w) order
        self.data = (norm.low + (norm.high - norm.low) * x).to(self.device)
        self.compile_seconds = 0.0

    def run_epoch(self) -> float:
        perm = self.torch.randperm(len(self.data), device=self.device)
        loss = None
        for i in range(0, len(self.data), self.batch_size):
            loss = self.variant_loss(self.model, self.data[perm[i : i + self.batch_size]], self.config)
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
        return loss.item()


class TorchDataLoaderMethod:
    """The document's pipeline as written: DataLoader over per-access PIL/ToTensor/Normalize."""

    name = "torch_dataloader"

    def __init__(self, images: np.ndarray, labels: np.ndarray, batch_size: int):
        import torch
        from PIL import Image

        from jaxae import torch_reference

        class PerAccessMNIST(torch.utils.data.Dataset):
            """What torchvision.datasets.MNIST does per item, with its transform
            ``Compose([ToTensor(), Normalize((0.5,), (0.5,))])``."""

            def __len__(self):
                return len(images)

            def __getitem__(self, i):
                img = Image.fromarray(images[i].reshape(images.shape[1], images.shape[2]), mode="L")
                x = torch.from_numpy(np.array(img, np.uint8)).float().div(255).unsqueeze(0)  # ToTensor
                x = (x - 0.5) / 0.5  # Normalize((0.5,), (0.5,))
                return x, int(labels[i])

        torch.manual_seed(0)
        self.torch = torch
        self.device = torch_device()
        self.model = torch_reference.Autoencoder().to(self.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.criterion = torch.nn.MSELoss()
        self.loader = torch.utils.data.DataLoader(PerAccessMNIST(), batch_size=batch_size, shuffle=True)
        self.compile_seconds = 0.0

    def run_epoch(self) -> float:
        loss = None
        for x, _ in self.loader:
            x = x.view(x.size(0), -1).to(self.device)
            output = self.model(x)
            loss = self.criterion(output, x)
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
        return loss.item()


SPREAD_LIMIT = 1.5
"""The largest max/min ratio of one method's round rates that a quiet machine gives."""


def load_average() -> float | None:
    """The 1-minute load average (``None`` where the platform has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # pragma: no cover - not Unix
        return None


def contention(
    rounds: dict[str, dict[str, list[float]]],
    load_before: float | None,
    load_after: float | None,
    cores: int,
    spread_limit: float = SPREAD_LIMIT,
    label: str = "batch",
) -> dict[str, Any]:
    """Whether other work competed with the benchmark, and the evidence.

    Args:
        rounds: ``{batch_size: {method: [samples/s of each round]}}`` (or keyed by model, with
            ``label="model"``: how the reasons name a key).
        load_before: the 1-minute load average before the measurements (other work alone).
        load_after: the same after them (it includes the benchmark's own threads, at most
            ``cores``, so anything above ``cores`` is other work too).
        cores: the cores the benchmark uses.
        spread_limit: the largest max/min ratio of one method's rounds on a quiet machine.

    Returns:
        ``{"contended": bool, "reasons": [str, ...], "load_average_1min": {"before", "after"},
        "cores": int, "spread_limit": float, "round_spread": {batch_size: {method: max/min}}}``;
        ``reasons`` says in words what was seen (empty when nothing was).
    """
    reasons = []
    for when, load in (("before", load_before), ("after", load_after)):
        if load is not None and load > cores:
            reasons.append(f"1-minute load average {load:.2f} {when} the measurements, above the {cores} cores in use")
    spread: dict[str, dict[str, float]] = {}
    for batch_size, by_method in rounds.items():
        spread[str(batch_size)] = {}
        for method, rates in by_method.items():
            if len(rates) < 2 or min(rates) <= 0:
                continue
            ratio = max(rates) / min(rates)
            spread[str(batch_size)][method] = ratio
            if ratio > spread_limit:
                reasons.append(
                    f"{method} at {label} {batch_size} varied {ratio:.2f}x between rounds (above {spread_limit:g}x)"
                )
    return {
        "contended": bool(reasons),
        "reasons": reasons,
        "load_average_1min": {"before": load_before, "after": load_after},
        "cores": cores,
        "spread_limit": spread_limit,
        "round_spread": spread,
    }


def contention_warning(results: dict[str, Any]) -> str | None:
    """The warning line for contended ``results`` (``None`` when the run was quiet)."""
    if not results.get("contended"):
        return None
    return (
        "WARNING: other work competed with this benchmark ("
        + "; ".join(results["contention"]["reasons"])
        + "). PyTorch's threads suffer far more from contention than XLA's, so the speedups are "
        "overstated: rerun on a quiet machine."
    )


def _time_epochs(method: Any, epochs: int, samples: int) -> float:
    t0 = time.perf_counter()
    for _ in range(epochs):
        method.run_epoch()
    return epochs * samples / (time.perf_counter() - t0)


def run_benchmark(
    dataset: str = "mnist-sample",
    *,
    batch_sizes: tuple[int, ...] = (256, 1024, 4096),
    epochs: int = 2,
    rounds: int = 3,
    torch_compile: bool = True,
    dataloader: bool = True,
    matmul_precision: str = "highest",
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Runs every method at every batch size; returns the figures ``jaxae bench`` prints.

    Args:
        dataset: any name ``load_dataset`` accepts (the train split is used).
        batch_sizes: the first is the headline (the document's 256).
        epochs: epochs per method per round.
        rounds: interleaved rounds; each figure is the median over rounds.
        torch_compile: also time ``torch.compile`` of the preloaded loop (first batch size only).
        dataloader: also time the DataLoader pipeline (first batch size only).
        matmul_precision: of jaxae's steps, PyTorch's and the peak (see :func:`set_torch_precision`):
            ``highest`` compares full fp32 with full fp32 on every backend.
    """
    import torch

    shape = dataset_image_shape(dataset)  # headers only: refuse before any work
    if shape != _DOCUMENT_IMAGES:
        raise JaxaeError(
            f"jaxae bench times the document's 784-128-64-32 model, which takes 28x28x1 images; the {dataset} "
            f"images are {shape_text(shape)}: bench on mnist-sample, Fashion-MNIST or another 28x28 "
            "grayscale dataset (jaxae train reports samples/s for any dataset)"
        )
    threads = cpu_threads()
    torch.set_num_threads(threads)
    set_torch_precision(matmul_precision)
    config = TrainConfig(matmul_precision=matmul_precision)
    train = load_dataset(dataset, "train")
    images = train.images
    n = len(train)
    flops_per_sample = mlp_flops_per_sample()
    log(
        f"device: {device_name()}; torch {torch.__version__} on {torch_device()} with {threads} threads; "
        f"jax {jax.__version__}"
    )
    load_before = load_average()
    # The roofline needs the final peak (the higher of two readings): the table prints it, not the progress.
    peak_before = peak_matmul_flops(precision=matmul_precision)
    log(f"model: {flops_per_sample / 1e6:.3f} MFLOP per sample")

    results: dict[str, Any] = {
        "device": device_name(),
        "dataset": dataset,
        "train_samples": n,
        "epochs_per_round": epochs,
        "rounds": rounds,
        "threads": threads,
        "jax_version": jax.__version__,
        "torch_version": torch.__version__,
        "torch_device": torch_device(),
        "model_flops_per_sample": flops_per_sample,
        "matmul_precision": matmul_precision,
        "peak_name": peak_name(matmul_precision),
        "by_batch_size": {},
    }
    for bi, batch_size in enumerate(batch_sizes):
        methods: list[Any] = [JaxMethod(images, batch_size, config), TorchMethod(images, batch_size)]
        if torch_compile and bi == 0:
            try:
                methods.append(TorchMethod(images, batch_size, compile=True))
            except Exception as e:  # torch.compile needs a working C++ toolchain; report, don't fail
                log(f"torch.compile unavailable: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                torch_compile = False
        if dataloader and bi == 0:
            methods.append(TorchDataLoaderMethod(images, train.labels, batch_size))
        for method in methods:
            method.run_epoch()  # warm-up: allocations, caches, lazy init
        rates: dict[str, list[float]] = {m.name: [] for m in methods}
        for _ in range(rounds):
            for method in methods:
                rates[method.name].append(_time_epochs(method, epochs, n))
        row: dict[str, Any] = {name: statistics.median(r) for name, r in rates.items()}
        row["rounds_samples_per_s"] = rates
        row["jax_compile_seconds"] = methods[0].compile_seconds
        if "torch_compile" in rates:
            row["torch_compile_seconds"] = next(m.compile_seconds for m in methods if m.name == "torch_compile")
        row["seconds_per_20_epochs"] = 20 * n / row["jaxae"]
        row["speedup_vs_torch"] = row["jaxae"] / row["torch"]
        if "torch_dataloader" in row:
            row["speedup_vs_torch_dataloader"] = row["jaxae"] / row["torch_dataloader"]
        if "torch_compile" in row:
            row["speedup_vs_torch_compile"] = row["jaxae"] / row["torch_compile"]
        results["by_batch_size"][str(batch_size)] = row
        log(
            f"batch {batch_size}: "
            + ", ".join(f"{name} {row[name]:,.0f}/s" for name in rates)
            + f"; jaxae/torch {row['speedup_vs_torch']:.2f}x"
        )

    # Load on a shared machine only ever lowers a measured peak: measure again at the end and
    # keep the higher, so the roofline fractions are not flattered by a slow first reading.
    peak_after = peak_matmul_flops(precision=matmul_precision)
    load_after = load_average()
    peak = max(peak_before, peak_after)
    results["peak_matmul_flops"] = peak
    results["peak_matmul_flops_readings"] = [peak_before, peak_after]
    for row in results["by_batch_size"].values():
        row["roofline_fraction"] = row["jaxae"] * flops_per_sample / peak
    evidence = contention(
        {b: row["rounds_samples_per_s"] for b, row in results["by_batch_size"].items()},
        load_before,
        load_after,
        threads,
    )
    results["contended"] = evidence["contended"]
    results["contention"] = evidence
    head = results["by_batch_size"][str(batch_sizes[0])]
    results.update(
        {
            "batch_size": batch_sizes[0],
            "jax_samples_per_s": head["jaxae"],
            "torch_samples_per_s": head["torch"],
            "torch_dataloader_samples_per_s": head.get("torch_dataloader"),
            "torch_compile_samples_per_s": head.get("torch_compile"),
            "speedup_vs_torch": head["speedup_vs_torch"],
            "speedup_vs_torch_dataloader": head.get("speedup_vs_torch_dataloader"),
            "roofline_fraction": head["roofline_fraction"],
            "compile_seconds": head["jax_compile_seconds"],
        }
    )
    return results


#: The targets of ``jaxae bench --models`` on a CPU at batch 256: jaxae / PyTorch of each model.
TARGETS = {"mlp": 1.3, "conv": 1.0}


def model_names(spec: str) -> list[str]:
    """``--models`` (``all``, or ``vanilla-mlp,vae-conv,...``) -> the models' names, checked."""
    from jaxae.objectives import VARIANTS

    every = [f"{name}-{arch}" for name, variant in VARIANTS.items() for arch in variant.archs]
    if spec.strip() == "all":
        return every
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in every]
    if unknown or not names:
        what = ", ".join(unknown) if unknown else repr(spec)
        raise JaxaeError(f"--models: unknown model {what}; choose all or from {', '.join(every)}")
    return list(dict.fromkeys(names))


def run_models(
    dataset: str = "mnist-sample",
    models: str = "all",
    *,
    batch_size: int = 256,
    epochs: int = 2,
    rounds: int = 3,
    train_images: int = 0,
    matmul_precision: str = "highest",
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Every model of ``models`` against its PyTorch twin (:class:`TwinMethod`), in one run.

    Each model's jaxae epoch and its twin's run on the same images (the first ``train_images``
    of the train split; all with 0), batch, Adam 1e-3 and threads, one warm-up epoch each, then
    ``rounds`` interleaved rounds of ``epochs`` epochs; figures are medians over rounds, with
    the contention check of :func:`contention` over every model's rounds.

    Returns:
        ``{"device", "dataset", "train_samples", "batch_size", "matmul_precision", ...,
        "models": {name: {"jaxae", "torch", "speedup_vs_torch", "target", "rounds_samples_per_s",
        "jax_compile_seconds"}}, "contended", "contention"}``.
    """
    import torch

    names = model_names(models)
    threads = cpu_threads()
    torch.set_num_threads(threads)
    set_torch_precision(matmul_precision)
    train = load_dataset(dataset, "train")
    images = train.images[: train_images or None]
    n = len(images)
    if batch_size > n:
        raise JaxaeError(f"--batch-sizes {batch_size} is larger than the {n} images timed")
    log(
        f"device: {device_name()}; torch {torch.__version__} on {torch_device()} with {threads} threads; "
        f"jax {jax.__version__}; {n} images of {shape_text(images.shape[1:])}, batch {batch_size}"
    )
    load_before = load_average()
    results: dict[str, Any] = {
        "device": device_name(),
        "dataset": dataset,
        "train_samples": n,
        "batch_size": batch_size,
        "epochs_per_round": epochs,
        "rounds": rounds,
        "threads": threads,
        "jax_version": jax.__version__,
        "torch_version": torch.__version__,
        "torch_device": torch_device(),
        "matmul_precision": matmul_precision,
        "models": {},
    }
    for name in names:
        variant, arch = name.rsplit("-", 1)
        config = TrainConfig(variant=variant, arch=arch, matmul_precision=matmul_precision)
        methods = [JaxMethod(images, batch_size, config), TwinMethod(images, batch_size, config)]
        for method in methods:
            method.run_epoch()  # warm-up
        rates: dict[str, list[float]] = {m.name: [] for m in methods}
        for _ in range(rounds):
            for method in methods:
                rates[method.name].append(_time_epochs(method, epochs, n))
        row: dict[str, Any] = {m: statistics.median(r) for m, r in rates.items()}
        row.update(
            speedup_vs_torch=row["jaxae"] / row["torch"],
            target=TARGETS[arch],
            rounds_samples_per_s=rates,
            jax_compile_seconds=methods[0].compile_seconds,
        )
        results["models"][name] = row
        log(
            f"{name}: jaxae {row['jaxae']:,.0f}/s, torch {row['torch']:,.0f}/s; jaxae/torch {row['speedup_vs_torch']:.2f}x"
        )
    evidence = contention(
        {name: row["rounds_samples_per_s"] for name, row in results["models"].items()},
        load_before,
        load_average(),
        threads,
        label="model",
    )
    results["contended"] = evidence["contended"]
    results["contention"] = evidence
    return results


def format_models_table(results: dict[str, Any]) -> str:
    """:func:`run_models`' results as a Markdown table."""
    warning = contention_warning(results)
    lines = ([warning, ""] if warning else []) + [
        f"device: {results['device']}; dataset {results['dataset']} ({results['train_samples']} train images), "
        f"batch {results['batch_size']}, matmul precision {results['matmul_precision']}",
        "",
        "| model | jaxae samples/s | torch samples/s | jaxae / torch | target (CPU) | jaxae compile |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in results["models"].items():
        mark = "met" if row["speedup_vs_torch"] >= row["target"] else "**not met**"
        lines.append(
            f"| {name} | {row['jaxae']:,.0f} | {row['torch']:,.0f} | {row['speedup_vs_torch']:.2f}x | "
            f"{row['target']:.1f}x {mark} | {row['jax_compile_seconds']:.2f} s |"
        )
    if warning:
        lines += ["", warning]
    return "\n".join(lines)


def format_table(results: dict[str, Any]) -> str:
    """The results as a Markdown table (samples/s, median over rounds)."""
    names = ["jaxae", "torch", "torch_compile", "torch_dataloader"]
    warning = contention_warning(results)
    lines = ([warning, ""] if warning else []) + [
        f"device: {results['device']}; dataset {results['dataset']} ({results['train_samples']} train images); "
        f"matmul precision {results['matmul_precision']}; peak {results['peak_name']} matmul "
        f"{results['peak_matmul_flops'] / 1e9:.1f} GFLOP/s",
        "",
        "| batch | " + " | ".join(f"{n} samples/s" for n in names) + " | jaxae / torch | roofline | jaxae compile |",
        "|---" * (len(names) + 4) + "|",
    ]
    for batch, row in results["by_batch_size"].items():
        cells = [f"{row[n]:,.0f}" if row.get(n) else "-" for n in names]
        lines.append(
            f"| {batch} | "
            + " | ".join(cells)
            + f" | {row['speedup_vs_torch']:.2f}x | {row['roofline_fraction']:.0%} | {row['jax_compile_seconds']:.2f} s |"
        )
    if warning:  # at both ends: a table pasted without its top line still carries it
        lines += ["", warning]
    return "\n".join(lines)


def add_arguments(p: Any) -> None:
    """The flags of ``jaxae bench`` (an ``argparse`` parser), which :func:`main` reads."""
    from jaxae.config import positive_ints

    p.add_argument(
        "--dataset",
        default="mnist-sample",
        help="train split to time on, e.g. fashion_mnist or a folder of IDX files (default: %(default)s)",
    )
    p.add_argument(
        "--batch-sizes",
        type=lambda s: list(positive_ints(s)),
        default=[256, 1024, 4096],
        help="comma-separated; the first is the headline (default: 256,1024,4096)",
    )
    p.add_argument("--epochs", type=int, default=0, help="epochs per method per round (default: 2; 3 with --quick)")
    p.add_argument(
        "--rounds", type=int, default=0, help="interleaved rounds, medians reported (default: 5; 3 with --quick)"
    )
    p.add_argument(
        "--quick", action="store_true", help="fewer rounds, no torch.compile: under a minute on a 2-core CPU"
    )
    p.add_argument("--no-torch-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument(
        "--models",
        default=None,
        metavar="LIST",
        help="time these models (all, or e.g. vanilla-mlp,vae-conv) against their PyTorch twins, at the first "
        "of --batch-sizes, instead of the document's model against the document's loop",
    )
    p.add_argument(
        "--train-images",
        type=int,
        default=0,
        metavar="N",
        help="with --models: time on the first N train images (default: all)",
    )
    p.add_argument(
        "--matmul-precision",
        choices=("default", "high", "highest"),
        default="highest",
        help="float32 matmul precision of both frameworks and the peak: highest = full fp32 (PyTorch's default); "
        "default or high = TF32 on an NVIDIA GPU (default: %(default)s)",
    )
    p.add_argument("--json", default=None, metavar="FILE", help="also write the figures as JSON")


def main(args: Any) -> int:
    """``jaxae bench``: the flags of :func:`add_arguments` -> the table on stdout (and ``--json``)."""
    if any(b <= 0 for b in args.batch_sizes):
        raise JaxaeError(f"--batch-sizes must be positive, got {args.batch_sizes}")
    quick = args.quick
    epochs = args.epochs or (3 if quick else 2)
    rounds = args.rounds or (3 if quick else 5)
    if args.train_images < 0:
        raise JaxaeError(f"--train-images must be >= 0, got {args.train_images}")
    if args.models is not None:
        results = run_models(
            args.dataset,
            args.models,
            batch_size=args.batch_sizes[0],
            epochs=epochs,
            rounds=rounds,
            train_images=args.train_images,
            matmul_precision=args.matmul_precision,
        )
        print(format_models_table(results))
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        return 0
    results = run_benchmark(
        args.dataset,
        batch_sizes=tuple(args.batch_sizes),
        epochs=epochs,
        rounds=rounds,
        torch_compile=not args.no_torch_compile and not quick,
        dataloader=True,
        matmul_precision=args.matmul_precision,
    )
    print(format_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0
