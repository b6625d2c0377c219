"""benchmarks/calibrate_knockoff.py --json: the record holds the recipe our thief ran with (read back from the
surrogate's own flags), the planned seeds, the device and the versions, beside one row per cell and seed."""

import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_the_json_is_the_run_record(tiny, victim, tmp_path):
    out = tmp_path / "calibration.json"
    command = [sys.executable, str(ROOT / "benchmarks/calibrate_knockoff.py"), "--victim", str(victim)]
    command += ["--pool", str(tiny), "--label", "soft", "--budget", "64", "--epochs", "1", "--seed", "3"]
    command += ["--seed", "1", "--no-art", "--ours-optimizer", "sgd", "--json", str(out)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    record = json.loads(out.read_text())
    ours = record["recipe"]["ours"]
    assert ours["attack"] == "knockoff" and ours["optimizer"] == "sgd" and ours["lr"] > 0  # resolved, not None
    assert record["recipe"]["budget"] == 64 and record["recipe"]["art"] is None
    assert record["seeds"] == [3, 1] and [r["seed"] for r in record["rows"]] == [3, 1]
    assert record["device"] == "cpu" and record["versions"]["torch"] == torch.__version__
    assert all(0.0 <= r["ours"] <= 1.0 and "art" not in r for r in record["rows"])
