"""Tables and files of the benchmark CLIs: markdown tables, results JSON, CSV."""
from __future__ import annotations

import csv
import json
import os


def fmt_ms(ms) -> str:
    return "-" if ms is None else (f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}")


def fmt(x, spec: str = "{:.0f}") -> str:
    return "-" if x is None else spec.format(x)


def markdown_table(header, rows, right=(), free_last: bool = False) -> list:
    """Lines of a markdown table padded to its widest cells. right: indexes of right-aligned
    columns; free_last: the last column is not padded (long notes would widen every row)."""
    padded = len(header) - 1 if free_last else len(header)
    w = [max(len(str(r[j])) for r in [header, *rows]) for j in range(padded)]

    def cell(j, v):
        s = str(v)
        if j >= padded:
            return s
        return s.rjust(w[j]) if j in right else s.ljust(w[j])

    def line(r):
        return "| " + " | ".join(cell(j, v) for j, v in enumerate(r)) + " |"
    sep = "|" + "|".join(("-" * (w[j] + 1) + ":") if j in right else "-" * (w[j] + 2)
                         for j in range(padded)) + ("|---|" if free_last else "|")
    return [line(header), sep] + [line(r) for r in rows]


def write_json(path: str, result: dict) -> None:
    # default=str: the odd non-JSON value (a torch dtype, a tuple key) is kept as its text
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=str)


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def write_csv(path: str, records: list, cols: list) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(records)


def write_text(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
