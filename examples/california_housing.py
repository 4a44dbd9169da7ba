"""The poster's study: successive low-rank refinement against a dense MLP on California Housing.

Both models are 8 → 256 → 256 → 1 MLPs with ReLU, trained with Adam at the same learning rate
on shuffled mini-batches (an epoch is one pass over the training set) of a fixed 70/15/15
train/validation/test split (features standardized by the training statistics, target
MedHouseVal in $100,000). The successive model starts every layer at
rank 1 and grows by one component every `--epochs-per-rank` epochs up to `--max-rank`; the first
layer stops at rank 8 and the last at rank 1, their u, v groups frozen from then on (the poster's
dropping-out parameter groups). The dense model trains for as many epochs in total.

Reported over the seeds (mean ± sd): dense test MSE at its best-validation epoch and at the end,
successive test MSE at each rank, the noise rank (where validation stops improving), training
times. Figures (seed 0): loss curve with the rank updates, per-group gradient and parameter norms,
loss landscapes at ranks 1, 2, 5, 10, 20, 30 and of the dense model; test MSE against rank.

    python examples/california_housing.py            # the full study (5 seeds)
    python examples/california_housing.py --quick    # a short run to check the pipeline

Writes results.json, summary.md, per-seed histories and figures to examples/out/.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import math
import platform
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import date
from multiprocessing import get_context
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from lowrank_ext import LowRankLinear
from lowrank_ext.analysis.landscape import Landscape, loss_landscape
from lowrank_ext.training.successive import GrowthSchedule, SuccessiveHistory, fit_successive

HERE = Path(__file__).resolve().parent
DATA = HERE / "data" / "california_housing.csv.gz"
SPLIT_SEED = 0  # the split is the same for every training seed
LANDSCAPE_RANKS = (1, 2, 5, 10, 20, 30)
HIDDEN = 256


def load_split(path: Path = DATA) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Fixed 70/15/15 split; features standardized with the training mean and sd."""
    with gzip.open(path, "rt", newline="") as handle:
        rows = list(csv.reader(handle))
    header, values = rows[0], torch.tensor([[float(v) for v in row] for row in rows[1:]])
    assert header[-1] == "MedHouseVal" and values.shape == (20640, 9), "unexpected data file"
    order = torch.randperm(len(values), generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_train, n_val = int(0.7 * len(values)), int(0.15 * len(values))
    parts = {
        "train": order[:n_train],
        "val": order[n_train : n_train + n_val],
        "test": order[n_train + n_val :],
    }
    features, target = values[:, :-1], values[:, -1:]
    mean, sd = features[parts["train"]].mean(0), features[parts["train"]].std(0)
    return {name: ((features[i] - mean) / sd, target[i].clone()) for name, i in parts.items()}


def dense_mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(8, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 1)
    )


def rank_one_mlp() -> nn.Sequential:
    return nn.Sequential(
        LowRankLinear(8, HIDDEN, 1),
        nn.ReLU(),
        LowRankLinear(HIDDEN, HIDDEN, 1),
        nn.ReLU(),
        LowRankLinear(HIDDEN, 1, 1),
    )


def mse(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> float:
    with torch.no_grad():
        return nn.functional.mse_loss(model(data[0]), data[1]).item()


def train_one_epoch(model, optimizer, data, batch_size: int, generator) -> float:
    """One pass over `data` in shuffled mini-batches; returns the mean training loss."""
    x, y = data
    total = 0.0
    for index in torch.randperm(len(x), generator=generator).split(batch_size):
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model(x[index]), y[index])
        loss.backward()
        optimizer.step()
        total += loss.item() * len(index)
    return total / len(x)


def landscape_of(model, data, config) -> dict:
    """Training-loss landscape around the current weights (fixed directions' seed)."""
    landscape = loss_landscape(
        model,
        lambda m: mse(m, data["train"]),
        steps=config["landscape_steps"],
        span=1.0,
        generator=torch.Generator().manual_seed(1234),
    )
    return {
        "coordinates": landscape.coordinates.tolist(),
        "losses": landscape.losses.tolist(),
        "center_loss": landscape.center_loss,
    }


