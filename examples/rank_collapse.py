"""Rank collapse from over-regularization, reproduced on sklearn's digits (offline).

The experiment of the blog "Rank Collapse in Deep Learning" (shared/seeds/001): a small
convolutional network with two fully connected layers, trained (a) normally and (b) with a
strong L2 penalty on the FC weights, Keras style (loss + λ·Σ‖W‖²). A sweep over λ finds the
smallest value at which both FC layers are flagged collapsed by `lowrank_ext.spectral`; that
value and no penalty are then trained with several seeds and compared: test accuracy, the
collapse flags, σ_min, the σ spectra and the σ_min histogram (the blog's figure).
A second part plants an exactly rank-32 256×256 matrix in float32 and bfloat16 and shows the
hard rank is exact, where numpy's matrix_rank on the float64 copy (a float64 tolerance) is not.

    .venv/bin/python examples/rank_collapse.py                 # full run, a few minutes on CPU
    .venv/bin/python examples/rank_collapse.py --quick         # smoke run, well under a minute
    .venv/bin/python examples/rank_collapse.py --figures docs/figures   # the README figures

Writes rank_collapse.json, rank_collapse.md (the tables), the full spectral report of seed 0 of
each model (rank_collapse_report_*.md) and the figures (rank_collapse_*.png) to --out (default
examples/out).
Needs the [examples] extra (scikit-learn, matplotlib).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from tqdm import tqdm

from lowrank_ext import spectral
from lowrank_ext.plots import spectral as spectral_plots

FC_LAYERS = ("fc1", "fc2")
FULL = {"epochs": 40, "seeds": 5, "l2_grid": [0.0, 1e-3, 3e-3, 1e-2, 2e-2, 3e-2, 1e-1]}
QUICK = {"epochs": 15, "seeds": 1, "l2_grid": [0.0, 1e-2, 3e-2]}
LEARNING_RATE, MOMENTUM, BATCH = 0.05, 0.9, 64


class SmallCNN(nn.Module):
    """Two 3×3 conv layers and a 2×2 max-pool, then the two FC layers and the classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, 128)
        self.fc2 = nn.Linear(128, 64)
        self.classifier = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2).flatten(1)
        return self.classifier(F.relu(self.fc2(F.relu(self.fc1(x)))))


def digits():
    """sklearn's 8×8 digits (1797 images, bundled with sklearn), scaled to [0, 1], split 75/25
    stratified with a fixed seed."""
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(data.target)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=0.25, random_state=0, stratify=labels
    )
    return x_train, y_train, x_test, y_test


def train(data, l2: float, epochs: int, seed: int) -> tuple[SmallCNN, float]:
    """SGD with momentum on cross-entropy + l2·(‖W_fc1‖² + ‖W_fc2‖²); returns the model and its
    test accuracy."""
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)
    model = SmallCNN()
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM)
    order = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(epochs), desc=f"λ={l2:g} seed={seed}", leave=False, unit="epoch"):
        permutation = torch.randperm(len(x_train), generator=order)
        for batch in permutation.split(BATCH):
            loss = F.cross_entropy(model(x_train[batch]), y_train[batch])
            if l2:
                loss = loss + l2 * sum(getattr(model, n).weight.square().sum() for n in FC_LAYERS)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    return model, accuracy


def fc_summary(report: spectral.SpectralReport) -> dict:
    return {
        name: {
            "hard_rank": report[name].hard_rank,
            "full_rank": report[name].full_rank,
            "collapsed": report[name].collapsed,
            "collapsed_fraction": report[name].collapsed_fraction,
            "sigma_min": report[name].sigma_min,
            "sigma_max": report[name].sigma_max,
            "sigma_min_relative": report[name].sigma_min / report[name].sigma_max,
            "effective_rank": report[name].effective_rank,
            "above_mp_edge": report[name].above_mp_edge,
        }
        for name in FC_LAYERS
    }


def fc_rows(reports: list[spectral.SpectralReport]) -> spectral.SpectralReport:
    """The FC rows of several reports pooled into one (for the σ_min histogram)."""
    rows = tuple(row for report in reports for row in report if row.name in FC_LAYERS)
    return dataclasses.replace(reports[0], rows=rows)


def planted_rank_check(rows: int = 256, rank: int = 32) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    left, _ = torch.linalg.qr(torch.randn(rows, rank, dtype=torch.float64, generator=generator))
    right, _ = torch.linalg.qr(torch.randn(rows, rank, dtype=torch.float64, generator=generator))
    exact = (left * torch.linspace(2.0, 1.0, rank, dtype=torch.float64)) @ right.T
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        weight = exact.to(dtype)
        row = spectral.analyze(weight)[0]
        results.append(
            {
                "dtype": str(dtype).removeprefix("torch."),
                "planted_rank": rank,
                "hard_rank": row.hard_rank,
                "numerical_rank": row.numerical_rank,
                "numerical_tol": row.numerical_tol,
                "largest_noise_sigma": float(row.singular_values[rank]),
                "numpy_matrix_rank_float64_copy": int(
                    np.linalg.matrix_rank(weight.double().numpy())
                ),
            }
        )
    return results


