"""The bench/ scripts run and end with their machine-readable line. Each runs in its own process
(a process can start Ray only once); the ones that start Ray are marked slow."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINE = re.compile(r"^bench (\w+): ratio=(-?\d+(?:\.\d+)?) goal=(\d+(?:\.\d+)?) met=(yes|no)((?: [\w.]+=\S+)*)$")


def run_bench(name: str, *args: str, timeout: int) -> dict:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bench", f"{name}.py"), *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    last = p.stdout.strip().splitlines()[-1]
    m = LINE.match(last)
    assert m and m.group(1) == name, f"last line is not `bench {name}: ratio=... goal=... met=...`: {last!r}"
    extra = dict(kv.split("=", 1) for kv in m.group(5).split())
    return {"ratio": float(m.group(2)), "goal": float(m.group(3)), "met": m.group(4), **extra}


def test_data_pipeline_quick():
    r = run_bench("data_pipeline", "--quick", timeout=120)
    assert r["goal"] == 5 and r["ratio"] > 0
    assert float(r["gatetune_s"]) > 0 and float(r["dataloader_w0_s"]) > 0


@pytest.mark.slow
def test_overhead_quick():
    r = run_bench("overhead", "--quick", timeout=300)
    assert r["goal"] == 0.5 and r["trials"] == "3"
    assert "reuse_all_in_s_per_trial" in r and float(r["ray_start_s"]) > 0


@pytest.mark.slow
def test_asha_vs_fifo_quick():
    r = run_bench("asha_vs_fifo", "--quick", timeout=300)
    assert r["goal"] == 0.35 and r["epochs_fifo"] == "8"   # 4 trials x 2 epochs
    assert 0 < r["ratio"] <= 1 and float(r["best_top1_fifo"]) > 0
