"""``jaxae bench``: the contention verdict and a single, final peak figure (no real timing here)."""

import json
import time

import numpy as np
import pytest
import torch

from jaxae import bench

QUIET_ROUNDS = {"256": {"jaxae": [1000.0, 1100.0, 1050.0], "torch": [400.0, 420.0, 410.0]}}


def test_a_quiet_run_is_not_contended():
    verdict = bench.contention(QUIET_ROUNDS, load_before=0.5, load_after=1.9, cores=2)
    assert verdict["contended"] is False and verdict["reasons"] == []
    assert verdict["load_average_1min"] == {"before": 0.5, "after": 1.9} and verdict["cores"] == 2
    assert verdict["round_spread"]["256"] == pytest.approx({"jaxae": 1.1, "torch": 1.05})


@pytest.mark.parametrize(
    "before, after, seen",
    [
        (3.4, 1.0, "1-minute load average 3.40 before the measurements, above the 2 cores in use"),
        (0.2, 6.0, "1-minute load average 6.00 after the measurements, above the 2 cores in use"),
    ],
)
def test_a_load_average_above_the_cores_is_contention(before, after, seen):
    verdict = bench.contention(QUIET_ROUNDS, before, after, cores=2)
    assert verdict["contended"] is True and verdict["reasons"] == [seen]


def test_rounds_that_disagree_are_contention():
    rounds = {
        "256": {"jaxae": [1000.0, 1010.0], "torch": [400.0, 90.0, 380.0]},
        "1024": {"jaxae": [2000.0, 1300.0], "torch": [500.0]},  # one round: no spread to judge
    }
    verdict = bench.contention(rounds, None, None, cores=16)  # no load average on this platform
    assert verdict["contended"] is True
    assert verdict["reasons"] == [
        "torch at batch 256 varied 4.44x between rounds (above 1.5x)",
        "jaxae at batch 1024 varied 1.54x between rounds (above 1.5x)",
    ]
    assert set(verdict["round_spread"]["1024"]) == {"jaxae"}


def test_the_limits_themselves_are_quiet():
    rounds = {"256": {"torch": [100.0, 150.0]}}
    assert bench.contention(rounds, 2.0, 2.0, cores=2)["contended"] is False
    assert bench.contention(rounds, 2.0, 2.0, cores=2, spread_limit=1.4)["contended"] is True


def _results(contended):
    row = {
        "jaxae": 1000.0,
        "torch": 400.0,
        "speedup_vs_torch": 2.5,
        "roofline_fraction": 0.01,
        "jax_compile_seconds": 0.5,
        "rounds_samples_per_s": {"jaxae": [1000.0, 990.0], "torch": [400.0, 120.0 if contended else 395.0]},
    }
    results = {
        "device": "cpu: test (2 cores)",
        "dataset": "mnist-sample",
        "train_samples": 4000,
        "matmul_precision": "highest",
        "peak_name": "fp32",
        "peak_matmul_flops": 5e10,
        "by_batch_size": {"256": row},
    }
    evidence = bench.contention({"256": row["rounds_samples_per_s"]}, 0.3, 1.0, cores=2)
    results.update(contended=evidence["contended"], contention=evidence)
    return results


def test_the_table_and_the_json_carry_the_verdict():
    contended = _results(contended=True)
    table = bench.format_table(contended).splitlines()
    warning = "WARNING: other work competed with this benchmark (torch at batch 256 varied 3.33x between rounds"
    assert table[0].startswith(warning) and table[-1] == table[0]
    assert "rerun on a quiet machine" in table[0]
    as_json = json.loads(json.dumps(contended))
    assert as_json["contended"] is True and as_json["contention"]["round_spread"]["256"]["torch"] > 3

    quiet = _results(contended=False)
    assert quiet["contended"] is False
    assert "WARNING" not in bench.format_table(quiet)


class _FakeMethod:
    """Stands in for a timed method: instant epochs, a given name."""

    compile_seconds = 0.25

    def __init__(self, name):
        self.name = name

    def run_epoch(self):
        time.sleep(0.001)  # a measurable epoch: the rate is samples / elapsed
        return 0.0


