"""Training-step time of a gated network at density 1.0 against the same plain network, side by side.

At density 1.0 every channel is kept, so any extra time is the price of gating itself (saliency
predictors, the no-affine BN plus saliency scale, the gate loss). The two networks alternate in blocks:
each repeat times a block of `--steps` steps of one, then of the other (the order flips every repeat),
and its ratio is the gated block's fastest step over the plain block's (other processes only ever add
time: on a shared machine the fastest step of a block is its least disturbed one); the reported ratio
is the median over the repeats, so slow drifts of the machine's load cancel. The last line is
`bench gate_overhead: ratio=R goal=1.1 met=yes|no resnet20=.. mcifarnet=.. repeats=N`, R the worse model.

    python bench/gate_overhead.py                  # resnet20 and mcifarnet, batch 128, CPU, 1 thread, 7 repeats
    python bench/gate_overhead.py --models resnet20 --repeats 9 --threads 2
    python bench/gate_overhead.py --device cuda --amp   # bf16 autocast + channels_last
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

import benchlib
from gatetune import models

GOAL = 1.10   # gated training step at density 1.0 / plain, at most


def _net(name: str, gated: bool, policy: str = "fbs") -> torch.nn.Module:
    sites = {s: models.SiteSpec(gate=gated, density=1.0, weight=1e-8) for s in models.site_names(name)}
    c_in, size = models.default_input(name)
    return models.build(name, num_classes=10, in_channels=c_in, input_size=size, policy=policy, sites=sites)


def _step(net, opt, x, y, amp: bool = False) -> float:
    """Seconds of one SGD step (forward, loss + gate loss, backward, update), synchronised on CUDA."""
    cuda = x.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        logits, gate_loss = net(x, with_gate_loss=True)
        loss = F.cross_entropy(logits.float(), y) + gate_loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t


def measure(name: str, batch: int, steps: int, repeats: int, device: torch.device, amp: bool = False) -> dict:
    """Per repeat: a block of `steps` steps of each network (order alternating), ratio of block minima."""
    torch.manual_seed(0)
    fmt = torch.channels_last if amp and device.type == "cuda" else torch.contiguous_format
    nets = {"plain": _net(name, False).to(device, memory_format=fmt),
            "gated": _net(name, True).to(device, memory_format=fmt)}
    opts = {k: torch.optim.SGD(n.parameters(), lr=0.01, momentum=0.9) for k, n in nets.items()}
    c_in, size = models.default_input(name)
    x = torch.randn(batch, c_in, size, size, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,), device=device)
    for _ in range(2):                    # warm-up steps, each network
        for k in nets:
            _step(nets[k], opts[k], x, y, amp)
    ratios, ms = [], {"plain": [], "gated": []}
    for r in range(repeats):
        block = {}
        for k in (("plain", "gated") if r % 2 == 0 else ("gated", "plain")):
            block[k] = min(_step(nets[k], opts[k], x, y, amp) for _ in range(steps))
            ms[k].append(1e3 * block[k])
        ratios.append(block["gated"] / block["plain"])
    return {"ratio": statistics.median(ratios), "ratios": ratios,
            "plain_ms": statistics.median(ms["plain"]), "gated_ms": statistics.median(ms["gated"])}


def main() -> None:
    ap = benchlib.parser("gate_overhead", __doc__)
    ap.add_argument("--models", nargs="+", default=["resnet20", "mcifarnet"])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=4, help="steps per block (one block per network and repeat)")
    ap.add_argument("--repeats", type=int, default=7, help="alternating blocks; the ratio is their median (>= 5)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared machine, two threads stall at every parallel "
                         "region whenever another process holds a core; 0: torch's default)")
    ap.add_argument("--amp", action="store_true", help="bf16 autocast (+ channels_last on cuda)")
    a = ap.parse_args()
    if a.repeats < 1 or a.steps < 1:
        raise SystemExit("bench gate_overhead: --repeats and --steps must be >= 1")
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, batch {a.batch}, "
          f"amp {'bf16' if a.amp else 'off'}, {a.repeats} alternating repeats x {a.steps} steps per network "
          "(ratio per repeat = fastest gated step / fastest plain step of the block; reported: median of the ratios)")
    ratios = {}
    for name in a.models:
        r = measure(name, a.batch, a.steps, a.repeats, device, a.amp)
        ratios[name] = r["ratio"]
        print(f"{name:<10} plain {r['plain_ms']:8.1f} ms/step   gated(d=1.0) {r['gated_ms']:8.1f} ms/step   "
              f"ratio {r['ratio']:.3f}   per repeat " + " ".join(f"{v:.3f}" for v in r["ratios"]))
    worst = max(ratios.values())
    benchlib.final_line("gate_overhead", f"{worst:.3f}", GOAL, worst <= GOAL,
                        **{n: f"{v:.3f}" for n, v in ratios.items()}, repeats=a.repeats)


if __name__ == "__main__":
    main()
