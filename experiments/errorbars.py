"""The published tables again, 3 seeds per row through ``jaxae sweep``: mean ± sample std.

Command:   .venv/bin/python experiments/errorbars.py [--fashion-dir data/fashion-mnist] [--only ROWS] [--slow-rows-too]
           (``--list`` names the rows, ``--markdown`` prints the tables of docs/results.md)
Runtime:   on the project's 2-core CPU while other work shared it: the document table (8 rows) about
           3 minutes, the 8 MLP rows of the variants table about 5 minutes with their probes, the 3 conv
           rows on the sample about 2.5 minutes; by default that is all. The 3 conv rows on Fashion-MNIST
           take about 10 minutes each with 3 seeds (``--slow-rows-too``); without it ``--only fashion-conv``
           trains them with seed 0 only.
           The IWAE rows take about 3x their VAE row's time. ``--reprobe`` measures the probe columns
           again from the models a previous run left under --runs-dir (minutes, no training).
Expected:  the single-seed figures docs/results.md showed before, within about a standard deviation;
           e.g. the document's model (torch init, [0, 1]) test MSE 0.044 ± 0.002 on the sample and
           0.0139 ± 0.0004 on Fashion-MNIST; a spread far smaller than the gaps the results page draws
           conclusions from (conv vs MLP, Flax vs torch init, [0, 1] vs [-1, 1]). The torch-init [-1, 1]
           row on the sample gives 0.9244 for every seed (the output sits at the Sigmoid's floor).
Writes:    experiments/results/errorbars.json (merged: a partial run keeps the rows it did not run);
           the models under --runs-dir (default runs/errorbars, one sweep folder per row).

Each row is one sweep, ``sweep_configs(base, seed=[0, 1, 2])`` trained by ``fit_sweep`` (the
command ``jaxae sweep ... --seeds 0,1,2``), then every model is evaluated from its workdir as
``jaxae evaluate --probe`` (and ``--iw-samples 100`` for a VAE) does. The probe's pixel baseline
does not depend on the model, so it is computed once per dataset.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from pathlib import Path

import jax
import numpy as np

from jaxae import checkpoint
from jaxae.data import load_dataset
from jaxae.generation import generation_score, train_classifier
from jaxae.objectives import VARIANTS, importance_weighted_nll
from jaxae.probe import logistic_regression_accuracy
from jaxae.sweep import fit_sweep, sweep_configs
from jaxae.train import TrainConfig, encode

HERE = Path(__file__).resolve().parent
OUT_FILE = HERE / "results" / "errorbars.json"
SEEDS = (0, 1, 2)
IW_SAMPLES = 100
#: the variants whose models sample, and the generation score's figures each of their rows keeps
GENERATIVE = ("vae", "iwae", "vqvae")
GENERATION_METRICS = ("fd", "real_fd", "precision", "recall", "samples", "classifier_test_accuracy")
EPOCHS = 20
# Rows that would take too long on the project's 2-core CPU with 3 seeds: seed 0 only.
ONE_SEED = {
    "variants-fashion-vanilla-conv": "about 10 minutes per seed alone, 30 per 3-seed sweep on 2 shared cores",
    "variants-fashion-denoising-conv": "about 10 minutes per seed alone, 30 per 3-seed sweep on 2 shared cores",
    "variants-fashion-vae-conv": "about 11 minutes per seed alone, 33 per 3-seed sweep on 2 shared cores",
    "variants-fashion-vqvae-conv": "about 30 minutes per 3-seed sweep on 2 shared cores",
    # K = 5 samples decode 5 times per image: about 3x the VAE's time (335 s against 117 s on the sample)
    "variants-fashion-iwae-conv": "about 4x the conv VAE's time: 7,358 s for the 3-seed sweep on 2 shared cores",
}


def _rows() -> list[dict]:
    """Every row of both tables: id, table, dataset label and the settings that differ from the defaults."""
    rows = []
    for label in ("sample", "fashion"):
        for normalize in ("unit", "seed"):
            for init in ("torch", "flax"):
                rows.append(
                    {
                        "id": f"document-{label}-{init}-{normalize}",
                        "table": "document",
                        "dataset": label,
                        "settings": {"variant": "vanilla", "arch": "mlp", "init": init, "normalize": normalize},
                    }
                )
    for label in ("sample", "fashion"):
        # Every (variant, arch) the registry offers, MLPs first: the rows of the variants table.
        for variant, arch in [(v, a) for a in ("mlp", "conv") for v, spec in VARIANTS.items() if a in spec.archs]:
            rows.append(
                {
                    "id": f"variants-{label}-{variant}-{arch}",
                    "table": "variants",
                    "dataset": label,
                    "settings": {"variant": variant, "arch": arch, "init": "torch", "normalize": "unit"},
                }
            )
    # Colour: the document's model and the VAE, each as MLP and conv (make_colour_fashion.py).
    for arch in ("mlp", "conv"):
        for variant in ("vanilla", "vae"):
            rows.append(
                {
                    "id": f"variants-colour-{variant}-{arch}",
                    "table": "variants",
                    "dataset": "colour",
                    "settings": {"variant": variant, "arch": arch, "init": "torch", "normalize": "unit"},
                }
            )
    return rows


# label -> (the name the tables print, the name results JSON files use, flattened image size)
DATASETS = {
    "sample": ("mnist-sample", "mnist-sample", 784),
    "fashion": ("Fashion-MNIST", "fashion-mnist", 784),
    "colour": ("Colour Fashion-MNIST 32x32x3", "colour-fashion-mnist", 3072),
}


def _selected(rows: list[dict], only: str | None) -> list[dict]:
    """``--only``: comma list of row ids or words every part of which a row id contains (``mlp``, ``document``)."""
    if not only:
        return [r for r in rows if r["id"] not in ONE_SEED]
    picked = []
    for token in only.split(","):
        words = token.strip().split("-")
        matches = [r for r in rows if r["id"] == token.strip() or all(w in r["id"].split("-") for w in words)]
        if not matches:
            raise SystemExit(f"--only {token!r} matches no row; see --list")
        picked += [r for r in matches if r not in picked]
    return [r for r in rows if r in picked]


def _command(row: dict, dataset_arg: str, runs_dir: str, seeds: tuple[int, ...]) -> str:
    s = row["settings"]
    workdir = f"{runs_dir}/{row['id']}"
    sweep = (
        f"jaxae sweep --workdir {workdir} --variant {s['variant']} --arch {s['arch']} --dataset {dataset_arg} "
        f"--epochs {EPOCHS} --init {s['init']} --normalize {s['normalize']} --seeds {','.join(map(str, seeds))} "
        "--no-figures --save-every 20 --no-progress"
    )
    if row["table"] == "variants":
        sweep += f"; jaxae evaluate --workdir {workdir}/seedN --probe{_evaluate_flags(s['variant'])}"
    return sweep


def _evaluate_flags(variant: str) -> str:
    """What ``jaxae evaluate`` adds to ``--probe`` for a variant's row."""
    spec = VARIANTS[variant]
    flags = f" --iw-samples {IW_SAMPLES}" if spec.variational else ""
    return flags + (" --generation" if variant in GENERATIVE else "")


