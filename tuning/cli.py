"""gatetune command line: parses arguments and calls one function per command.

    gatetune train CONFIG [key=value ...] [--out DIR]     one fixed config, in-process
    gatetune eval CHECKPOINT [data.root=...]              top-1/top-5/density/MACs/latency_ratio on the validation split
    gatetune layers MODEL                                 gate sites: name, aliases, C_in, C_out, dense MACs
    gatetune search CONFIG [key=value ...] [--address A] [--name N] [--storage P]
    gatetune resume RUN_DIR                               continue an interrupted search
    gatetune report RUN_DIR [--csv F] [--markdown F] [--latex F]   density/accuracy table of a search

User mistakes print one line (file, key, fix) and exit with status 2 before any work starts.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from gatetune.core.errors import UserError, one_line

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage mistake as one line (argparse prints the usage block, then the error)."""

    def error(self, message: str):
        self.exit(2, one_line(f"{self.prog}: error: {message}; see `{self.prog} --help`") + "\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="gatetune", description="Search and train dynamically gated CNNs.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    t = sub.add_parser("train", help="train one fixed config in this process (no Ray)")
    t.add_argument("config", help="YAML config file")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.epochs=3")
    t.add_argument("--out", help="run folder (default runs/<name>)")
    t.add_argument("--quiet", action="store_true", help="no progress lines")

    e = sub.add_parser("eval", help="evaluate a checkpoint on the full validation split")
    e.add_argument("checkpoint", help="a run folder's checkpoints/epoch_N.pt or a trial's checkpoint_N dir")
    e.add_argument("overrides", nargs="*", metavar="data.key=value", help="e.g. data.root=/data/imagenet")

    l = sub.add_parser("layers", help="list a model's gate sites")
    l.add_argument("model")
    l.add_argument("--num-classes", type=int, default=None)

    s = sub.add_parser("search", help="run a Ray Tune search described by a YAML file")
    s.add_argument("config")
    s.add_argument("overrides", nargs="*", metavar="key=value")
    s.add_argument("--address", help="Ray cluster to join: auto, HOST:PORT or ray://HOST:PORT (default: start Ray here)")
    s.add_argument("--name", help="experiment name (default: the YAML's name)")
    s.add_argument("--storage", help="parent folder or URI of the run folder (default: runs/)")
    s.add_argument("--dashboard-host", default="127.0.0.1", help="interface for the local Ray dashboard")
    s.add_argument("--verbose", action="store_true", help="also print Ray Tune's own status tables")
    s.add_argument("--job-metadata", action="store_true",
                   help="print the Ray job metadata of this search as JSON (for `ray job submit --metadata-json`) "
                        "and exit; the data and weights need not be on this machine")

    r = sub.add_parser("resume", help="continue an interrupted search")
    r.add_argument("run_dir")
    r.add_argument("--address")
    r.add_argument("--dashboard-host", default="127.0.0.1")
    r.add_argument("--verbose", action="store_true")

    rp = sub.add_parser("report", help="density/accuracy table of a search folder (Ray need not run)")
    rp.add_argument("run_dir")
    rp.add_argument("--csv", help="the table as CSV here (default RUN_DIR/report.csv)")
    rp.add_argument("--markdown", help="report.md here (default RUN_DIR/report.md)")
    rp.add_argument("--latex", metavar="F", help="also the density/accuracy table as a LaTeX tabular (booktabs) in F")
    return p


def _train(a) -> None:
    from gatetune.tuning import config as C
    from gatetune.tuning.train.run import train_run
    cfg = C.load(a.config, a.overrides)
    for line in cfg.notices:
        print(line, file=sys.stderr)
    out, m = train_run(cfg, a.out or os.path.join("runs", cfg.name), progress=not a.quiet)
    print(f"run folder: {out}")
    print(f"top1: {m['top1']:.2f}%  top5: {m['top5']:.2f}%  density: {100 * m['density']:.2f}%  "
          f"macs_ratio: {m['macs_ratio']:.3f}  epochs: {m['epoch']:g}" + ("  DIVERGED" if m["diverged"] else ""))


def _eval(a) -> None:
    from gatetune.tuning.train.evaluate import eval_checkpoint
    m = eval_checkpoint(a.checkpoint, a.overrides)
    print(f"top1: {m['top1']:.2f}%, top5: {m['top5']:.2f}%, density: {100 * m['density']:.2f}%, "
          f"macs: {m['macs']:.4g} ({100 * m['macs_ratio']:.1f}% of dense) [{m['images']} images]")
    sites = json.loads(m.get("gate_sites") or "{}")
    detail = f" ({m['gate_health_detail']})" if m.get("gate_health_detail") else ""
    print(f"gate_health: {m.get('gate_health', 'n/a')}{detail}")
    if sites:
        print(f"{'site':<24} {'density':>8} {'dynamic':>8} {'dead':>8} {'always':>8}")
        for s, h in sites.items():
            print(f"{s:<24} {100 * m[f'density/{s}']:7.1f}% " + " ".join(f"{100 * h[k]:7.1f}%" for k in ("dynamic", "dead", "always")))
    if m["latency_ratio"] is None:
        print(f"latency_ratio: n/a ({m['latency_note']})")
    else:
        print(f"latency_ratio: {m['latency_ratio']:.3f} (batch 1, CPU, 1 thread: channel-skipping "
              f"{m['latency_ms']:.3g} ms, dense {m['dense_latency_ms']:.3g} ms)")


def _layers(a) -> None:
    from gatetune import models
    from gatetune.core.errors import nearest
    if a.model not in models.list_models():
        raise models.ModelError(f"unknown model {a.model!r}; {nearest(a.model, models.list_models())}")
    c_in, size = models.default_input(a.model)
    rows = models.layers_table(a.model, num_classes=a.num_classes or 1000, in_channels=c_in, input_size=size)
    print(f"{a.model} at {c_in}x{size}x{size}: {len(rows)} sites")
    print(f"{'site':<24} {'aliases':<34} {'C_in':>6} {'C_out':>6} {'dense MACs':>12}")
    for r in rows:
        print(f"{r['site']:<24} {r['aliases'][:34]:<34} {r['c_in']:>6} {r['c_out']:>6} {r['dense_macs']:>12,}")


def _search(a) -> None:
    from gatetune.tuning import config as C
    if a.job_metadata:
        import json

        from gatetune.tuning.search.run import job_metadata
        cfg = C.load(a.config, a.overrides, environment=False)
        print(json.dumps(job_metadata(cfg, name=a.name, storage=a.storage, file=a.config)))
        return
    cfg = C.load(a.config, a.overrides)
    if a.address is None:   # Ray's start (a thread) overlaps the search stack's imports below
        from gatetune.tuning.search import cluster
        cluster.start_for_search(cfg, name=a.name, storage=a.storage, dashboard_host=a.dashboard_host)
    from gatetune.tuning.search.run import run_search
    run_dir, ok = run_search(cfg, address=a.address, name=a.name, storage=a.storage,
                             dashboard_host=a.dashboard_host, verbose=a.verbose)
    if not ok:
        raise SystemExit(1)


def _resume(a) -> None:
    from gatetune.tuning.search.run import resume_search
    _, ok = resume_search(a.run_dir, address=a.address, dashboard_host=a.dashboard_host, verbose=a.verbose)
    if not ok:
        raise SystemExit(1)


def _report(a) -> None:
    from gatetune import results
    df = results.write_report(a.run_dir, csv=a.csv, markdown=a.markdown, latex=a.latex)
    print(results.summary_markdown(df))
    if a.latex:
        print(f"LaTeX table: {a.latex}")


def main(argv: list[str] | None = None) -> int:
    try:
        return _command(argv)
    finally:
        cluster = sys.modules.get("gatetune.tuning.search.cluster")
        if cluster is not None:   # a local Ray `gatetune search` began starting (a thread) before it failed
            cluster.drop_start()


def _command(argv: list[str] | None) -> int:
    a = _parser().parse_args(argv)
    try:
        {"train": _train, "eval": _eval, "layers": _layers, "search": _search,
         "resume": _resume, "report": _report}[a.command](a)
    except UserError as e:
        print(f"gatetune {a.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    return 0


def run() -> None:
    """The `gatetune` command: the command, Ray's shutdown (search.cluster.shutdown: the autoscaler's monitor
    first, 1 s sooner), then an exit that skips the interpreter's teardown of torch's and Ray's modules (about
    2 s after every search, with nothing left to write: the run folder's files are closed, SQLite commits
    each write). A local Ray still starting when the command failed is not waited for: its processes die
    with this one (they are fate-shared with it)."""
    import logging
    rc = _command(None)
    if "ray" in sys.modules:
        from gatetune.tuning.search.cluster import shutdown
        shutdown()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


if __name__ == "__main__":
    run()
