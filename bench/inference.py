"""Realised speed of gating: batch-1 latency of the channel-skipping path against the dense network.

For each model, one set of random weights (BN running statistics calibrated on random images, so the
activations have a realistic scale) is gated at each density (top-k: the density is exact). Variants,
timed call by call in turn on the same images so that machine noise hits all alike (medians):
  plain    the registry's dense network as trained (conv + BN + ReLU), no gates
  dense    the same weights as the gated nets, every gated conv computing all channels, BN folded
           (models.dense_net: the latency_ratio baseline of `gatetune eval`, a strict one)
  masked   the gated network as trained and evaluated (all channels computed, losers zeroed)
  skip     models.SkipNet: per gated site the variant (skip the suppressed channels, or the dense conv
           and keep the winners) measured fastest on this machine (models/inference/autotune.py; the first forward
           calibrates, untimed here), the same path `gatetune eval` times (models.measure_latency)
Outputs of skip are checked against masked (max |difference| relative to max |masked|).
The last line is `bench inference: ratio=R goal=0.55 met=yes|no worst=W ...` with R = skip / dense
latency of mcifarnet at density 0.5, W the largest skip / dense ratio of all models and densities;
met needs R <= 0.55 and W <= 1.00 (and matching outputs). The other ratios follow as key=value items.

    python bench/inference.py                       # digitnet, resnet20, mcifarnet; 1 thread; ~1 min on 2 cores
    python bench/inference.py --threads 2 --rounds 8
    python bench/inference.py --models mcifarnet --densities 0.5
    python bench/inference.py --device cuda         # CUDA-synchronised timing, channels_last
"""
from __future__ import annotations

import math
import statistics

import torch

import benchlib
from gatetune import models
from gatetune.models.inference.skip import time_interleaved

GOAL = 0.55   # mcifarnet at density 0.5: skipping latency <= 0.55 x dense
WORST = 1.00  # and never slower than dense, for every model and density


@torch.no_grad()
def _calibrate(net: torch.nn.Module, c_in: int, size: int, batches: int = 4) -> None:
    """BN running statistics = the average over a few random batches (instead of mean 0, var 1)."""
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d) and m.track_running_stats]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None   # cumulative average
    net.train()
    gen = torch.Generator().manual_seed(1)
    for _ in range(batches):
        net(torch.randn(32, c_in, size, size, generator=gen))
    for m, momentum in zip(bns, saved):
        m.momentum = momentum
    net.eval()


def _gated(name: str, density: float, state: dict | None) -> models.GatedNet:
    """`name` gated at every site at `density`, with the weights of `state` when given."""
    c_in, size = models.default_input(name)
    sites = {s: models.SiteSpec(gate=True, density=density) for s in models.site_names(name)}
    net = models.build(name, num_classes=10, in_channels=c_in, input_size=size, sites=sites)
    if state is not None:   # the same weights at every density (top-k count is not a weight)
        net.load_state_dict(state)
    return net.eval()


def measure(name: str, densities: list[float], images: int, rounds: int, device: torch.device,
            skip_kwargs: dict | None = None) -> dict:
    torch.manual_seed(0)
    c_in, size = models.default_input(name)
    plain = models.build(name, num_classes=10, in_channels=c_in, input_size=size).eval()
    _calibrate(plain, c_in, size)
    first = _gated(name, densities[0], None)
    nets = {d: first if d == densities[0] else _gated(name, d, first.state_dict()) for d in densities}
    for net in nets.values():   # each density its own BN statistics (what it would be trained to)
        _calibrate(net, c_in, size)
    cuda = device.type == "cuda"
    fmt = torch.channels_last if cuda else torch.contiguous_format
    fns = {"plain": plain, "dense": models.dense_net(first)}
    for d, net in nets.items():
        fns[f"masked@{d:g}"] = net
        fns[f"skip@{d:g}"] = models.SkipNet(net, **(skip_kwargs or {}))
    fns = {k: m.to(device, memory_format=fmt) for k, m in fns.items()}
    x = torch.randn(images, c_in, size, size, generator=torch.Generator().manual_seed(2))
    x = x.to(device).contiguous(memory_format=fmt)
    errors = {}
    with torch.inference_mode():
        for d in nets:
            ref = fns[f"masked@{d:g}"](x)
            err = float((fns[f"skip@{d:g}"](x) - ref).abs().max() / ref.abs().max())
            errors[d] = float("inf") if math.isnan(err) else err   # NaN (an overflow) counts as a mismatch
    times = time_interleaved(fns, x.split(1), rounds=rounds, warmup=2, sync=cuda)
    return {"ms": {k: 1e3 * statistics.median(v) for k, v in times.items()}, "errors": errors}