def train_dense(seed: int, data, config, position: int) -> dict:
    torch.manual_seed(seed)
    model = dense_mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=config["lr"])
    shuffle = torch.Generator().manual_seed(seed)
    best = {"val": math.inf}
    train_curve, val_curve = [], []
    started = time.perf_counter()
    epochs = tqdm(
        range(config["dense_epochs"]),
        desc=f"dense seed {seed}",
        position=position,
        disable=not config["progress"],
        mininterval=5,
    )
    for epoch in epochs:
        train_curve.append(
            train_one_epoch(model, optimizer, data["train"], config["batch_size"], shuffle)
        )
        val_curve.append(mse(model, data["val"]))
        if val_curve[-1] < best["val"]:
            best = {"val": val_curve[-1], "epoch": epoch, "state": _copy_state(model)}
    seconds = time.perf_counter() - started
    final_test = mse(model, data["test"])
    landscape = landscape_of(model, data, config) if seed == 0 else None
    model.load_state_dict(best["state"])
    return {
        "best_epoch": best["epoch"],
        "best_val": best["val"],
        "best_test": mse(model, data["test"]),
        "final_val": val_curve[-1],
        "final_test": final_test,
        "seconds": seconds,
        "train_curve": train_curve,
        "val_curve": val_curve,
        "landscape": landscape,
    }


def _copy_state(model: nn.Module) -> dict:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def train_successive(seed: int, data, config, position: int) -> dict:
    torch.manual_seed(seed)
    model = rank_one_mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=config["lr"])
    shuffle = torch.Generator().manual_seed(seed)
    landscapes = {}

    def on_rank_end(record, model):
        if seed == 0 and record.rank in config["landscape_ranks"]:
            landscapes[record.rank] = landscape_of(model, data, config)
        return {"test_loss": mse(model, data["test"])}

    schedule = GrowthSchedule(
        epochs_per_rank=config["epochs_per_rank"],
        max_rank=config["max_rank"],
        noise_patience=config["noise_patience"],
        noise_min_delta=config["noise_min_delta"],
        stop_at_noise_rank=False,  # train every rank: the test MSE per rank is reported
    )
    history = fit_successive(
        model,
        optimizer,
        lambda: train_one_epoch(model, optimizer, data["train"], config["batch_size"], shuffle),
        lambda: mse(model, data["val"]),
        schedule,
        on_rank_end=on_rank_end,
        generator=torch.Generator().manual_seed(seed),
        progress=config["progress"],
    )
    history_path = Path(config["out"]) / f"history_seed{seed}.json"
    history.to_json(history_path)
    return {
        "history": str(history_path),
        "test_by_rank": {r.rank: r.extra["test_loss"] for r in history.ranks},
        "val_by_rank": {r.rank: r.val_loss for r in history.ranks},
        "train_by_rank": {r.rank: r.train_loss for r in history.ranks},
        "noise_rank": history.noise_rank,
        "noise_rank_confirmed": history.noise_rank_confirmed,
        "seconds": sum(r.seconds for r in history.ranks),
        "landscapes": landscapes,
    }


def run_seed(seed: int, config: dict, position: int) -> dict:
    torch.set_num_threads(config["threads"])
    data = load_split()
    return {
        "seed": seed,
        "dense": train_dense(seed, data, config, position),
        "successive": train_successive(seed, data, config, position),
    }


