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


def test_folder_pipeline_quick():
    r = run_bench("folder_pipeline", "--quick", timeout=180)
    assert r["goal"] == 2 and r["ratio"] > 0 and r["n"] == "160" and float(r["ratio_w1"]) == r["ratio"]
    assert float(r["gatetune_w1_img_s_per_worker"]) > 0 and float(r["torchvision_w1_img_s_per_worker"]) > 0


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
    ratios = [float(x) for x in r["ratios"].split(",")]   # one ASHA search per order of the same configs
    assert r["orders"] == "3" and len(ratios) == 3 and abs(sum(ratios) / 3 - r["ratio"]) < 1e-3
    assert r["recheck"] == "yes" and all(int(e) <= 8 for e in r["epochs_asha"].split(","))


@pytest.mark.slow
def test_vs_optuna_quick():
    r = run_bench("vs_optuna", "--quick", timeout=600)
    assert r["goal"] == 1.1 and r["trials"] == "4" and r["rounds"] == "1"
    assert r["ratio"] > 0 and float(r["ray_start_s"]) > 0 and float(r["best_top1_optuna"]) > 0
    assert r["epochs_gatetune"].isdigit() and r["epochs_optuna"].isdigit()
    assert float(r["start_beside_imports_s"]) > 0 and float(r["shutdown_s"]) > 0
    done, front = map(int, r["front_latency_in_trial"].split("/"))
    assert 1 <= front and done == front   # every front trial measured its own latency_ratio in its trial


@pytest.mark.slow
def test_ladder_quick():
    r = run_bench("ladder", "--quick", timeout=600)
    assert r["goal"] == 0.5 and r["workload"] == "digits" and r["ratio"] >= 0
    assert int(r["ladder_epochs"]) <= 2 and int(r["independent_epochs"]) <= 4   # 2 x 1 epoch, 2 x 2 epochs


@pytest.mark.slow
def test_gpu_throughput_cpu_quick():
    r = run_bench("gpu_throughput", "--device", "cpu", "--quick", timeout=400)
    assert r["goal"] == 2 and r["device"] == "cpu" and r["ratio"] > 0
    assert float(r["alone_img_s"]) > 0 and float(r["shared_total_img_s"]) > 0


@pytest.mark.slow
def test_cifar_recipes_cpu_quick():
    """Both full-scale recipes' own configs, shortened, on the bundled CIFAR-10 subset (quick: resnet20 only)."""
    r = run_bench("cifar_recipes", "--device", "cpu", "--quick", timeout=400)
    assert r["goal"] == 0.5 and r["device"] == "cpu" and r["dataset"] == "folder" and r["ratio"] > 0
    assert float(r["resnet20_full_h"]) > 0


def test_benchlib_final_line_is_the_parsed_format(capsys):
    """bench/benchlib.py's final_line prints exactly the line run_bench parses: booleans as yes/no, items in
    the order given, None items left out; a value with a space is refused (the line would not parse)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("benchlib", os.path.join(ROOT, "bench", "benchlib.py"))
    benchlib = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchlib)
    line = benchlib.final_line("demo", "0.42", 0.5, True, trials=3, amp=False, device=None, ratios="0.1,0.2")
    assert line == "bench demo: ratio=0.42 goal=0.5 met=yes trials=3 amp=no ratios=0.1,0.2"
    assert capsys.readouterr().out == line + "\n"
    m = LINE.match(line)
    assert m and m.group(1) == "demo" and m.group(4) == "yes" and m.group(5) == " trials=3 amp=no ratios=0.1,0.2"
    with pytest.raises(ValueError, match="one word"):
        benchlib.final_line("demo", "1.0", 2, False, where="two words")


@pytest.mark.parametrize("name", ["gpu_throughput", "cifar_recipes", "overhead", "data_pipeline", "vs_optuna", "ladder",
                                  "folder_pipeline"])
def test_cuda_without_a_gpu_is_one_line(name):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    args = ["--device", "cuda"] if name not in ("gpu_throughput", "cifar_recipes") else []   # their default: cuda
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bench", f"{name}.py"), *args], cwd=ROOT,
                       env={**os.environ, "RAY_AUTH_MODE": "disabled"}, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and not p.stdout.strip()
    assert len(p.stderr.strip().splitlines()) == 1 and "--device cpu" in p.stderr, p.stderr


@pytest.mark.slow
def test_scale_quick():
    r = run_bench("scale", "--quick", timeout=300)
    assert r["goal"] == 0.2 and r["met"] in ("yes", "no")
    for n in ("5", "20"):   # the small and the large search, each measured
        assert float(r[f"report_s_{n}"]) > 0 and float(r[f"bytes_per_trial_{n}"]) > 0
        assert f"s_per_trial_{n}" in r and f"driver_rss_growth_mb_{n}" in r
    assert float(r["s_per_trial_20"]) == r["ratio"] and float(r["wall"]) > 0
