"""Successive refinement in orthogonal subspaces (the poster's scheme) on the Fashion-MNIST MLP.

The poster ("Low Rank, Identifiable Neural Networks: Learning Successive Refinements of a Neural
Network in Orthogonal Subspaces") trains every layer at rank 1, freezes the learned singular pair,
learns the next one in the orthogonal complement of the frozen ones, and so on; the rank after
which validation stops improving is where the model starts to fit noise. Here that is
`lowrank_ext.training.successive.fit_successive` on the MLP 784 → 1024 → 1024 → 10 of
`examples/oialr_fashion_mnist.py` (same data split: 55,000 training, 5,000 validation, 10,000
test images). Every layer starts at rank 1 and grows by one component every `--epochs-per-rank`
epochs up to `--max-rank` (the output layer stops at rank 10, its groups then frozen); AdamW
(lr 1e-3, weight decay 1e-2), batch 128, cross-entropy. The noise rank is
`fit_successive`'s rule on each rank's final validation cross-entropy (patience 3 ranks, 1 %
relative improvement). The dense MLP trains from the same seed with the same optimizer for
`--dense-epochs`; its best-validation epoch and its last are reported, with the mean gradient
norm (over an epoch's steps) and the norm of every weight, the counterparts of the successive
model's per-group norms.

    python examples/successive_fashion_mnist.py            # the full study (~15 min of one core)
    python examples/successive_fashion_mnist.py --quick    # a check of the pipeline (<1 min)
    python examples/successive_fashion_mnist.py --replot --figures docs/figures

Writes successive_fashion_mnist.json, .md, per-seed histories and the figures
PREFIX_*.png (--prefix, default fashion_mnist_successive) to --out (default
examples/out/successive_fashion_mnist).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lowrank_ext import LowRankLinear
from lowrank_ext.training.successive import GrowthSchedule, SuccessiveHistory, fit_successive

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from oialr_fashion_mnist import (  # noqa: E402  (the sibling study: model, data, helpers)
    BATCH,
    LEARNING_RATE,
    MLP,
    WEIGHT_DECAY,
    accuracy,
    copy_figures,
    fmt,
    load,
    load_average,
    mean_sd,
    run_line,
    run_record,
)

FULL = {
    "seeds": 3,
    "epochs_per_rank": 1,
    "max_rank": 24,
    "dense_epochs": 5,
    "train_size": None,
    "val_size": None,
    "test_size": None,
}
QUICK = {
    "seeds": 1,
    "epochs_per_rank": 1,
    "max_rank": 4,
    "dense_epochs": 2,
    "train_size": 2048,
    "val_size": 1000,
    "test_size": 2000,
}
NOISE_PATIENCE, NOISE_MIN_DELTA = 3, 0.01
TABLE_RANKS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 14, 16, 20, 24)


class SuccessiveMLP(nn.Module):
    """The MLP with every layer a LowRankLinear at rank 1 (the same parameter names)."""

    def __init__(self, hidden: int = 1024) -> None:
        super().__init__()
        self.fc1 = LowRankLinear(28 * 28, hidden, 1)
        self.fc2 = LowRankLinear(hidden, hidden, 1)
        self.head = LowRankLinear(hidden, 10, 1)

    forward = MLP.forward


def loss_on(model: nn.Module, data) -> float:
    x, y = data
    model.eval()
    with torch.no_grad():
        total = sum(
            F.cross_entropy(model(xs), ys, reduction="sum").item()
            for xs, ys in zip(x.split(2000), y.split(2000))
        )
    model.train()
    return total / len(y)


def one_epoch(model, optimizer, data, generator, on_step=None) -> float:
    """One pass in shuffled batches (the last partial one dropped); the mean training loss."""
    x, y = data
    total, count = 0.0, 0
    for batch in torch.randperm(len(x), generator=generator).split(BATCH):
        if len(batch) < BATCH:
            break
        loss = F.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        if on_step is not None:
            on_step()
        optimizer.step()
        total, count = total + loss.item(), count + 1
    return total / count


def train_dense(seed: int, data, config) -> dict:
    torch.manual_seed(seed)
    model = MLP()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    shuffle = torch.Generator().manual_seed(seed)
    sums: dict[str, float] = {}

    def add_grad_norms():
        for name, p in model.named_parameters():
            sums[name] = sums.get(name, 0.0) + p.grad.norm().item()

    epochs, best = [], None
    started = time.perf_counter()
    for epoch in range(config["dense_epochs"]):
        sums.clear()
        train_loss = one_epoch(model, optimizer, data["train"], shuffle, add_grad_norms)
        steps = len(data["train"][0]) // BATCH
        record = {
            "epoch": epoch,
            "train_loss": train_loss,
            "val_loss": loss_on(model, data["val"]),
            "val_accuracy": accuracy(model, data["val"]),
            "grad_norms": {name: total / steps for name, total in sums.items()},
            "param_norms": {name: p.norm().item() for name, p in model.named_parameters()},
        }
        epochs.append(record)
        if best is None or record["val_loss"] < best[0]["val_loss"]:
            best = (record, copy.deepcopy(model.state_dict()))
    seconds = time.perf_counter() - started
    final_test = accuracy(model, data["test"])
    model.load_state_dict(best[1])
    return {
        "epochs": epochs,
        "seconds": seconds,
        "final_test_accuracy": final_test,
        "best_epoch": best[0]["epoch"],
        "best_test_accuracy": accuracy(model, data["test"]),
    }


def train_successive(seed: int, data, config, out: Path) -> dict:
    torch.manual_seed(seed)
    model = SuccessiveMLP()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    shuffle = torch.Generator().manual_seed(seed)

    def on_rank_end(record, model):
        return {
            "test_accuracy": accuracy(model, data["test"]),
            "val_accuracy": accuracy(model, data["val"]),
            "test_loss": loss_on(model, data["test"]),
        }

    schedule = GrowthSchedule(
        epochs_per_rank=config["epochs_per_rank"],
        max_rank=config["max_rank"],
        noise_patience=NOISE_PATIENCE,
        noise_min_delta=NOISE_MIN_DELTA,
        stop_at_noise_rank=False,  # train every rank: accuracy per rank is reported
    )
    history = fit_successive(
        model,
        optimizer,
        lambda: one_epoch(model, optimizer, data["train"], shuffle),
        lambda: loss_on(model, data["val"]),
        schedule,
        on_rank_end=on_rank_end,
        generator=torch.Generator().manual_seed(seed),
        progress=False,
    )
    path = out / f"successive_history_seed{seed}.json"
    history.to_json(path)
    return {
        "history": path.name,
        "by_rank": {
            r.rank: {"val_loss": r.val_loss, "train_loss": r.train_loss, **r.extra}
            for r in history.ranks
        },
        "noise_rank": history.noise_rank,
        "noise_rank_confirmed": history.noise_rank_confirmed,
        "seconds": history.seconds,
        "trainable_at_max_rank": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


def by_rank(results, key: str) -> dict[int, list[float]]:
    ranks = sorted({int(r) for s in results for r in s["successive"]["by_rank"]})
    return {r: [s["successive"]["by_rank"][str(r)][key] for s in results] for r in ranks}


def markdown(saved: dict) -> str:
    results, config = saved["seeds"], saved["config"]
    dense = [s["dense"] for s in results]
    successive = [s["successive"] for s in results]
    accuracy_by_rank = by_rank(results, "test_accuracy")
    val_by_rank = by_rank(results, "val_loss")
    lines = [
        f"Run: {run_line(saved)}",
        f"Fashion-MNIST MLP 784→1024→1024→10, {len(results)} seed(s), AdamW lr {LEARNING_RATE} "
        f"weight decay {WEIGHT_DECAY}, batch {BATCH}; successive: rank +1 every "
        f"{config['epochs_per_rank']} epoch(s) up to {config['max_rank']}; dense: "
        f"{config['dense_epochs']} epochs. Test accuracy, mean ± sd.",
        "",
        "| model | test accuracy | validation cross-entropy "
        "| change of the validation loss vs the rank before |",
        "|---|---|---|---|",
        f"| dense, best-validation epoch ({fmt([d['best_epoch'] + 1 for d in dense], digits=1)}) | "
        f"{fmt(d['best_test_accuracy'] for d in dense)} | "
        f"{fmt(min(e['val_loss'] for e in d['epochs']) for d in dense)} | |",
        f"| dense, last epoch ({config['dense_epochs']}) | "
        f"{fmt(d['final_test_accuracy'] for d in dense)} | "
        f"{fmt(d['epochs'][-1]['val_loss'] for d in dense)} | |",
    ]
    for rank in accuracy_by_rank:
        if rank not in TABLE_RANKS and rank != config["max_rank"]:
            continue
        change = ""
        if rank - 1 in val_by_rank:
            change = (
                fmt(
                    [100 * (v / u - 1) for v, u in zip(val_by_rank[rank], val_by_rank[rank - 1])],
                    digits=1,
                )
                + " %"
            )
        lines.append(
            f"| successive, rank {rank} | {fmt(accuracy_by_rank[rank])} | "
            f"{fmt(val_by_rank[rank])} | {change} |"
        )
    noise = [s["noise_rank"] for s in successive]
    at_noise = [s["by_rank"][str(s["noise_rank"])]["test_accuracy"] for s in successive]
    lines += [
        "",
        f"- Noise rank (the last rank that lowered the validation cross-entropy by more than "
        f"{NOISE_MIN_DELTA:.0%} of the best so far, confirmed by {NOISE_PATIENCE} ranks without): "
        f"per seed {noise} ({sum(s['noise_rank_confirmed'] for s in successive)}/{len(noise)} "
        f"confirmed); test accuracy there {fmt(at_noise)}.",
        "- Training time (wall s, shared machine): dense "
        f"{fmt([d['seconds'] for d in dense], digits=0)}; "
        f"successive, all ranks {fmt([s['seconds'] for s in successive], digits=0)}. Trainable "
        f"parameters at rank {config['max_rank']}: {successive[0]['trainable_at_max_rank']:,} "
        f"(dense: {sum(p.numel() for p in MLP().parameters()):,}).",
        *norm_lines(saved),
    ]
    if "wall_seconds" in saved:
        lines.append(f"- Whole study wall time: {saved['wall_seconds'] / 60:.1f} min.")
    return "\n".join(lines)


def norm_lines(saved: dict) -> list[str]:
    """The poster's signals in numbers (seed 0): fc2's active u, v gradient norms per rank,
    against the dense fc2 weight's."""
    first = saved["seeds"][0]
    history = SuccessiveHistory.from_json(Path(saved["out"]) / first["successive"]["history"])
    dense = first["dense"]["epochs"]
    cells = []
    for record in history.ranks:
        if record.rank in (1, 2, 5, 10, 20, history.ranks[-1].rank):
            grads = [record.grad_norms.get(f"fc2.{g}", math.nan) for g in ("U", "V", "S")]
            cells.append(f"rank {record.rank}: " + ", ".join(f"{v:.2g}" for v in grads))
    return [
        "- Seed 0, mean gradient norm of fc2's active factors (u, v, scale) per rank: "
        + "; ".join(cells)
        + f". Dense fc2.weight: {dense[0]['grad_norms']['fc2.weight']:.2g} in the first epoch, "
        f"{dense[-1]['grad_norms']['fc2.weight']:.2g} in the last; its norm "
        f"{dense[-1]['param_norms']['fc2.weight']:.3g} at the end."
    ]


