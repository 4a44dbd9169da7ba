"""The results table (Markdown, so it pastes into RESULTS.md as is) and the JSON file."""

from __future__ import annotations

import json
from pathlib import Path


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


def table(records: list[dict], impls: list[str]) -> str:
    """One row per shape/dtype/pass: the fused median, each baseline's median with its ratio
    baseline/fused (>1: fused is faster), and the fused op's bandwidth and % of the floor."""
    rows: dict[tuple, dict[str, dict]] = {}
    for rec in records:
        rows.setdefault(_row_key(rec), {})[rec["impl"]] = rec
    baselines = [i for i in impls if i != "fused"]
    head = ["B", "in", "out", "r", "dtype", "pass", "fused ms"]
    head += [f"{b} ms (×)" for b in baselines] + ["fused GB/s", "% floor"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (b, n, m, r, core, dtype, pass_), by_impl in rows.items():
        fused = by_impl.get("fused")
        cells = [str(b), str(n), str(m), f"{r}" + ("" if core == "diag" else " full"), dtype, pass_]
        cells.append(f"{fused['median_s'] * 1e3:.2f}" if fused else "—")
        for name in baselines:
            rec = by_impl.get(name)
            if rec is None:
                cells.append("—")
            elif rec.get("ratio") is None:
                cells.append(f"{rec['median_s'] * 1e3:.2f}")
            else:
                cells.append(f"{rec['median_s'] * 1e3:.2f} ({rec['ratio']:.2f}×)")
        if fused and fused.get("pct_floor") is not None:
            cells += [f"{fused['eff_bytes_per_s'] / 1e9:.1f}", f"{fused['pct_floor']:.0f}%"]
        else:
            cells += ["—", "—"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(path: Path, meta: dict, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "results": records}, indent=1, default=str) + "\n")