def _stats(values: list[float]) -> dict:
    arr = np.asarray(values, np.float64)
    return {
        "values": [float(v) for v in arr],
        "mean": float(arr.mean()),
        "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0,
    }


def _probe(trainer, state, train, test) -> float:
    """``probe_accuracy``: the probe on the model's frozen codes."""
    codes_train, codes_test = (encode(trainer, state, x.images) for x in (train, test))
    return logistic_regression_accuracy(codes_train, train.labels, codes_test, test.labels)


def _pixel_baseline(train, test) -> float:
    """``probe_accuracy_pixels``: the probe on the raw pixels, the same for every row of a dataset."""
    pixels = [x.images.reshape(len(x), -1).astype(np.float32) / 255.0 for x in (train, test)]
    return logistic_regression_accuracy(pixels[0], train.labels, pixels[1], test.labels)


def _evaluate(workdir: Path, train, test, variant: str, classifier) -> dict:
    """What ``jaxae evaluate --probe [--iw-samples 100] [--generation]`` adds to a model's final test
    metrics; the generation score's classifier is the dataset's one, trained once."""
    trainer, state, config = checkpoint.restore(workdir)
    out = {"probe_accuracy": _probe(trainer, state, train, test)}
    if VARIANTS[variant].variational:
        images = jax.device_put(test.images.reshape(len(test), -1))
        fn = importance_weighted_nll(trainer.normalization, config.likelihood, IW_SAMPLES)
        out["test_nll_iw"] = float(trainer.jit_mean_over(state, images, fn=fn, batch_size=100)["nll_iw"])
    if variant in GENERATIVE:
        score = generation_score(trainer, state, train, test, classifier=classifier)
        out.update({f"generation_{k}": score[k] for k in GENERATION_METRICS})
    return out