def test_the_peak_is_printed_once_final_and_contention_is_recorded(monkeypatch):
    peaks = iter([1e9, 4e9])  # a loaded first reading, a quiet second one
    loads = iter([0.1, 9.0])
    precisions = []
    monkeypatch.setattr(bench, "peak_matmul_flops", lambda precision: precisions.append(precision) or next(peaks))
    monkeypatch.setattr(bench, "load_average", lambda: next(loads))
    monkeypatch.setattr(bench, "cpu_threads", lambda: 2)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    monkeypatch.setattr(bench, "JaxMethod", lambda images, batch_size, config: _FakeMethod("jaxae"))
    monkeypatch.setattr(bench, "TorchMethod", lambda images, batch_size, compile=False: _FakeMethod("torch"))
    monkeypatch.setattr(bench, "TorchDataLoaderMethod", lambda *a: _FakeMethod("torch_dataloader"))
    progress = []
    results = bench.run_benchmark(batch_sizes=(256, 1024), epochs=1, rounds=2, torch_compile=False, log=progress.append)

    # the progress shows no peak and no roofline: they are only final after the second reading
    assert not [line for line in progress if "peak" in line or "roofline" in line], progress
    assert results["peak_matmul_flops"] == 4e9 and results["peak_matmul_flops_readings"] == [1e9, 4e9]
    head = results["by_batch_size"]["256"]
    assert head["roofline_fraction"] == pytest.approx(head["jaxae"] * results["model_flops_per_sample"] / 4e9)
    table = bench.format_table(results)
    assert table.count("GFLOP/s") == 1 and "matmul precision highest; peak fp32 matmul 4.0 GFLOP/s" in table
    assert precisions == ["highest", "highest"]  # the peak at the precision the steps run at
    # the load after the run (9.0 on 2 cores) is contention
    assert results["contended"] is True
    assert results["contention"]["load_average_1min"] == {"before": 0.1, "after": 9.0}
    assert "1-minute load average 9.00 after the measurements" in table.splitlines()[0]


def test_bench_on_images_the_document_s_model_cannot_take_is_one_line(tmp_path, capsys):
    from jaxae import cli
    from jaxae.data import write_idx_folder

    images, labels = np.zeros((16, 16, 16, 3), np.uint8), np.zeros(16, np.int32)
    write_idx_folder(tmp_path, train=(images, labels), test=(images, labels))
    code = cli.main(["bench", "--dataset", str(tmp_path), "--batch-sizes", "8", "--epochs", "1", "--rounds", "1"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "takes 28x28x1 images; the" in lines[0] and "are 16x16x3" in lines[0]


def test_the_peak_is_named_for_the_precision_and_the_backend():
    assert [bench.peak_name(p, "gpu") for p in ("default", "high", "highest")] == ["TF32", "TF32", "fp32"]
    assert [bench.peak_name(p, "cpu") for p in ("default", "high", "highest")] == ["fp32"] * 3
    assert bench.peak_name("default", "tpu") == "bf16 (1 pass)" and bench.peak_name("highest", "tpu").startswith("fp32")
    bench.set_torch_precision("highest")
    assert torch.backends.cuda.matmul.allow_tf32 is False and torch.backends.cudnn.allow_tf32 is False
    bench.set_torch_precision("default")
    assert torch.backends.cuda.matmul.allow_tf32 is True and torch.backends.cudnn.allow_tf32 is True
    bench.set_torch_precision("highest")


def test_models_are_all_or_a_checked_list():
    every = bench.model_names("all")
    assert "vanilla-mlp" in every and "vae-conv" in every and len(every) == len(set(every))
    assert bench.model_names("vae-conv, vanilla-mlp,vae-conv") == ["vae-conv", "vanilla-mlp"]
    with pytest.raises(bench.JaxaeError, match=r"^--models: unknown model sparse-conv, vq-mlp; choose all or from "):
        bench.model_names("sparse-conv,vq-mlp,vanilla-mlp")


@pytest.mark.slow
def test_bench_models_times_each_model_against_its_pytorch_twin(tmp_path, capsys):
    from jaxae import cli

    out = tmp_path / "bench.json"
    code = cli.main(
        ["bench", "--models", "vanilla-mlp,vae-conv", "--train-images", "512", "--batch-sizes", "256"]
        + ["--epochs", "1", "--rounds", "2", "--json", str(out)]
    )
    printed = capsys.readouterr().out
    assert code == 0
    results = json.loads(out.read_text())
    assert list(results["models"]) == ["vanilla-mlp", "vae-conv"] and results["train_samples"] == 512
    for name, row in results["models"].items():
        assert (
            row["jaxae"] > 0
            and row["torch"] > 0
            and row["speedup_vs_torch"] == pytest.approx(row["jaxae"] / row["torch"])
        )
        assert row["target"] == (1.3 if name.endswith("mlp") else 1.0)
        assert len(row["rounds_samples_per_s"]["jaxae"]) == 2
        assert f"| {name} | " in printed
    assert "contended" in results and "round_spread" in results["contention"]
