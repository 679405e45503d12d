"""``experiments/device_bench.sh``: every step at tiny sizes on the CPU (``SMOKE=1``), its figures
where it says, and a non-zero exit when a step fails or the time budget runs out."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent.parent / "experiments" / "device_bench.sh"


def _run(tmp_path, **env):
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "SMOKE": "1",
        "OUT": str(tmp_path / "out"),
        "TMPDIR": str(tmp_path),
        **env,
    }
    return subprocess.run(
        ["bash", str(SCRIPT)], capture_output=True, text=True, env=env, cwd=SCRIPT.parent.parent, timeout=900
    )


def test_a_spent_budget_fails_every_step_by_name_and_leaves_no_temporary_folder(tmp_path):
    proc = _run(tmp_path, BUDGET="0")
    assert proc.returncode == 1
    assert "the embedded MNIST sample" in proc.stdout
    assert "FAILED: versions (no time left) bench (no time left)" in proc.stderr
    assert not list(tmp_path.glob("jaxae-device-bench.*")), "the temporary folder was left behind"


def test_a_failing_step_fails_the_script(tmp_path):
    # an interpreter that fails every command: each step fails, and so does the script
    proc = _run(tmp_path, PYTHON="false", BUDGET="60")
    assert proc.returncode == 1 and "[versions] failed (exit 1)" in proc.stderr


@pytest.mark.slow  # every step of the script on the CPU: about 3 minutes on 2 cores
def test_smoke_runs_every_step_on_the_cpu(tmp_path):
    proc = _run(tmp_path, BUDGET="600")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = tmp_path / "out"
    bench = json.loads((out / "bench.json").read_text())
    assert bench["matmul_precision"] == "highest" and bench["speedup_vs_torch"] > 0
    assert json.loads((out / "bench_tf32.json").read_text())["matmul_precision"] == "default"
    assert set(json.loads((out / "bench_models.json").read_text())["models"]) == {"vanilla-mlp", "vae-conv"}
    lines = (out / "train.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "vanilla-mlp-float32",
        "vanilla-mlp-bfloat16",
        "vae-conv-bfloat16",
    ]
    assert [json.loads(line)["models"] for line in (out / "sweep.jsonl").read_text().splitlines()] == [1, 2]
    assert (out / "parallel.json").exists()
    assert not list(tmp_path.glob("jaxae-device-bench.*"))