def _load() -> dict[str, dict]:
    if OUT_FILE.exists():
        return {r["id"]: r for r in json.loads(OUT_FILE.read_text())["rows"]}
    return {}


def _save(done: dict[str, dict], order: list[str]) -> None:
    rows = [done[i] for i in order if i in done]
    doc = {
        "description": (
            "Each row: one jaxae sweep over seeds (20 epochs, batch 256, Adam 1e-3), every model evaluated; "
            "per-seed values, their mean and sample standard deviation (ddof=1). Produced by "
            "experiments/errorbars.py."
        ),
        "rows": rows,
    }
    tmp = OUT_FILE.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, OUT_FILE)  # a run stopped mid-write keeps the previous file


def _pm(stat: dict, digits: int, sign: bool = False) -> str:
    """``mean ± std``, both to the std's first significant digit (at least ``digits`` decimals); one run: the mean."""
    std = stat["std"]
    if len(stat["values"]) > 1 and std > 0:
        digits = max(digits, -math.floor(math.log10(std)))
    mean = f"{stat['mean']:+.{digits}f}" if sign else f"{stat['mean']:.{digits}f}"
    if len(stat["values"]) == 1:
        return mean
    return f"{mean} ± 0" if std == 0 else f"{mean} ± {std:.{digits}f}"


def _one_seed(variants_rows: list[dict], row: dict) -> dict | None:
    """A row of ``variants.json`` (one ``jaxae train`` run, seed 0) in this file's shape, n = 1."""
    label = DATASETS[row["dataset"]][1]
    s = row["settings"]
    for v in variants_rows:
        if (v["dataset"], v["variant"], v["arch"]) == (label, s["variant"], s["arch"]):
            metrics = {
                k: {"values": [v[k]], "mean": v[k], "std": 0.0} for k in v if k.startswith(("test_", "probe_acc"))
            }
            if "test_psnr_denoised" in v:
                gain = v["test_psnr_denoised"] - v["test_psnr_noisy"]
                metrics["test_psnr_gain"] = {"values": [gain], "mean": gain, "std": 0.0}
            return {"n": 1, "metrics": metrics, "probe_accuracy_pixels": v["probe_accuracy_pixels"], "train": v}
    return None


