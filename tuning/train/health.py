"""Gating health: whether a trial's gates are dynamic at all, measured on the validation split.

For each gated site that drops channels (k < C_out), each output channel's selection frequency over the
inputs (models.GateRecorder.selection_counts, counted in eval-mode forwards) puts it in one of three groups:
    dynamic   kept for some inputs and dropped for others (1% < frequency < 99%)
    dead      (almost) never kept: capacity the network trains and never uses
    always    (almost) always kept: a static channel
A trial's `gate_health`:
    static     over 90% of its gated channels are dead or always: static pruning in disguise (a plainly
               pruned network would do, and run faster)
    collapsed  achieved density off its target beyond 0.05, or a site with no dynamic channel and dead ones
    ok         otherwise
    dense      no site drops channels (density 1.0, or nothing gated)
`gate_health_detail` names the worst site: the collapsed one, else the least dynamic.
"""
from __future__ import annotations

import json

__all__ = ["site_health", "health_metrics", "EDGE", "STATIC_SHARE", "DENSITY_TOLERANCE"]

EDGE = 0.01               # a channel kept (or dropped) for at most 1% of inputs counts as never (always)
STATIC_SHARE = 0.9        # a trial with more static channels than this is `static`
DENSITY_TOLERANCE = 0.05  # achieved density further than this from the target: `collapsed`


def site_health(net, counts: dict) -> dict[str, dict]:
    """{site: {channels, kept, dynamic, dead, always, density, target}} of the sites that drop channels;
    fractions of the site's channels, from `counts` (a GateRecorder's selection_counts() of the evaluation)."""
    out = {}
    for site, (kept, samples) in counts.items():
        g = net.gates[site]
        c = g.conv.out_channels
        if g.k >= c or samples == 0:
            continue
        freq = kept.double() / samples
        dead, always = int((freq <= EDGE).sum()), int((freq >= 1 - EDGE).sum())
        out[site] = {"channels": c, "kept": g.k, "dynamic": (c - dead - always) / c, "dead": dead / c,
                     "always": always / c, "density": float(freq.sum()) / c, "target": g.density}
    return out


def _verdict(sites: dict[str, dict]) -> tuple[str, str]:
    if not sites:
        return "dense", ""
    channels = sum(s["channels"] for s in sites.values())
    static = sum((s["dead"] + s["always"]) * s["channels"] for s in sites.values()) / channels
    worst = min(sites, key=lambda n: (sites[n]["dynamic"], -sites[n]["dead"]))
    off = [n for n, s in sites.items() if abs(s["density"] - s["target"]) > DENSITY_TOLERANCE]
    broken = [n for n, s in sites.items() if s["dynamic"] == 0 and s["dead"] > 0]
    s = sites[worst]
    detail = f"{worst}: {100 * s['dynamic']:.0f}% dynamic, {100 * s['dead']:.0f}% dead, {100 * s['always']:.0f}% always"
    if static > STATIC_SHARE:
        return "static", f"{100 * static:.0f}% of gated channels static; {detail}"
    if off:
        s = sites[off[0]]
        return "collapsed", f"{off[0]}: density {s['density']:.3f}, target {s['target']:g}"
    if broken:
        s = sites[broken[0]]
        return "collapsed", (f"{broken[0]}: no dynamic channel, {100 * s['dead']:.0f}% dead, "
                             f"{100 * s['always']:.0f}% always")
    return "ok", detail


def health_metrics(net, counts: dict) -> dict:
    """The metrics of one evaluation from its selection `counts` (GateRecorder.selection_counts(): {site:
    (per-channel keeps, samples)}): `dynamic` over all gated channels, `gate_health`, `gate_health_detail`,
    and `gate_sites`: a JSON string {site: {"dynamic", "dead", "always"}} (one string, not three numbers
    per site: Ray keeps running statistics of every numeric metric of every trial in the driver and its
    snapshot, which per-site numbers would multiply by the sites, 19 on resnet20)."""
    sites = site_health(net, counts)
    out = {"gate_sites": json.dumps({name: {k: round(s[k], 4) for k in ("dynamic", "dead", "always")}
                                     for name, s in sites.items()}, separators=(",", ":"))}
    channels = sum(s["channels"] for s in sites.values())
    out["dynamic"] = sum(s["dynamic"] * s["channels"] for s in sites.values()) / channels if channels else 0.0
    out["gate_health"], out["gate_health_detail"] = _verdict(sites)
    return out
