"""gatetune.results: a search folder -> the density/accuracy table, CSV, markdown, Pareto plot.

Reads Ray Tune's experiment folder with json and pandas only (no Ray, no torch), so a report runs
beside a live search or on a copy of the folder elsewhere:

    python -c "from gatetune.results import write_report; print(write_report('runs/quickstart'))"
    df = read_report("runs/quickstart/report.csv")   # trial ids stay text (pandas alone reads 2512e764 as inf)
"""

from ._collect import STATUSES, ReportError, collect, trial_status
from ._plot import pareto_figure
from ._report import baseline_line, latex_table, read_report, seeds_markdown, write_report
from ._seeds import PARETO, dense_baseline, density_curve, front_candidates, front_trials, search_rows
from ._table import COLUMNS, pareto_mask, summary_markdown, table

__all__ = ["ReportError", "collect", "table", "summary_markdown", "seeds_markdown", "baseline_line", "write_report",
           "pareto_mask", "PARETO", "front_candidates", "front_trials", "search_rows", "dense_baseline", "COLUMNS",
           "STATUSES", "trial_status", "read_report", "density_curve", "latex_table", "pareto_figure"]
