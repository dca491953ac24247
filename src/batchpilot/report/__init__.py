"""Self-contained HTML reports: one file, plots embedded, readable without batchpilot installed."""

from batchpilot.report.html import Document, Figure, Section, Table, render_html

__all__ = ["Document", "Figure", "Section", "Table", "render_html"]