def markdown(results: dict) -> str:
    chosen = results["chosen_l2"]
    lines = [
        f"Sweep (seed 0, {results['epochs']} epochs): hard rank of fc1 (of 128) and fc2 (of 64)",
        "",
        "| L2 λ | test accuracy | fc1 hard rank | fc2 hard rank | fc1 σ_min/σ_max "
        "| fc2 σ_min/σ_max | collapsed |",
        "|---|---|---|---|---|---|---|",
    ]
    for entry in results["sweep"]:
        fc = entry["fc"]
        flags = ", ".join(n for n in FC_LAYERS if fc[n]["collapsed"]) or "no"
        lines.append(
            f"| {entry['l2']:g} | {entry['accuracy']:.3f} | {fc['fc1']['hard_rank']} | "
            f"{fc['fc2']['hard_rank']} | {fc['fc1']['sigma_min_relative']:.2e} | "
            f"{fc['fc2']['sigma_min_relative']:.2e} | {flags} |"
        )
    lines += [
        "",
        f"Normal training vs L2 λ = {chosen:g} on fc1 and fc2, {len(results['seeds'])} seeds:",
        "",
        "| training | test accuracy (mean ± sd) | fc1 collapsed | fc2 collapsed "
        "| fc1 hard rank | fc2 hard rank | σ_min/σ_max over FC layers (min – max) |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, runs in results["comparison"].items():
        accuracy = np.array([r["accuracy"] for r in runs])
        relative = [r["fc"][n]["sigma_min_relative"] for r in runs for n in FC_LAYERS]
        collapsed = {n: sum(r["fc"][n]["collapsed"] for r in runs) for n in FC_LAYERS}
        ranks = {n: "/".join(str(r["fc"][n]["hard_rank"]) for r in runs) for n in FC_LAYERS}
        lines.append(
            f"| {label} | {accuracy.mean():.3f} ± {accuracy.std():.3f} | "
            f"{collapsed['fc1']}/{len(runs)} | {collapsed['fc2']}/{len(runs)} | {ranks['fc1']} | "
            f"{ranks['fc2']} | {min(relative):.1e} – {max(relative):.1e} |"
        )
    lines += [
        "",
        "Planted rank 32, 256×256:",
        "",
        "| dtype | hard rank | numerical rank | numerical tol | largest σ of the zero part "
        "| numpy matrix_rank of the float64 copy |",
        "|---|---|---|---|---|---|",
    ]
    for p in results["planted"]:
        lines.append(
            f"| {p['dtype']} | {p['hard_rank']} | {p['numerical_rank']} | "
            f"{p['numerical_tol']:.2e} | {p['largest_noise_sigma']:.2e} | "
            f"{p['numpy_matrix_rank_float64_copy']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer epochs, λ values and seeds")
    parser.add_argument("--out", type=Path, default=Path("examples/out"))
    parser.add_argument("--figures", type=Path, help="also copy the two main figures here")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: at batch 64 this network is too small to gain from more, "
        "and on a busy machine extra threads only wait for each other)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = QUICK if args.quick else FULL
    start = time.perf_counter()
    data = digits()
    args.out.mkdir(parents=True, exist_ok=True)

    reports, accuracies = {}, {}  # keyed by (λ, seed)

    def run(l2: float, seed: int) -> dict:
        if (l2, seed) not in reports:
            model, accuracies[l2, seed] = train(data, l2, config["epochs"], seed)
            reports[l2, seed] = spectral.analyze(model)
        return {"accuracy": accuracies[l2, seed], "fc": fc_summary(reports[l2, seed])}

    sweep = [
        {"l2": l2, **run(l2, seed=0)}
        for l2 in tqdm(config["l2_grid"], desc="L2 sweep", unit="model")
    ]
    collapsing = [
        entry["l2"] for entry in sweep if all(entry["fc"][n]["collapsed"] for n in FC_LAYERS)
    ]
    if not collapsing:
        raise SystemExit("no λ in the grid collapsed both FC layers; widen the grid")
    chosen = collapsing[0]

    comparison = {"normal": [], f"L2 λ={chosen:g}": []}
    seeds = list(range(config["seeds"]))
    for (label, runs), l2 in zip(comparison.items(), (0.0, chosen)):
        runs.extend({"seed": seed, **run(l2, seed)} for seed in tqdm(seeds, desc=label))

    labelled = {"normal": 0.0, f"L2 λ={chosen:g}": chosen}
    figures = {
        "sigma_min": spectral_plots.plot_sigma_min_histogram(
            {label: fc_rows([reports[l2, s] for s in seeds]) for label, l2 in labelled.items()},
            args.out / "rank_collapse_sigma_min.png",
        ),
        "spectra": spectral_plots.plot_spectra(
            {label: reports[l2, 0] for label, l2 in labelled.items()},
            args.out / "rank_collapse_spectra.png",
            layers=list(FC_LAYERS),
        ),
    }
    for l2 in labelled.values():
        tag = "normal" if l2 == 0 else "l2"
        for name in FC_LAYERS:
            path = args.out / f"rank_collapse_esd_{tag}_{name}.png"
            spectral_plots.plot_esd(reports[l2, 0][name], path)
        (args.out / f"rank_collapse_report_{tag}.md").write_text(
            reports[l2, 0].to_markdown() + "\n"
        )

    results = {
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
        "quick": args.quick,
        "epochs": config["epochs"],
        "optimizer": f"SGD lr={LEARNING_RATE} momentum={MOMENTUM} batch={BATCH}",
        "collapse_rule": reports[0.0, 0].rule(),
        "sweep": sweep,
        "chosen_l2": chosen,
        "seeds": seeds,
        "comparison": comparison,
        "planted": planted_rank_check(),
    }
    results["runtime_s"] = round(time.perf_counter() - start, 1)
    table = markdown(results)
    (args.out / "rank_collapse.md").write_text(table + "\n")
    (args.out / "rank_collapse.json").write_text(json.dumps(results, indent=2) + "\n")
    if args.figures is not None:
        args.figures.mkdir(parents=True, exist_ok=True)
        for path in figures.values():
            shutil.copy(path, args.figures / path.name)
    print(table)
    print(f"\n{results['collapse_rule']}")
    print(f"run time {results['runtime_s']} s; outputs in {args.out}")
    return results


if __name__ == "__main__":
    main()
