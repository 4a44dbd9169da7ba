"""OIALR adaptive-rank training against dense training on sklearn's digits (offline).

OIALR (Coquelin et al., arXiv:2401.08505) trains dense for `delay` steps, then replaces every
eligible layer (all but the output layer) by U S Vᵀ at full rank with U and V frozen and the
r×r core S trained; every `frequency` steps it rotates U and V by the SVD of S and drops the
singular values below cutoff·σ_max (at most half the rank at once). Here it is `lowrank_ext.OIALR`
and the training loop gains one line (`oialr.step()` after `optimizer.step()`).

Data: sklearn's 8×8 digits (1797 images, bundled with sklearn), a fixed stratified 75/25 split,
every pixel standardized by the training statistics. Models: an MLP 64 → 512 → 512 → 10, a CNN
(two 3×3 convs 1 → 32 → 64, a 2×2 max-pool, 1024 → 256 → 10) and a transformer block (each image
8 row tokens of 8 pixels, linear embedding to 64, learned positions, one
nn.TransformerEncoderLayer(64, 4 heads, 256), mean pool, linear head). Every model trains dense
and with OIALR from the same seed: same init, same data order, same AdamW; before `delay` the
two runs are the same computation.

Recorded per epoch: test accuracy, the trainable-parameter fraction (of the dense model's count)
and the ranks per layer. At the end, on seed 0's final models and one fixed batch, the wall time
of a training step (forward, backward, AdamW step) of (a) the dense model, (b) the OIALR model
with lowrank_ext's layers and (c) `bench/rebuild_w.py`'s `rebuild_w_copy` of the OIALR model
(the reference-style layer that rebuilds W = U S Vᵀ in every forward), interleaved round-robin in
one process, the median over many steps.

    .venv/bin/python examples/oialr_digits.py                          # full study, a few minutes
    .venv/bin/python examples/oialr_digits.py --quick                  # smoke run, under a minute
    .venv/bin/python examples/oialr_digits.py --figures docs/figures   # the README figures

Writes oialr.json, oialr.md (the table) and the figures oialr_ranks.png, oialr_accuracy.png and
oialr_trainable.png to --out (default examples/out/oialr).
Needs the [examples] extra (scikit-learn, matplotlib).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from tqdm import tqdm

import lowrank_ext
from lowrank_ext.plots.oialr import plot_rank_history

HERE = Path(__file__).resolve().parent
BENCH = HERE.parent / "bench"  # bench/rebuild_w.py: the rebuild-W baseline

FULL = {"epochs": 30, "seeds": 3, "delay_epochs": 5, "frequency_epochs": 1, "timing_rounds": 500}
QUICK = {"epochs": 8, "seeds": 1, "delay_epochs": 2, "frequency_epochs": 1, "timing_rounds": 40}
BATCH, LEARNING_RATE, WEIGHT_DECAY = 64, 1e-3, 1e-2
CUTOFF, MAX_DROP = 0.1, 0.5  # the paper's cutoff; --cutoff changes it
TIMING_WARMUP = 10


class MLP(nn.Module):
    def __init__(self, hidden: int = 512) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.fc2(F.relu(self.fc1(x.flatten(1))))))


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc = nn.Linear(64 * 4 * 4, 256)
        self.head = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2).flatten(1)
        return self.head(F.relu(self.fc(x)))


class Transformer(nn.Module):
    """Rows as tokens: 8 tokens of 8 pixels, one pre-built encoder layer, mean pool, head."""

    def __init__(self, d_model: int = 64) -> None:
        super().__init__()
        self.embed = nn.Linear(8, d_model)
        self.position = nn.Parameter(torch.randn(1, 8, d_model) * 0.02)
        self.block = nn.TransformerEncoderLayer(
            d_model, nhead=4, dim_feedforward=256, dropout=0.0, batch_first=True
        )
        self.head = nn.Linear(d_model, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x.reshape(-1, 8, 8)) + self.position
        return self.head(self.block(tokens).mean(1))


MODELS = {"MLP": MLP, "CNN": CNN, "transformer": Transformer}


def digits():
    """Fixed stratified 75/25 split; each pixel standardized with the training mean and sd
    (pixels constant over the training set are only centred)."""
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1)
    labels = torch.tensor(data.target)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=0.25, random_state=0, stratify=labels
    )
    mean, sd = x_train.mean(0), x_train.std(0)
    sd = torch.where(sd > 0, sd, torch.ones_like(sd))
    return (x_train - mean) / sd, y_train, (x_test - mean) / sd, y_test


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        value = (model(x).argmax(1) == y).float().mean().item()
    model.train(was_training)
    return value


def train(name: str, data, seed: int, config: dict, use_oialr: bool) -> tuple[nn.Module, dict]:
    """One run; mini-batches of BATCH in a seeded order (the last partial batch dropped)."""
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)
    model = MODELS[name]()
    dense_count = trainable(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    steps_per_epoch = len(x_train) // BATCH
    oialr = None
    if use_oialr:
        oialr = lowrank_ext.OIALR(
            model,
            optimizer,
            delay=config["delay_epochs"] * steps_per_epoch,
            frequency=config["frequency_epochs"] * steps_per_epoch,
            cutoff=config["cutoff"],
            max_drop=MAX_DROP,
        )
    order = torch.Generator().manual_seed(seed)
    record = {
        "dense_trainable": dense_count,
        "test_accuracy": [accuracy(model, x_test, y_test)],  # index = epoch, 0 before training
        "trainable_fraction": [1.0],  # per epoch, at its end
        "trainable_events": [[0, 1.0]],  # [step, fraction] at every shape change
        "step_seconds_after_conversion": [],
        "oialr_step_seconds_after_conversion": [],
    }
    label = f"{name} {'OIALR' if use_oialr else 'dense'} seed={seed}"
    step = 0
    for _ in tqdm(range(config["epochs"]), desc=label, leave=False, unit="epoch"):
        permutation = torch.randperm(len(x_train), generator=order)
        for batch in permutation[: steps_per_epoch * BATCH].split(BATCH):
            converted = oialr is not None and oialr.converted
            start = time.perf_counter()
            loss = F.cross_entropy(model(x_train[batch]), y_train[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            middle = time.perf_counter()
            changed = oialr.step() if oialr is not None else False
            end = time.perf_counter()
            step += 1
            if converted or (oialr is None and step > config["delay_epochs"] * steps_per_epoch):
                record["step_seconds_after_conversion"].append(middle - start)
                if oialr is not None:
                    record["oialr_step_seconds_after_conversion"].append(end - middle)
            if changed:
                record["trainable_events"].append([step, trainable(model) / dense_count])
        record["test_accuracy"].append(accuracy(model, x_test, y_test))
        record["trainable_fraction"].append(trainable(model) / dense_count)
    record["steps"] = step
    record["steps_per_epoch"] = steps_per_epoch
    loop = record.pop("step_seconds_after_conversion")
    update = record.pop("oialr_step_seconds_after_conversion")
    # In-loop timings of the training run itself (noisy: one sample per step, no interleaving).
    record["in_loop_step_ms_median"] = 1e3 * statistics.median(loop) if loop else None
    record["oialr_update_ms_amortized"] = 1e3 * sum(update) / len(update) if update else None
    if oialr is not None:
        record["converted"] = bool(oialr.converted)
        record["ranks"] = dict(oialr.ranks())
        record["rank_history"] = [
            {"step": int(h["step"]), "ranks": dict(h["ranks"])} for h in oialr.history
        ]
        record["full_ranks"] = record["rank_history"][0]["ranks"] if oialr.history else {}
    return model, record


def training_step(model: nn.Module, optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def time_steps(models: dict[str, nn.Module], x, y, rounds: int) -> dict[str, dict]:
    """Median wall time of one training step (forward, backward, AdamW step) of each model on
    the same batch, interleaved round-robin (the starting model rotates every round)."""
    optimizers = {
        key: torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad],
            lr=LEARNING_RATE,
            weight_decay=WEIGHT_DECAY,
        )
        for key, model in models.items()
    }
    keys = list(models)
    for _ in range(TIMING_WARMUP):
        for key in keys:
            training_step(models[key], optimizers[key], x, y)
    seconds = {key: [] for key in keys}  # seconds[key][round]
    for round_ in range(rounds):
        shift = round_ % len(keys)
        for key in keys[shift:] + keys[:shift]:
            start = time.perf_counter()
            training_step(models[key], optimizers[key], x, y)
            seconds[key].append(time.perf_counter() - start)
    result = {}
    for key, values in seconds.items():
        q1, median, q3 = np.percentile(values, [25, 50, 75])
        # The ratio to the first model within each round, whose median is robust to load drifts.
        ratio = np.median(np.array(values) / np.array(seconds[keys[0]]))
        result[key] = {
            "median_ms": 1e3 * median,
            "q1_ms": 1e3 * q1,
            "q3_ms": 1e3 * q3,
            f"median_ratio_to_{keys[0]}": float(ratio),
        }
    return result


def mean_sd(values) -> tuple[float, float]:
    values = list(values)
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def short(layer: str) -> str:
    return layer.removeprefix("block.").removeprefix("self_attn.")


def markdown(results: dict) -> str:
    config = results["config"]
    lines = [
        f"sklearn digits, {len(results['seeds'])} seed(s), {config['epochs']} epochs of "
        f"{results['steps_per_epoch']} steps (batch {BATCH}), AdamW lr {LEARNING_RATE} "
        f"weight decay {WEIGHT_DECAY}; OIALR delay {results['delay_steps']} steps "
        f"({config['delay_epochs']} epochs), frequency {results['frequency_steps']} steps, "
        f"cutoff {config['cutoff']}, max drop {MAX_DROP}. Test accuracy mean ± sd over seeds; "
        "final ranks per seed (of the full rank); ms per training step at batch "
        f"{BATCH}: median of {config['timing_rounds']} interleaved steps, seed 0's final models "
        "(in brackets: the median over rounds of the time relative to the dense step of the same "
        "round).",
        f"Device: {results['machine']}; torch {results['torch']}; {results['date']}.",
        "",
        "| model | dense acc | OIALR acc | final trainable % | final ranks | ms/step dense "
        "| ms/step OIALR | ms/step rebuild-W | OIALR update, ms/step amortized |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, model in results["models"].items():
        dense_acc = mean_sd(r["test_accuracy"][-1] for r in model["dense"])
        oialr_acc = mean_sd(r["test_accuracy"][-1] for r in model["oialr"])
        fraction = mean_sd(100 * r["trainable_fraction"][-1] for r in model["oialr"])
        full = model["oialr"][0]["full_ranks"]
        ranks = ", ".join(
            f"{short(layer)} {'/'.join(str(r['ranks'][layer]) for r in model['oialr'])}"
            f" of {full.get(layer, '?')}"
            for layer in model["oialr"][0]["ranks"]
        )
        timing = model["timing_ms"]
        update = statistics.fmean(r["oialr_update_ms_amortized"] or 0.0 for r in model["oialr"])
        cells = [
            name,
            f"{dense_acc[0]:.3f} ± {dense_acc[1]:.3f}",
            f"{oialr_acc[0]:.3f} ± {oialr_acc[1]:.3f}",
            f"{fraction[0]:.1f} ± {fraction[1]:.1f}",
            ranks,
            *(
                f"{timing[key]['median_ms']:.2f} ({timing[key]['median_ratio_to_dense']:.2f}×)"
                if key in timing
                else "n/a"
                for key in ("dense", "oialr", "rebuild_w")
            ),
            f"{update:.3f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", *(f"- {note}" for note in results["notes"])]
    return "\n".join(lines)


def draw_figures(results: dict, out: Path) -> list[Path]:
    from matplotlib.figure import Figure

    names = list(results["models"])
    per_epoch = results["steps_per_epoch"]
    delay = results["delay_steps"]
    paths = []

    runs = {
        f"{name}: rank per layer (seed 0)": results["models"][name]["oialr"][0] for name in names
    }
    paths.append(out / "oialr_ranks.png")
    plot_rank_history(
        {title: run["rank_history"] for title, run in runs.items()},
        paths[-1],
        end_steps={title: run["steps"] for title, run in runs.items()},
        label=short,
    )

    figure = Figure(figsize=(4.2 * len(names), 3.6))
    for index, name in enumerate(names):
        ax = figure.add_subplot(1, len(names), index + 1)
        low = 1.0
        for key, label, color in (("dense", "dense", "tab:blue"), ("oialr", "OIALR", "tab:red")):
            curves = np.array([r["test_accuracy"] for r in results["models"][name][key]])
            mean, sd = curves.mean(0), curves.std(0)
            epochs = np.arange(len(mean))
            ax.plot(epochs, mean, color=color, label=label)
            ax.fill_between(epochs, mean - sd, mean + sd, color=color, alpha=0.2)
            low = min(low, float((mean - sd)[2:].min()))
        ax.axvline(delay / per_epoch, color="grey", linestyle="--", linewidth=1, label="conversion")
        ax.set_ylim(max(0.0, low - 0.02), 1.0)
        ax.set_xlabel("epoch")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"{name} (mean ± sd, {len(results['seeds'])} seeds)")
        ax.legend(fontsize="small", loc="lower right")
    figure.tight_layout()
    paths.append(out / "oialr_accuracy.png")
    figure.savefig(paths[-1], dpi=100)

    figure = Figure(figsize=(6, 3.6))
    ax = figure.add_subplot()
    for name in names:
        run = results["models"][name]["oialr"][0]
        events = run["trainable_events"] + [[run["steps"], run["trainable_events"][-1][1]]]
        ax.step([s for s, _ in events], [100 * f for _, f in events], where="post", label=name)
    ax.axvline(delay, color="grey", linestyle="--", linewidth=1, label="conversion")
    ax.set_xlabel("training step")
    ax.set_ylabel("trainable parameters (% of dense)")
    ax.set_title("OIALR: trainable parameters (seed 0)")
    ax.legend(fontsize="small")
    figure.tight_layout()
    paths.append(out / "oialr_trainable.png")
    figure.savefig(paths[-1], dpi=100)
    return paths


def image_sets_note() -> str:
    try:
        import torchvision  # noqa: F401
    except ImportError:
        return (
            "Real image sets: only sklearn's digits ships inside a package here; torchvision is "
            "not installed and its MNIST/CIFAR loaders download at run time, which this offline "
            "study does not do."
        )
    return (
        "Real image sets: torchvision is installed, but its MNIST/CIFAR loaders download at run "
        "time; this offline study uses sklearn's bundled digits only."
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer epochs, one seed")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--cutoff", type=float, default=CUTOFF, help=f"OIALR cutoff ({CUTOFF})")
    parser.add_argument("--out", type=Path, default=HERE / "out" / "oialr")
    parser.add_argument("--figures", type=Path, help="also copy the figures here")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: these networks are too small to gain from more, and on "
        "a busy machine extra threads only wait for each other)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = dict(QUICK if args.quick else FULL, cutoff=args.cutoff)
    start = time.perf_counter()
    data = digits()
    args.out.mkdir(parents=True, exist_ok=True)
    steps_per_epoch = len(data[0]) // BATCH
    seeds = list(range(config["seeds"]))

    sys.path.insert(0, str(BENCH))
    try:
        from rebuild_w import rebuild_w_copy
    except ImportError as error:  # the baseline is optional for a smoke run
        rebuild_w_copy, missing = None, f"bench/rebuild_w.py unavailable ({error})"
    finally:
        sys.path.remove(str(BENCH))

    notes = [image_sets_note()]
    if rebuild_w_copy is None:
        notes.append(missing)
    models = {}
    for name in tqdm(args.models, desc="models", unit="model"):
        runs = {"dense": [], "oialr": []}
        finals = {}
        for seed in seeds:
            for key in runs:
                model, record = train(name, data, seed, config, use_oialr=key == "oialr")
                runs[key].append({"seed": seed, **record})
                if seed == 0:
                    finals[key] = model
        gaps = []
        for dense, oialr in zip(runs["dense"], runs["oialr"]):
            before = config["delay_epochs"]
            gap = max(
                abs(a - b)
                for a, b in zip(
                    dense["test_accuracy"][: before + 1], oialr["test_accuracy"][: before + 1]
                )
            )
            gaps.append(gap)
            if gap > 0:
                notes.append(
                    f"{name} seed {dense['seed']}: dense and OIALR test accuracy differ by "
                    f"{gap:.4f} before the conversion (expected identical)"
                )
        if not any(gaps):
            notes.append(
                f"{name}: dense and OIALR runs have identical test accuracy up to the conversion "
                "(the same computation), every seed"
            )
        timed = {
            "dense": copy.deepcopy(finals["dense"]),
            "oialr": copy.deepcopy(finals["oialr"]),
        }
        if rebuild_w_copy is not None:
            timed["rebuild_w"] = rebuild_w_copy(finals["oialr"])
            with torch.no_grad():
                x = data[2][:BATCH]
                gap = (timed["rebuild_w"](x) - finals["oialr"](x)).abs().max().item()
            notes.append(f"{name}: rebuild-W copy vs OIALR model, max |Δ logits| = {gap:.1e}")
        for model in timed.values():
            model.train()
        timing = time_steps(timed, data[0][:BATCH], data[1][:BATCH], config["timing_rounds"])
        models[name] = {
            "dense_trainable": runs["dense"][0]["dense_trainable"],
            "dense": runs["dense"],
            "oialr": runs["oialr"],
            "timing_ms": timing,
            "trainable_timed": {key: trainable(model) for key, model in timed.items()},
        }

    results = {
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} torch thread(s)",
        "quick": args.quick,
        "config": config,
        "seeds": seeds,
        "steps_per_epoch": steps_per_epoch,
        "delay_steps": config["delay_epochs"] * steps_per_epoch,
        "frequency_steps": config["frequency_epochs"] * steps_per_epoch,
        "optimizer": f"AdamW lr={LEARNING_RATE} weight_decay={WEIGHT_DECAY} batch={BATCH}",
        "oialr": {"cutoff": config["cutoff"], "max_drop": MAX_DROP, "min_rank": 1},
        "notes": notes,
        "models": models,
    }
    figures = draw_figures(results, args.out)
    results["runtime_s"] = round(time.perf_counter() - start, 1)
    table = markdown(results)
    (args.out / "oialr.md").write_text(table + "\n")
    (args.out / "oialr.json").write_text(json.dumps(results, indent=1) + "\n")
    if args.figures is not None:
        args.figures.mkdir(parents=True, exist_ok=True)
        for path in figures:
            shutil.copy(path, args.figures / path.name)
    print(table)
    print(f"\nrun time {results['runtime_s']} s; outputs in {args.out}")
    return results


if __name__ == "__main__":
    main()