def main() -> None:
    ap = benchlib.parser("inference", __doc__)
    ap.add_argument("--models", nargs="+", default=["digitnet", "resnet20", "mcifarnet"])
    ap.add_argument("--densities", nargs="+", type=float, default=[0.25, 0.5, 0.75])
    ap.add_argument("--images", type=int, default=16, help="distinct batch-1 inputs per round")
    ap.add_argument("--rounds", type=int, default=5, help="timed passes over the inputs (after 2 warm-up)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--force", default=None,
                    help="restrict SkipNet's per-gate variants, e.g. 'native' (no forced oneDNN) or 'skip'")
    ap.add_argument("--no-kernel", action="store_true", help="SkipNet in torch ops only (kernel=False)")
    a = ap.parse_args()
    device = torch.device(a.device)
    torch.set_num_threads(a.threads)
    where = f"CUDA {torch.cuda.get_device_name()}, channels_last" if a.device == "cuda" else "CPU"
    print(f"torch {torch.__version__}, {where}, {torch.get_num_threads()} thread(s), batch 1, median of "
          f"{a.images * a.rounds} interleaved forwards per variant; ratio = variant / dense (BN folded)")
    print(f"{'model':<10} {'density':>7} {'plain ms':>9} {'dense ms':>9} {'masked ms':>10} {'skip ms':>8} "
          f"{'skip/dense':>10} {'skip/plain':>10} {'masked/dense':>12} {'max rel err':>11}")
    ratios, vs_plain, worst_err = {}, {}, 0.0
    for name in a.models:
        r = measure(name, a.densities, a.images, a.rounds, device,
                    {"force": a.force, "kernel": not a.no_kernel})
        ms = r["ms"]
        for d in a.densities:
            skip, masked = ms[f"skip@{d:g}"], ms[f"masked@{d:g}"]
            ratios[(name, d)] = skip / ms["dense"]
            vs_plain[(name, d)] = skip / ms["plain"]
            worst_err = max(worst_err, r["errors"][d])
            print(f"{name:<10} {d:>7g} {ms['plain']:>9.3f} {ms['dense']:>9.3f} {masked:>10.3f} {skip:>8.3f} "
                  f"{skip / ms['dense']:>10.3f} {skip / ms['plain']:>10.3f} {masked / ms['dense']:>12.3f} "
                  f"{r['errors'][d]:>11.1e}")
    match = worst_err <= 1e-4
    key = ("mcifarnet", 0.5) if ("mcifarnet", 0.5) in ratios else next(iter(ratios))
    ratio, worst = ratios[key], max(ratios.values())
    worst_at = max(ratios, key=ratios.get)
    met = ratio <= GOAL and worst <= WORST and match
    benchlib.final_line("inference", f"{ratio:.3f}", GOAL, met, worst=f"{worst:.3f}",
                        worst_at=f"{worst_at[0]}@{worst_at[1]:g}", model=f"{key[0]}@{key[1]:g}",
                        vs_plain=f"{vs_plain[key]:.3f}",
                        **{f"{n}@{d:g}": f"{v:.3f}" for (n, d), v in ratios.items() if (n, d) != key},
                        outputs_match=match, max_rel_err=f"{worst_err:.1e}", threads=torch.get_num_threads(),
                        device=a.device, force=a.force or None, kernel="off" if a.no_kernel else None)


if __name__ == "__main__":
    main()
