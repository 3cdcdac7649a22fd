"""Human-readable tables of PROTOCOL.md figures (rich), shared by the CLI and the coordinator."""

from __future__ import annotations

import sys
from collections.abc import Mapping

from rich.console import Console
from rich.table import Table

from pluralfed.metrics import SetReport

# the width of tables written to a file or a pipe: rich's default there is 80 columns
UNWRAPPED_WIDTH = 200


def make_console(stderr: bool = False) -> Console:
    """The CLI's console. Into a file or a pipe (a log, `docker logs`, a CI job) rich wrapped at
    80 columns, splitting paths ("metrics in" found half of one) and the per-group table's rows:
    there lines are not wrapped and tables get UNWRAPPED_WIDTH; a terminal keeps its width."""
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() else UNWRAPPED_WIDTH
    return Console(stderr=stderr, soft_wrap=True, width=width)


def set_table(title: str, report: SetReport) -> Table:
    table = Table(title=title, title_justify="left")
    for col in ("predictor", "alignment", "worst group", "FI", "context gain"):
        table.add_column(col, justify="left" if col == "predictor" else "right")
    m = report.model
    table.add_row(
        "GPO",
        f"{m.alignment:.4f}",
        f"{m.worst:.4f} ({m.worst_group})",
        f"{m.fairness:.4f}",
        f"{report.context_gain:+.4f}",
    )
    for name, s in (("uniform", report.uniform_baseline), ("group prior", report.prior_baseline)):
        table.add_row(
            name, f"{s.alignment:.4f}", f"{s.worst:.4f} ({s.worst_group})", f"{s.fairness:.4f}", ""
        )
    return table


def per_group_table(title: str, reports: Mapping[str, SetReport]) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("group")
    table.add_column("set")
    table.add_column("alignment", justify="right")
    for set_name, rep in reports.items():
        for group, score in rep.per_group.items():
            table.add_row(group, set_name, f"{score:.4f}")
    return table


def print_reports(reports: Mapping[str, SetReport], console: Console | None = None) -> None:
    console = console or make_console()
    for set_name, rep in reports.items():
        console.print(set_table(set_name, rep))
    console.print(per_group_table("per group", reports))
