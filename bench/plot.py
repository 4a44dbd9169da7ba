"""Throughput (rows of x per second) against rank, one panel per shape/dtype and pass."""

from __future__ import annotations

from pathlib import Path


def throughput_vs_rank(records: list[dict], impls: list[str], path: Path, title: str) -> bool:
    """Write the PNG; return False (and write nothing) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
        from matplotlib.ticker import NullLocator
    except ImportError:
        return False

    groups = sorted(
        {(r["batch"], r["in_features"], r["out_features"], r["core"], r["dtype"]) for r in records}
    )
    passes = sorted({r["pass"] for r in records}, key=["fwd", "fwd+bwd"].index)
    fig, axes = plt.subplots(
        len(groups),
        len(passes),
        squeeze=False,
        figsize=(5.5 * len(passes), 4 * len(groups)),
        layout="constrained",  # leaves room for the suptitle, whatever the number of rows
    )
    for gi, group in enumerate(groups):
        for pi, pass_ in enumerate(passes):
            ax = axes[gi][pi]
            for impl in impls:
                pts = sorted(
                    (r["rank"], r["batch"] / r["median_s"])
                    for r in records
                    if r["impl"] == impl
                    and r["pass"] == pass_
                    and (r["batch"], r["in_features"], r["out_features"], r["core"], r["dtype"])
                    == group
                )
                if pts:
                    ax.plot(
                        *zip(*pts, strict=True),
                        marker="o",
                        label=impl,
                        linewidth=2.5 if impl == "fused" else 1.2,
                    )
            b, n, m, core, dtype = group
            ax.set(
                xscale="log",
                yscale="log",
                xlabel="rank r",
                ylabel="rows / s",
                title=f"{pass_}: B={b} in={n} out={m} {dtype}"
                + (" full S" if core != "diag" else ""),
            )
            ranks = sorted(  # this panel's ranks: small and large rows use different ones
                {
                    r["rank"]
                    for r in records
                    if (r["batch"], r["in_features"], r["out_features"], r["core"], r["dtype"])
                    == group
                }
            )
            ax.xaxis.set_minor_locator(NullLocator())  # only the measured ranks as x ticks
            ax.set_xticks(ranks, [str(r) for r in ranks])
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize="small")
    fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