def mean_sd(values) -> tuple[float, float]:
    values = list(values)
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(results: list[dict], config: dict) -> str:
    def fmt(values, digits=4):
        mean, sd = mean_sd(values)
        return f"{mean:.{digits}f} ± {sd:.{digits}f}"

    dense = [r["dense"] for r in results]
    successive = [r["successive"] for r in results]
    lines = [
        f"California Housing, {len(results)} seeds, test MSE in ($100k)² (mean ± sd).",
        f"Device: {config['device']}; torch {torch.__version__}; {config['date']}.",
        f"Adam lr {config['lr']}, mini-batches of {config['batch_size']}; successive: rank +1 "
        f"every {config['epochs_per_rank']} epochs up to rank {config['max_rank']}; dense: "
        f"{config['dense_epochs']} epochs.",
        "",
        "| model | test MSE | training time (s) |",
        "| --- | --- | --- |",
        f"| dense, best validation epoch ({fmt([d['best_epoch'] for d in dense], 0)}) | "
        f"{fmt([d['best_test'] for d in dense])} | {fmt([d['seconds'] for d in dense], 0)} |",
        f"| dense, final (epoch {config['dense_epochs']}) | "
        f"{fmt([d['final_test'] for d in dense])} | |",
    ]
    ranks = sorted({int(rank) for s in successive for rank in s["test_by_rank"]})
    for rank in ranks:
        values = [s["test_by_rank"][rank] for s in successive]
        lines.append(f"| successive, rank {rank} | {fmt(values)} | |")
    lines.append(f"| successive, all ranks | | {fmt([s['seconds'] for s in successive], 0)} |")
    noise = [s["noise_rank"] for s in successive]
    confirmed = sum(s["noise_rank_confirmed"] for s in successive)
    lines += [
        "",
        f"Noise rank (patience {config['noise_patience']} ranks, min_delta "
        f"{config['noise_min_delta']:.0%} relative, on each rank's final validation MSE): "
        f"{fmt(noise, 1)}; per seed {noise} ({confirmed}/{len(noise)} confirmed).",
    ]
    best_rank_test = [min(s["test_by_rank"].values()) for s in successive]
    lines.append(f"Successive, lowest test MSE over ranks: {fmt(best_rank_test)}.")
    top = max(ranks)
    lines.append(
        "Training MSE (mean over the last epoch's mini-batches): dense at the best epoch "
        f"{fmt([d['train_curve'][d['best_epoch']] for d in dense])}, at the end "
        f"{fmt([d['train_curve'][-1] for d in dense])}; successive at rank {top} "
        f"{fmt([s['train_by_rank'][top] for s in successive])}."
    )
    lines.append(
        "Training times are wall-clock seconds on a machine shared with other jobs: they vary "
        "with its load and are no speed comparison."
    )
    return "\n".join(lines)


def draw_figures(results: list[dict], config: dict, out: Path) -> list[Path]:
    from matplotlib.figure import Figure

    from lowrank_ext.plots.successive import plot_group_norms, plot_landscapes, plot_loss_curve

    first = next(r for r in results if r["seed"] == 0)
    history = SuccessiveHistory.from_json(first["successive"]["history"])
    paths = [out / "successive_loss_curve.png", out / "successive_norms.png"]
    plot_loss_curve(history, paths[0], title="Successive model, seed 0 (orange: rank +1)")
    plot_group_norms(history, paths[1])

    def as_landscape(saved):
        return Landscape(
            torch.tensor(saved["coordinates"]),
            torch.tensor(saved["losses"]),
            saved["center_loss"],
            [],
        )

    panels = {
        f"rank {rank}": as_landscape(saved)
        for rank, saved in sorted(
            first["successive"]["landscapes"].items(), key=lambda i: int(i[0])
        )
    }
    panels["dense"] = as_landscape(first["dense"]["landscape"])
    paths.append(out / "successive_landscapes.png")
    plot_landscapes(panels, paths[-1])

    figure = Figure(figsize=(7, 4))
    ax = figure.add_subplot()
    ranks = sorted({int(r) for s in results for r in s["successive"]["test_by_rank"]})
    stats = [mean_sd(s["successive"]["test_by_rank"][r] for s in results) for r in ranks]
    mean = [m for m, _ in stats]
    ax.errorbar(ranks, mean, yerr=[sd for _, sd in stats], marker=".", label="successive, test")
    for key, color in (("best_test", "tab:green"), ("final_test", "tab:red")):
        m, sd = mean_sd(r["dense"][key] for r in results)
        ax.axhline(m, color=color, label=f"dense, {key.replace('_test', '')} ({m:.3f} ± {sd:.3f})")
        ax.axhspan(m - sd, m + sd, color=color, alpha=0.15)
    for s in results:
        noise = s["successive"]["noise_rank"]
        ax.plot([noise], [s["successive"]["test_by_rank"][noise]], "kv", markersize=5)
    ax.plot([], [], "kv", label="noise rank (one per seed)")
    ax.set_xlabel("rank")
    ax.set_ylabel("test MSE (($100k)²)")
    ax.set_title(f"Test MSE by rank, mean ± sd over {len(results)} seeds")
    ax.legend(fontsize="small")
    figure.tight_layout()
    paths.append(out / "successive_test_mse.png")
    figure.savefig(paths[-1], dpi=100)
    return paths