def draw_figures(saved: dict, out: Path, prefix: str) -> list[Path]:
    from matplotlib.figure import Figure

    from lowrank_ext.plots.successive import plot_group_norms, plot_loss_curve

    results = saved["seeds"]
    first = results[0]
    history = SuccessiveHistory.from_json(out / first["successive"]["history"])
    paths = [
        out / f"{prefix}_loss_curve.png",
        out / f"{prefix}_norms.png",
    ]
    plot_loss_curve(
        history, paths[0], title="Fashion-MNIST successive MLP, seed 0 (orange: rank +1)"
    )

    figure = plot_group_norms(history)
    dense = first["dense"]["epochs"][-1]
    layers = list(history.ranks[0].layer_ranks)
    for column, layer in enumerate(layers):
        for row, key in enumerate(("grad_norms", "param_norms")):
            ax = figure.axes[2 * column + row]  # created column by column, gradient row first
            ax.axhline(dense[key][f"{layer}.weight"], color="black", linestyle=":", label="dense W")
            ax.legend(fontsize="small")
    figure.savefig(paths[1], dpi=100)

    figure = Figure(figsize=(11, 4))
    accuracy_by_rank, val_by_rank = by_rank(results, "test_accuracy"), by_rank(results, "val_loss")
    ranks = list(accuracy_by_rank)
    for index, (values, label) in enumerate(
        ((accuracy_by_rank, "test accuracy"), (val_by_rank, "validation cross-entropy"))
    ):
        ax = figure.add_subplot(1, 2, index + 1)
        stats = [mean_sd(values[r]) for r in ranks]
        ax.errorbar(
            ranks,
            [m for m, _ in stats],
            yerr=[sd for _, sd in stats],
            marker=".",
            label="successive",
        )
        dense_values = (
            [
                ("best_test_accuracy", "tab:green", "dense, best epoch"),
                ("final_test_accuracy", "tab:red", "dense, last epoch"),
            ]
            if index == 0
            else []
        )
        for key, color, name in dense_values:
            m, sd = mean_sd(s["dense"][key] for s in results)
            ax.axhline(m, color=color, label=f"{name} ({m:.3f} ± {sd:.3f})")
        if index == 1:
            m, sd = mean_sd(min(e["val_loss"] for e in s["dense"]["epochs"]) for s in results)
            ax.axhline(m, color="tab:green", label=f"dense, best epoch ({m:.3f} ± {sd:.3f})")
            ax.set_yscale("log")
        for s in results:
            noise = s["successive"]["noise_rank"]
            ax.plot([noise], [values[noise][results.index(s)]], "kv", markersize=6)
        ax.plot([], [], "kv", label="noise rank (one per seed)")
        ax.set_xlabel("rank")
        ax.set_ylabel(label)
        ax.set_title(f"{label} by rank ({len(results)} seed(s), mean ± sd)")
        ax.legend(fontsize="small")
    figure.tight_layout()
    paths.append(out / f"{prefix}_by_rank.png")
    figure.savefig(paths[-1], dpi=100)
    return paths