def markdown(done: dict[str, dict], rows: list[dict]) -> str:
    """Both tables of docs/results.md from the results (rows not swept: variants.json's seed-0 run, n = 1)."""
    variants_file = HERE / "results" / "variants.json"
    variants_rows = json.loads(variants_file.read_text()) if variants_file.exists() else []
    doc = [
        "| dataset | init | inputs | n | test MSE (input units) | test MSE (pixels, [0,1]) | wall s, 3 seeds |",
        "|---|---|---|---|---|---|---|",
    ]
    var = [
        "| dataset | variant | arch | n | test MSE | the application's number | probe accuracy: codes (pixels) | wall s, all seeds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    gen = [
        "| dataset | variant | arch | n | fd | real_fd (floor) | precision | recall | N | classifier accuracy |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    commands = {"document": ["| row | command |", "|---|---|"], "variants": ["| row | command |", "|---|---|"]}
    for row in rows:
        r = done.get(row["id"])
        s = row["settings"]
        name, _, input_dim = DATASETS[row["dataset"]]
        if r is not None:
            commands[row["table"]].append(f"| {row['id']} | `{r['command']}` |")
        if row["table"] == "document":
            if r is None:
                continue
            m = r["metrics"]
            inputs = "unit [0,1]" if s["normalize"] == "unit" else "seed [-1,1]"
            doc.append(
                f"| {name} | {s['init']} | {inputs} | {r['n']} | {_pm(m['test_mse'], 4)} | "
                f"{_pm(m['test_mse_pixels'], 4)} | {r['sweep_seconds']:.0f} |"
            )
            continue
        seconds = f"{r['sweep_seconds']:.0f}" if r is not None else None
        if r is None:
            r = _one_seed(variants_rows, row)
            if r is None:
                continue
            seconds = f"{r['train']['train_seconds']:.0f} (one `jaxae train`)"
            iw = _evaluate_flags(s["variant"])
            dataset_arg = "mnist-sample" if row["dataset"] == "sample" else "data/fashion-mnist"
            workdir = f"runs/{s['variant']}-{s['arch']}-{row['dataset']}"
            command = (
                f"jaxae train --workdir {workdir} --variant {s['variant']} --arch {s['arch']} --dataset {dataset_arg} "
                f"--epochs {EPOCHS}; jaxae evaluate --workdir {workdir} --probe{iw}"
            )
            commands["variants"].append(f"| {row['id']} (seed 0 only) | `{command}` |")
        m = r["metrics"]
        mse = _pm(m["test_mse_pixels"], 4)
        if s["variant"] == "vanilla":
            app = f"compression {input_dim} -> {s.get('latent_dim', 32)} floats"
        elif s["variant"] == "denoising":
            app = (
                f"PSNR {m['test_psnr_noisy']['mean']:.1f} -> {_pm(m['test_psnr_denoised'], 2)} dB "
                f"(gain {_pm(m['test_psnr_gain'], 1, sign=True)})"
            )
        elif s["variant"] == "sparse":
            zero = m["test_code_zero_fraction"]
            app = (
                f"code L1 {_pm(m['test_code_l1'], 3)}, "
                f"{_pm({**zero, 'mean': 100 * zero['mean'], 'std': 100 * zero['std']}, 0)}% of code units zero"
            )
        elif s["variant"] == "vqvae":
            app = (
                f"codebook perplexity {_pm(m['test_perplexity'], 1)}, "
                f"{_pm(m['test_dead_codes'], 0)} of {s.get('codebook_size', 512)} codes dead"
            )
        elif s["variant"] == "iwae":
            app = (
                f"IW bound {_pm(m['test_iw_bound'], 1)} (K={s.get('iwae_samples', 5)}), -ELBO "
                f"{_pm(m['test_neg_elbo'], 1)}, IW NLL {_pm(m['test_nll_iw'], 1)} (K={IW_SAMPLES})"
            )
        else:
            app = (
                f"-ELBO {_pm(m['test_neg_elbo'], 1)}, IW NLL {_pm(m['test_nll_iw'], 1)} (K={IW_SAMPLES}), "
                f"KL {_pm(m['test_kl'], 1)}"
            )
        if "generation_fd" in m:
            g = {k: m[f"generation_{k}"] for k in GENERATION_METRICS}
            gen.append(
                f"| {name} | {s['variant']} | {s['arch']} | {r['n']} | {_pm(g['fd'], 1)} | {_pm(g['real_fd'], 2)} | "
                f"{_pm(g['precision'], 3)} | {_pm(g['recall'], 3)} | {g['samples']['mean']:.0f} | "
                f"{g['classifier_test_accuracy']['mean']:.3f} |"
            )
        probe = f"{_pm(m['probe_accuracy'], 3)} ({r['probe_accuracy_pixels']:.3f})"
        var.append(f"| {name} | {s['variant']} | {s['arch']} | {r['n']} | {mse} | {app} | {probe} | {seconds} |")
    return "\n\n".join("\n".join(t) for t in (var, commands["variants"], gen, doc, commands["document"]))


def reprobe(done: dict[str, dict], rows: list[dict], runs_dir: Path, datasets: dict[str, str]) -> None:
    """The probe columns again, from each seed's model in ``runs_dir``: for a fix of the probe."""
    for label, dataset in datasets.items():
        todo = [
            r
            for r in rows
            if r["table"] == "variants"
            and r["dataset"] == label
            and r["id"] in done
            and all((runs_dir / r["id"] / f"seed{seed}").is_dir() for seed in done[r["id"]]["seeds"])
        ]
        if not todo or not os.path.isdir(dataset) and label != "sample":
            continue
        train, test = load_dataset(dataset, "train"), load_dataset(dataset, "test")
        baseline = _pixel_baseline(train, test)
        for row in todo:
            out = done[row["id"]]
            values = []
            for seed in out["seeds"]:
                trainer, state, _ = checkpoint.restore(runs_dir / row["id"] / f"seed{seed}")
                values.append(_probe(trainer, state, train, test))
            out["metrics"]["probe_accuracy"] = _stats(values)
            out["probe_accuracy_pixels"] = baseline
            out["probe"] = "cosine-decayed Adam (measured again by --reprobe)"
            _save(done, [r["id"] for r in rows])
            print(json.dumps({"id": row["id"], "probe_accuracy": values, "pixels": baseline}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--fashion-dir",
        default="data/fashion-mnist",
        help="a folder of the Fashion-MNIST IDX files (see docs/datasets.md)",
    )
    parser.add_argument(
        "--colour-dir",
        default="data/colour-fashion-mnist",
        help="the folder experiments/make_colour_fashion.py writes",
    )
    parser.add_argument("--only", help="comma list of row ids or id words, e.g. document,mlp-sample (see --list)")
    parser.add_argument("--list", action="store_true", help="print the row ids and exit")
    parser.add_argument(
        "--slow-rows-too",
        action="store_true",
        help="give the slow rows (the conv nets on Fashion-MNIST) 3 seeds too, and include them when --only is absent",
    )
    parser.add_argument("--runs-dir", default="runs/errorbars", help="one sweep folder per row inside")
    parser.add_argument("--markdown", action="store_true", help="print both tables of docs/results.md and exit")
    parser.add_argument(
        "--reprobe",
        action="store_true",
        help="measure the probe columns again from the models under --runs-dir, without training (rows whose "
        "models are not there are left as they are)",
    )
    args = parser.parse_args()

    rows = _rows()
    if args.markdown:
        print(markdown(_load(), rows))
        return
    if args.list:
        for r in rows:
            print(r["id"] + (f"  (1 seed: {ONE_SEED[r['id']]})" if r["id"] in ONE_SEED else ""))
        return
    if args.reprobe:
        reprobe(_load(), rows, Path(args.runs_dir), {"sample": "mnist-sample", "fashion": args.fashion_dir})
        return
    one_seed = {} if args.slow_rows_too else ONE_SEED
    selected = _selected(rows, args.only) if args.only or not args.slow_rows_too else rows
    done = _load()
    datasets = {
        "sample": ("mnist-sample", "mnist-sample"),
        "fashion": (args.fashion_dir, "data/fashion-mnist"),
        "colour": (args.colour_dir, "data/colour-fashion-mnist"),
    }
    loaded: dict[str, tuple] = {}
    for row in selected:
        dataset, dataset_arg = datasets[row["dataset"]]
        if row["dataset"] != "sample" and not os.path.isdir(dataset):
            print(f"skipping {row['id']}: no {DATASETS[row['dataset']][0]} folder at {dataset}", flush=True)
            continue
        seeds = (0,) if row["id"] in one_seed else SEEDS
        s = row["settings"]
        base = TrainConfig(dataset=dataset, epochs=EPOCHS, **s)
        workdir = Path(args.runs_dir) / row["id"]
        shutil.rmtree(workdir, ignore_errors=True)  # a rerun of a row replaces its scratch models
        t0 = time.perf_counter()
        result = fit_sweep(
            sweep_configs(base, seed=list(seeds)), workdir, progress=False, save_every=EPOCHS, figures=False
        )
        sweep_seconds = time.perf_counter() - t0
        finals = [{k: v for k, v in h[-1].items() if k.startswith("test_")} for h in result.histories]
        if row["table"] == "variants":
            if row["dataset"] not in loaded:
                train, test = load_dataset(dataset, "train"), load_dataset(dataset, "test")
                loaded[row["dataset"]] = (train, test, _pixel_baseline(train, test), train_classifier(train, test))
            train, test, baseline, classifier = loaded[row["dataset"]]
            for final, model_dir in zip(finals, result.workdirs, strict=True):
                final.update(_evaluate(model_dir, train, test, s["variant"], classifier))
        if s["variant"] == "denoising":
            for final in finals:
                final["test_psnr_gain"] = final["test_psnr_denoised"] - final["test_psnr_noisy"]
        metrics = sorted({k for f in finals for k in f})
        out = {
            "id": row["id"],
            "table": row["table"],
            "dataset": DATASETS[row["dataset"]][1],
            "settings": {**s, "epochs": EPOCHS, "batch_size": base.batch_size, "lr": base.lr},
            "command": _command(row, dataset_arg, args.runs_dir, seeds),
            "n": len(seeds),
            "seeds": list(seeds),
            "sweep_seconds": sweep_seconds,
            "metrics": {m: _stats([f[m] for f in finals]) for m in metrics},
        }
        if row["table"] == "variants":
            out["probe_accuracy_pixels"] = loaded[row["dataset"]][2]
            if VARIANTS[s["variant"]].variational:
                out["iw_samples"] = IW_SAMPLES
        if row["id"] in one_seed:
            out["fewer_seeds_because"] = ONE_SEED[row["id"]]
        bad = [m for m, st in out["metrics"].items() if not math.isfinite(st["mean"])]
        if bad:
            out["not_finite"] = bad
        done[row["id"]] = out
        _save(done, [r["id"] for r in rows])
        brief = {m: f"{st['mean']:.4g} ± {st['std']:.2g}" for m, st in out["metrics"].items()}
        print(json.dumps({"id": row["id"], "sweep_seconds": round(sweep_seconds, 1), **brief}), flush=True)


if __name__ == "__main__":
    main()
