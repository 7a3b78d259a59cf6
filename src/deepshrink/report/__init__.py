"""Self-contained HTML report of a run, built from its ``metrics.json`` document."""
from deepshrink.report.html import render_report, write_report

__all__ = ["render_report", "write_report"]
