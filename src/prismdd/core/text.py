"""Plain-text tables for terminals and logs (the CLI listings, stage summaries, the audit table)."""
from __future__ import annotations


def format_table(rows: list[dict], cols: list[str]) -> str:
    """Plain-text table with a header rule; cells are ``str(row.get(col, ""))``."""
    widths = {c: max([len(c)] + [len(str(r.get(c, ""))) for r in rows]) for c in cols}
    lines = [" | ".join(c.ljust(widths[c]) for c in cols), "-+-".join("-" * widths[c] for c in cols)]
    lines += [" | ".join(str(r.get(c, "")).ljust(widths[c]) for c in cols) for r in rows]
    return "\n".join(line.rstrip() for line in lines)
