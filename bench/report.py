"""The results table (Markdown, so it pastes into RESULTS.md as is), its summary and the JSON.

Columns: B, in, out, r (" full" for an r×r core), dtype, pass; "fused", the fused op's median
time per call; one column per baseline, "<baseline> (speedup of fused)": the baseline's median
time per call and, in parentheses, baseline median / fused median (> 1: the fused op is faster),
both from the same run with the implementations interleaved; "fused GB/s", the fused op's
floor bytes (bandwidth.py) over its median; "% floor", the floor time (those bytes at the copy
bandwidth measured in the same run) over the fused median.

The summary gives, per pass and row class (small: B ≤ 64; large), the minimum and median of
the speedup against each baseline that is the bar (two_linear, compiled).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

RATIO = "baseline median / fused median (> 1: the fused op is faster), same run, interleaved"


def _row_key(rec: dict) -> tuple:
    return (
        rec["batch"],
        rec["in_features"],
        rec["out_features"],
        rec["rank"],
        rec["core"],
        rec["dtype"],
        rec["pass"],
    )


def fmt_time(seconds: float) -> str:
    """µs below a millisecond, ms above: small and large rows share one table."""
    return f"{seconds * 1e6:.1f} µs" if seconds < 1e-3 else f"{seconds * 1e3:.2f} ms"


def table(records: list[dict], impls: list[str]) -> str:
    """One row per shape/dtype/pass: the fused median, each baseline's median with its ratio
    baseline/fused (>1: fused is faster), and the fused op's bandwidth and % of the floor."""
    rows: dict[tuple, dict[str, dict]] = {}
    for rec in records:
        rows.setdefault(_row_key(rec), {})[rec["impl"]] = rec
    baselines = [i for i in impls if i != "fused"]
    head = ["B", "in", "out", "r", "dtype", "pass", "fused"]
    head += [f"{b} (speedup of fused)" for b in baselines] + ["fused GB/s", "% floor"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (b, n, m, r, core, dtype, pass_), by_impl in rows.items():
        fused = by_impl.get("fused")
        cells = [str(b), str(n), str(m), f"{r}" + ("" if core == "diag" else " full"), dtype, pass_]
        cells.append(fmt_time(fused["median_s"]) if fused else "—")
        for name in baselines:
            rec = by_impl.get(name)
            if rec is None:
                cells.append("—")
            elif rec.get("ratio") is None:
                cells.append(fmt_time(rec["median_s"]))
            else:
                cells.append(f"{fmt_time(rec['median_s'])} ({rec['ratio']:.2f}×)")
        if fused and fused.get("pct_floor") is not None:
            cells += [f"{fused['eff_bytes_per_s'] / 1e9:.1f}", f"{fused['pct_floor']:.0f}%"]
        else:
            cells += ["—", "—"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(records: list[dict], bar: tuple[str, ...]) -> list[dict]:
    """Per (row class, pass): how many rows, and min/median speedup of fused against each
    baseline of `bar` that was timed."""
    out = []
    for row_class in ("small", "large"):
        for pass_ in dict.fromkeys(r["pass"] for r in records):
            group = [r for r in records if r["row_class"] == row_class and r["pass"] == pass_]
            vs = {}
            for name in bar:
                ratios = [r["ratio"] for r in group if r["impl"] == name and r["ratio"]]
                if ratios:
                    vs[name] = {"min": min(ratios), "median": statistics.median(ratios)}
            if vs:
                rows = len({_row_key(r) for r in group})
                out.append({"row_class": row_class, "pass": pass_, "rows": rows, "vs": vs})
    return out


def summary_lines(entries: list[dict]) -> list[str]:
    """One line per summary entry, e.g. `fwd, small rows (27): fused vs two_linear min 0.80×
    median 1.10×; vs compiled min 0.90× median 1.30×`."""
    lines = []
    for e in entries:
        parts = [
            f"vs {name} min {s['min']:.2f}× median {s['median']:.2f}×"
            for name, s in e["vs"].items()
        ]
        lines.append(f"{e['pass']}, {e['row_class']} rows ({e['rows']}): fused " + "; ".join(parts))
    return lines


def write_json(path: Path, meta: dict, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "results": records}, indent=1, default=str) + "\n")