def report(saved: dict, out: Path, figures: Path | None, prefix: str) -> None:
    table = markdown(saved)
    (out / "successive_fashion_mnist.md").write_text(table + "\n")
    print(table)
    copy_figures(draw_figures(saved, out, prefix), figures)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small subsets, 1 seed, ranks 1–4")
    parser.add_argument("--seeds", type=int, help="number of seeds (3)")
    parser.add_argument("--epochs-per-rank", type=int, help="(1)")
    parser.add_argument("--max-rank", type=int, help="(24)")
    parser.add_argument("--dense-epochs", type=int, help="(5)")
    parser.add_argument("--out", type=Path, default=HERE / "out" / "successive_fashion_mnist")
    parser.add_argument("--figures", type=Path, help="also write the figures here (palette PNGs)")
    parser.add_argument(
        "--prefix", default="fashion_mnist_successive", help="of the figures' file names"
    )
    parser.add_argument("--replot", action="store_true", help="tables and figures from OUT's json")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "successive_fashion_mnist.json"
    if args.replot:
        saved = json.loads(path.read_text())
        saved["out"] = str(args.out)
        report(saved, args.out, args.figures, args.prefix)
        return saved
    torch.set_num_threads(args.threads)
    config = dict(QUICK if args.quick else FULL)
    for key in ("seeds", "epochs_per_rank", "max_rank", "dense_epochs"):
        if getattr(args, key) is not None:
            config[key] = getattr(args, key)
    started = time.perf_counter()
    saved = {
        **run_record("successive_fashion_mnist.py", argv, args.quick, config),
        "out": str(args.out),
        "seeds": [],
    }
    data = load("fashion-mnist", config)
    for seed in range(config["seeds"]):
        dense = train_dense(seed, data, config)
        print(
            f"[{time.perf_counter() - started:6.0f} s, load {load_average()}] seed {seed} dense: "
            f"test accuracy best epoch {dense['best_test_accuracy']:.4f}, "
            f"last {dense['final_test_accuracy']:.4f}",
            flush=True,
        )
        successive = train_successive(seed, data, config, args.out)
        print(
            f"[{time.perf_counter() - started:6.0f} s, load {load_average()}] seed {seed} "
            "successive: "
            f"noise rank {successive['noise_rank']}, test accuracy by rank "
            + " ".join(f"{r}:{v['test_accuracy']:.3f}" for r, v in successive["by_rank"].items()),
            flush=True,
        )
        saved["seeds"].append({"seed": seed, "dense": dense, "successive": successive})
        path.write_text(json.dumps(saved, indent=1) + "\n")
    saved["wall_seconds"] = time.perf_counter() - started
    saved["load_end"] = load_average()
    saved = json.loads(json.dumps(saved))  # rank keys as strings, as read back by --replot
    path.write_text(json.dumps(saved, indent=1) + "\n")
    report(saved, args.out, args.figures, args.prefix)
    return saved


if __name__ == "__main__":
    main()