def load_results(path: Path) -> tuple[list[dict], dict]:
    """results.json as `main` wrote it, with the rank keys JSON turned into strings as ints."""
    saved = json.loads(path.read_text())
    for result in saved["seeds"]:
        successive = result["successive"]
        for key in ("test_by_rank", "val_by_rank", "train_by_rank", "landscapes"):
            successive[key] = {int(rank): value for rank, value in successive[key].items()}
    return saved["seeds"], saved["config"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short run: 2 seeds, 5 ranks")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (5)")
    parser.add_argument("--epochs-per-rank", type=int, default=None, help="(50; poster: 500)")
    parser.add_argument("--max-rank", type=int, default=None, help="(30)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam, both models (1e-3)")
    parser.add_argument("--batch-size", type=int, default=1024, help="(1024)")
    parser.add_argument("--workers", type=int, default=1, help="seeds trained in parallel")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--out", type=Path, default=HERE / "out")
    parser.add_argument("--docs", type=Path, default=None, help="also copy the figures here")
    parser.add_argument("--device-note", default=f"{platform.machine()} CPU")
    parser.add_argument(
        "--replot", action="store_true", help="redraw summary and figures from OUT/results.json"
    )
    args = parser.parse_args(argv)
    if args.replot:
        results, config = load_results(args.out / "results.json")
        report(results, config, args.out, args.docs)
        return
    quick = args.quick
    config = {
        "seeds": args.seeds or (2 if quick else 5),
        "epochs_per_rank": args.epochs_per_rank or (5 if quick else 50),
        "max_rank": args.max_rank or (5 if quick else 30),
        "lr": args.lr,
        "batch_size": args.batch_size,
        "noise_patience": 3,
        "noise_min_delta": 0.01,
        "landscape_steps": 9 if quick else 21,
        "threads": args.threads,
        "out": str(args.out),
        "progress": not args.no_progress,
        "device": args.device_note,
        "date": date.today().isoformat(),
    }
    config["dense_epochs"] = config["epochs_per_rank"] * config["max_rank"]
    config["landscape_ranks"] = [r for r in LANDSCAPE_RANKS if r <= config["max_rank"]]
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    seeds = range(config["seeds"])
    if args.workers > 1:
        with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(run_seed, s, config, s % args.workers) for s in seeds]
            results = [f.result() for f in futures]
    else:
        results = [run_seed(s, config, 0) for s in seeds]
    config["wall_seconds"] = time.perf_counter() - started
    (args.out / "results.json").write_text(json.dumps({"config": config, "seeds": results}))
    report(results, config, args.out, args.docs)


def report(results: list[dict], config: dict, out: Path, docs: Path | None) -> None:
    """Print and save the summary, draw the figures, copy them to `docs` if given."""
    summary = summarize(results, config)
    summary += f"\nWall time of the whole run: {config['wall_seconds'] / 60:.1f} min."
    print(summary)
    (out / "summary.md").write_text(summary + "\n")
    for path in draw_figures(results, config, out):
        print("wrote", path)
        if docs is not None:
            from PIL import Image  # matplotlib's own dependency

            # A 256-colour palette PNG is a third of the size and looks the same.
            docs.mkdir(parents=True, exist_ok=True)
            Image.open(path).convert("RGB").quantize(colors=256).save(
                docs / path.name, optimize=True
            )


if __name__ == "__main__":
    main()
