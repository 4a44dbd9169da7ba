"""OIALR adaptive-rank training against dense training on Fashion-MNIST (and MNIST for the MLP).

OIALR (Coquelin et al., arXiv:2401.08505; `lowrank_ext.OIALR`) trains dense for `delay` steps,
then trains only the r×r cores S of W = U S Vᵀ (U, V frozen), and every `frequency` steps rotates
U, V into the SVD of S and drops the singular values below cutoff·σ_max (at most half a layer's
rank at once). Settings: the paper's cutoff 0.1; delay 1/6 and frequency 1/30 of the training
steps (the ratios of the digits study, `examples/oialr_digits.py`; the seeds give the cutoff
only); the output layer stays dense.

Data (`examples/data/images.py`, offline): 28×28 images scaled to [0, 1] and standardized with
the training mean and sd; the 60,000 training images split once (seed 0) into 55,000 for
training and 5,000 for validation (the accuracy curves); the 10,000 test images for the final
accuracy. Models: an MLP 784 → 1024 → 1024 → 10; a CNN (3×3 convs 1 → 16 → 32, each followed by
a 2×2 max-pool, then 1568 → 256 → 10); a vision transformer (7×7 patches → 16 tokens, width 128,
learned positions, 4 pre-norm encoder blocks with 4 heads and a 512-wide MLP, mean pool, head).

Dense and OIALR train in lockstep from the same initial weights, on the same batches, each with
its own AdamW: batch after batch, one model's training step (forward, backward, AdamW) and then
the other's, the order alternating, each step timed. Up to the conversion the two are the same
computation (checked: the largest parameter difference just before it is recorded). So the
per-step times are interleaved samples from the same minutes of machine load, and a run's
training time is the sum of its steps (OIALR's including `oialr.step()`). At the end, seed 0's
final dense and OIALR models and `bench/rebuild_w.py`'s copy of the OIALR model (the paper's
reference style, rebuilding W = U S Vᵀ every forward) are timed round-robin on one batch.

    python examples/oialr_fashion_mnist.py            # the full study (~45 min on 2 cores)
    python examples/oialr_fashion_mnist.py --quick    # a check of the pipeline (<1 min idle)
    python examples/oialr_fashion_mnist.py --replot --figures docs/figures

Writes oialr_fashion_mnist.json, .md (the tables) and figures fashion_mnist_oialr_*.png to
--out (default examples/out/oialr_fashion_mnist). Needs matplotlib and the data (see
examples/data/images.py; LOWRANK_DATA_DIR names a folder holding it).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import lowrank_ext
from lowrank_ext.plots.oialr import plot_rank_history

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from data.images import fashion_mnist, mnist  # noqa: E402  (examples/data, not a package)

BENCH = HERE.parent / "bench"  # bench/rebuild_w.py: the reference-style baseline
LOADERS = {"fashion-mnist": fashion_mnist, "mnist": mnist}

# (data set, model) in the order they run: the targets' models first.
STUDIES = (
    ("fashion-mnist", "MLP"),
    ("fashion-mnist", "ViT"),
    ("mnist", "MLP"),
    ("fashion-mnist", "CNN"),
)
FULL = {
    "seeds": 3,
    "epochs": {
        "fashion-mnist:MLP": 8,
        "fashion-mnist:ViT": 6,
        "mnist:MLP": 4,
        "fashion-mnist:CNN": 2,
    },
    "train_size": None,  # all 55,000
    "val_size": None,  # all 5,000
    "test_size": None,  # all 10,000
    # the paper's cutoff; delay and frequency as fractions of the training steps
    "delay_fraction": 1 / 6,
    "frequency_fraction": 1 / 30,
    "timing_warmup": 5,
    "evaluations": 8,  # validation accuracy points per run
    "timing_rounds": {"MLP": 100, "ViT": 20, "CNN": 30},
}
QUICK = {
    "seeds": 1,
    "epochs": {
        "fashion-mnist:MLP": 2,
        "fashion-mnist:ViT": 1,
        "mnist:MLP": 2,
        "fashion-mnist:CNN": 1,
    },
    "train_size": 2048,
    "val_size": 1000,
    "test_size": 2000,
    "delay_fraction": 1 / 6,
    "frequency_fraction": 1 / 4,  # 3 updates: each costs ~1 s on the MLP (SVDs of 1024×1024)
    "timing_warmup": 2,
    "evaluations": 3,
    "timing_rounds": {"MLP": 5, "ViT": 3, "CNN": 3},
}
VALIDATION, SPLIT_SEED = 5000, 0
BATCH, LEARNING_RATE, WEIGHT_DECAY = 128, 1e-3, 1e-2
CUTOFF, MAX_DROP = 0.1, 0.5


class MLP(nn.Module):
    def __init__(self, hidden: int = 1024) -> None:
        super().__init__()
        self.fc1 = nn.Linear(28 * 28, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.fc2(F.relu(self.fc1(x.flatten(1))))))


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 7 * 7, 256)
        self.head = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.head(F.relu(self.fc(x.flatten(1))))


class ViT(nn.Module):
    """Vision transformer (Dosovitskiy et al. 2021) at MNIST scale: 7×7 patches, 16 tokens."""

    def __init__(self, width: int = 128, blocks: int = 4, heads: int = 4, patch: int = 7) -> None:
        super().__init__()
        self.patch = patch
        tokens = (28 // patch) ** 2
        self.embed = nn.Linear(patch * patch, width)
        self.position = nn.Parameter(torch.randn(1, tokens, width) * 0.02)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True
            )
            for _ in range(blocks)
        )
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch
        patches = x.unfold(2, p, p).unfold(3, p, p).reshape(len(x), -1, p * p)
        tokens = self.embed(patches) + self.position
        for block in self.blocks:
            tokens = block(tokens)
        return self.head(self.norm(tokens).mean(1))


MODELS = {"MLP": MLP, "CNN": CNN, "ViT": ViT}


def load(dataset: str, config: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """train/val/test: float32 (n, 1, 28, 28) standardized by the training pixels, int64 labels."""
    raw = LOADERS[dataset]()
    images, labels = raw["train"]
    order = np.random.default_rng(SPLIT_SEED).permutation(len(images))
    val, train = order[:VALIDATION], order[VALIDATION:]
    if config["train_size"] is not None:
        train = train[: config["train_size"]]
    if config["val_size"] is not None:
        val = val[: config["val_size"]]
    test_x, test_y = raw["test"]
    if config["test_size"] is not None:
        test_x, test_y = test_x[: config["test_size"]], test_y[: config["test_size"]]
    x_train = torch.from_numpy(images[train]).float() / 255
    mean, sd = x_train.mean().item(), x_train.std().item()

    def prepare(x, y):
        x = torch.as_tensor(np.asarray(x)).float() / 255
        return ((x - mean) / sd).unsqueeze(1), torch.as_tensor(np.asarray(y)).long()

    return {
        "train": prepare(images[train], labels[train]),
        "val": prepare(images[val], labels[val]),
        "test": prepare(test_x, test_y),
    }


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def accuracy(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> float:
    x, y = data
    was_training = model.training
    model.eval()
    with torch.no_grad():
        correct = sum(
            (model(xs).argmax(1) == ys).sum().item() for xs, ys in zip(x.split(1000), y.split(1000))
        )
    model.train(was_training)
    return correct / len(y)


def training_step(model: nn.Module, optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


def largest_difference(a: nn.Module, b: nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def train_pair(name: str, data: dict, seed: int, epochs: int, config: dict) -> tuple[dict, dict]:
    """Dense and OIALR from the same init, in lockstep on the same batches (see the module doc).
    Returns ({"dense": model, "oialr": model}, the record)."""
    torch.manual_seed(seed)
    models = {"dense": MODELS[name]()}
    models["oialr"] = copy.deepcopy(models["dense"])
    optimizers = {
        key: torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
        for key, model in models.items()
    }
    x_train, y_train = data["train"]
    steps_per_epoch = len(x_train) // BATCH
    total = epochs * steps_per_epoch
    delay = max(1, round(config["delay_fraction"] * total))
    frequency = max(1, round(config["frequency_fraction"] * total))
    oialr = lowrank_ext.OIALR(
        models["oialr"], optimizers["oialr"], delay, frequency, CUTOFF, max_drop=MAX_DROP
    )
    dense_count = trainable(models["dense"])
    checkpoints = {
        round(total * (i + 1) / config["evaluations"]) for i in range(config["evaluations"])
    }
    start_accuracy = accuracy(models["dense"], data["val"])
    curve = {"step": [0], "dense": [start_accuracy], "oialr": [start_accuracy]}
    seconds = {"dense": [], "oialr": [], "oialr_update": []}
    order = torch.Generator().manual_seed(seed)
    record = {
        "seed": seed,
        "epochs": epochs,
        "steps": total,
        "delay": delay,
        "frequency": frequency,
    }
    step = 0
    while step < total:
        permutation = torch.randperm(len(x_train), generator=order)
        for batch in permutation[: steps_per_epoch * BATCH].split(BATCH)[: total - step]:
            x, y = x_train[batch], y_train[batch]
            for key in ("dense", "oialr") if step % 2 == 0 else ("oialr", "dense"):
                start = time.perf_counter()
                training_step(models[key], optimizers[key], x, y)
                seconds[key].append(time.perf_counter() - start)
            if not oialr.converted and oialr.steps + 1 == delay:
                # the same computation so far: expect bitwise equal weights
                record["gap_before_conversion"] = largest_difference(
                    models["dense"], models["oialr"]
                )
            start = time.perf_counter()
            oialr.step()
            seconds["oialr_update"].append(time.perf_counter() - start)
            step += 1
            if step in checkpoints:
                curve["step"].append(step)
                for key, model in models.items():
                    curve[key].append(accuracy(model, data["val"]))
    after = slice(delay, None)  # steps after the conversion
    ratios = [o / d for o, d in zip(seconds["oialr"][after], seconds["dense"][after])]
    record.update(
        {
            "dense_trainable": dense_count,
            "test_accuracy": {key: accuracy(model, data["test"]) for key, model in models.items()},
            "val_curve": curve,
            "trainable_events": [[0, 1.0]]
            + [[entry["step"], entry["trainable"] / dense_count] for entry in oialr.history],
            "ranks": dict(oialr.ranks()),
            "full_ranks": dict(oialr.history[0]["ranks"]),
            "rank_history": [{"step": e["step"], "ranks": dict(e["ranks"])} for e in oialr.history],
            "final_trainable_fraction": trainable(models["oialr"]) / dense_count,
            "final_parameters": oialr.history[-1]["parameters"],
            "step_ms_after_conversion": {
                "dense": 1e3 * statistics.median(seconds["dense"][after]),
                "oialr": 1e3 * statistics.median(seconds["oialr"][after]),
                "oialr_over_dense": statistics.median(ratios),
            },
            "training_seconds": {
                "dense": sum(seconds["dense"]),
                "oialr": sum(seconds["oialr"]) + sum(seconds["oialr_update"]),
                "oialr_updates": sum(seconds["oialr_update"]),
            },
        }
    )
    return models, record


def interleaved_step_times(
    models: dict[str, nn.Module], x, y, rounds: int, warmup: int
) -> dict[str, dict]:
    """Median ms of a training step (forward, backward, AdamW) of each model on one batch, the
    models taking turns (the first one rotating every round); ratios to the first model are the
    median over rounds of the per-round ratio."""
    optimizers = {
        key: torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad],
            lr=LEARNING_RATE,
            weight_decay=WEIGHT_DECAY,
        )
        for key, model in models.items()
    }
    keys = list(models)
    for _ in range(warmup):
        for key in keys:
            training_step(models[key], optimizers[key], x, y)
    seconds = {key: [] for key in keys}
    for round_ in range(rounds):
        shift = round_ % len(keys)
        for key in keys[shift:] + keys[:shift]:
            start = time.perf_counter()
            training_step(models[key], optimizers[key], x, y)
            seconds[key].append(time.perf_counter() - start)
    first = np.array(seconds[keys[0]])
    return {
        key: {
            "median_ms": 1e3 * float(np.median(values)),
            "q1_ms": 1e3 * float(np.percentile(values, 25)),
            "q3_ms": 1e3 * float(np.percentile(values, 75)),
            "over_dense": float(np.median(np.array(values) / first)),
        }
        for key, values in seconds.items()
    }


def rebuild_w_copy_or_none():
    sys.path.insert(0, str(BENCH))
    try:
        from rebuild_w import rebuild_w_copy
    except ImportError:
        return None
    finally:
        sys.path.remove(str(BENCH))
    return rebuild_w_copy


def run_study(dataset: str, name: str, data: dict, config: dict, log) -> dict:
    epochs = config["epochs"][f"{dataset}:{name}"]
    started = time.perf_counter()
    runs, finals = [], None
    for seed in range(config["seeds"]):
        models, record = train_pair(name, data, seed, epochs, config)
        runs.append(record)
        finals = finals or models
        log(
            f"{dataset} {name} seed {seed}: test accuracy dense "
            f"{record['test_accuracy']['dense']:.4f}"
            f" OIALR {record['test_accuracy']['oialr']:.4f}, trainable "
            f"{100 * record['final_trainable_fraction']:.1f} %, training s dense "
            f"{record['training_seconds']['dense']:.0f} OIALR "
            f"{record['training_seconds']['oialr']:.0f}"
            f" ({time.perf_counter() - started:.0f} s so far)"
        )
    timed = {key: copy.deepcopy(model) for key, model in finals.items()}
    rebuild_w_copy = rebuild_w_copy_or_none()
    notes = []
    if rebuild_w_copy is not None:
        timed["rebuild_w"] = rebuild_w_copy(finals["oialr"])
        with torch.no_grad():
            x = data["test"][0][:BATCH]
            gap = (timed["rebuild_w"].eval()(x) - finals["oialr"].eval()(x)).abs().max().item()
        notes.append(f"rebuild-W copy vs OIALR model: max |Δ logits| = {gap:.1e}")
    else:
        notes.append("bench/rebuild_w.py not found: no rebuild-W timing")
    for model in timed.values():
        model.train()
    x, y = data["train"][0][:BATCH], data["train"][1][:BATCH]
    timing = interleaved_step_times(
        timed, x, y, config["timing_rounds"][name], config["timing_warmup"]
    )
    return {
        "dataset": dataset,
        "model": name,
        "epochs": epochs,
        "steps_per_epoch": len(data["train"][0]) // BATCH,
        "runs": runs,
        "timing_ms": timing,
        "notes": notes,
        "wall_seconds": time.perf_counter() - started,
    }


def mean_sd(values) -> tuple[float, float]:
    values = list(values)
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def fmt(values, scale: float = 1.0, digits: int = 3) -> str:
    mean, sd = mean_sd(scale * v for v in values)
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def short(layer: str) -> str:
    return layer.replace("blocks.", "b").replace("self_attn.", "")


def fraction_at(events: list, step: int) -> float:
    """Trainable fraction in force at `step` (events: [step, fraction] at every change)."""
    return [f for s, f in events if s <= step][-1]


def ranks_cell(study: dict) -> str:
    runs = study["runs"]
    full = runs[0]["full_ranks"]
    if len(full) > 6:  # the transformer: range over layers and seeds, by layer kind
        kinds = {}
        for run in runs:
            for layer, rank in run["ranks"].items():
                kind = layer.split(".")[-1]
                kinds.setdefault(kind, []).append((rank, full[layer]))
        return "; ".join(
            f"{kind} {min(r for r, _ in v)}–{max(r for r, _ in v)} of {v[0][1]}"
            for kind, v in kinds.items()
        )
    return "; ".join(
        f"{short(layer)} {'/'.join(str(run['ranks'][layer]) for run in runs)} of {full[layer]}"
        for layer in full
    )


def run_line(run: dict) -> str:
    """When, where, how and under what load one invocation ran."""
    quick = " QUICK MODE (a pipeline check, not results)." if run["quick"] else ""
    if "wall_seconds" in run:
        end = f"at end {run['load_end']}, {run['wall_seconds'] / 60:.1f} min wall"
    else:
        walls = " + ".join(f"{s['wall_seconds'] / 60:.1f}" for s in run.get("studies", []))
        end = f"stopped before its end, after studies of {walls} min wall (saved as they finished)"
    return (
        f"`{run['command'].strip()}` — {run['date']}, {run['machine']}, torch "
        f"{run.get('torch', torch.__version__)}; load average (1, 5, 15 min) at start "
        f"{run['load_start']}, {end}.{quick}"
    )


def markdown(results: dict) -> str:
    config = results["config"]
    test = "10,000" if config["test_size"] is None else f"{config['test_size']:,}"
    first = results["studies"][0]["runs"][0]
    # the studies of this run come first, then those of the merged ones
    own = len(results["studies"]) - sum(m.get("study_count", 0) for m in results.get("merged", []))
    lines = [
        f"Run: {run_line({**results, 'studies': results['studies'][:own]})}",
        *(f"Run: {run_line(run)}" for run in results.get("merged", [])),
        f"{config['seeds']} seed(s); AdamW lr {LEARNING_RATE}, weight decay {WEIGHT_DECAY}, "
        f"batch {BATCH}; OIALR cutoff {CUTOFF}, max drop {MAX_DROP}, delay "
        f"{first['delay'] / first['steps']:.3f} and frequency "
        f"{first['frequency'] / first['steps']:.3f} of the "
        f"training steps. Test accuracy on {test} test images, mean ± sd over seeds.",
        "",
        "| data | model | epochs (steps) | dense acc | OIALR acc | OIALR − dense (points) "
        "| trainable % at ¼, ½, ¾ of training | trainable % at the end | final ranks (per seed) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for study in results["studies"]:
        runs = study["runs"]
        total = runs[0]["steps"]
        quarters = [
            fmt([fraction_at(r["trainable_events"], q * total // 4) for r in runs], 100, 1)
            for q in (1, 2, 3)
        ]
        gains = [r["test_accuracy"]["oialr"] - r["test_accuracy"]["dense"] for r in runs]
        lines.append(
            f"| {study['dataset']} | {study['model']} | {study['epochs']} ({total}) | "
            f"{fmt(r['test_accuracy']['dense'] for r in runs)} | "
            f"{fmt(r['test_accuracy']['oialr'] for r in runs)} | "
            f"{fmt(gains, 100, 2)} | {' / '.join(quarters)} | "
            f"{fmt([r['final_trainable_fraction'] for r in runs], 100, 1)} | "
            f"{ranks_cell(study)} |"
        )
    lines += [
        "",
        "Time. Training steps (forward, backward, AdamW) after the conversion, dense and OIALR "
        "interleaved step by step in the same runs: median ms and the median of the per-step "
        "ratio. Whole training runs: the sum of each model's step times in those runs (OIALR's "
        "with its `oialr.step()` updates). End of run: seed 0's final models timed round-robin "
        "(median ms, in brackets the median per-round ratio to dense); rebuild-W = "
        "`bench/rebuild_w.py`, the paper's reference style.",
        "",
        "| data | model | step ms dense / OIALR (ratio), training | training run s dense / OIALR "
        "(ratio) | OIALR updates s | end: dense ms | end: OIALR ms | end: rebuild-W ms "
        "| study wall s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for study in results["studies"]:
        runs = study["runs"]
        steps = [r["step_ms_after_conversion"] for r in runs]
        seconds = [r["training_seconds"] for r in runs]
        timing = study["timing_ms"]
        end = [
            f"{timing[key]['median_ms']:.2f} ({timing[key]['over_dense']:.2f}×)"
            if key in timing
            else "n/a"
            for key in ("dense", "oialr", "rebuild_w")
        ]
        lines.append(
            f"| {study['dataset']} | {study['model']} | "
            f"{fmt([s['dense'] for s in steps], digits=2)} / "
            f"{fmt([s['oialr'] for s in steps], digits=2)} "
            f"({fmt([s['oialr_over_dense'] for s in steps], digits=2)}) | "
            f"{fmt([s['dense'] for s in seconds], digits=0)} / "
            f"{fmt([s['oialr'] for s in seconds], digits=0)} "
            f"({fmt([s['oialr'] / s['dense'] for s in seconds], digits=2)}) | "
            f"{fmt([s['oialr_updates'] for s in seconds], digits=1)} | {' | '.join(end)} | "
            f"{study['wall_seconds']:.0f} |"
        )
    notes = []
    for study in results["studies"]:
        gaps = [r.get("gap_before_conversion") for r in study["runs"]]
        notes.append(
            f"{study['dataset']} {study['model']}: largest |dense − OIALR| parameter difference "
            "just "
            f"before the conversion, per seed: {gaps}; " + "; ".join(study["notes"])
        )
    lines += ["", *(f"- {note}" for note in notes)]
    return "\n".join(lines)


def draw_figures(results: dict, out: Path) -> list[Path]:
    from matplotlib.figure import Figure

    studies = results["studies"]
    titles = [f"{s['dataset']} {s['model']}, {s['epochs']} ep." for s in studies]
    paths = [out / "fashion_mnist_oialr_ranks.png"]
    figure = plot_rank_history(
        {f"{t}: ranks (seed 0)": s["runs"][0]["rank_history"] for t, s in zip(titles, studies)},
        end_steps={f"{t}: ranks (seed 0)": s["runs"][0]["steps"] for t, s in zip(titles, studies)},
        label=short,
    )
    figure.set_size_inches(4.4 * len(studies), 5.2)
    for ax in figure.axes:  # the transformer has 17 layers: a compact legend
        ax.legend(fontsize="x-small", ncol=2 if len(ax.get_lines()) > 6 else 1)
    figure.tight_layout()
    figure.savefig(paths[-1], dpi=100)

    figure = Figure(figsize=(4.2 * len(studies), 3.6))
    for index, (title, study) in enumerate(zip(titles, studies)):
        ax = figure.add_subplot(1, len(studies), index + 1)
        steps = study["runs"][0]["val_curve"]["step"]
        for key, label, color in (("dense", "dense", "tab:blue"), ("oialr", "OIALR", "tab:red")):
            curves = np.array([r["val_curve"][key] for r in study["runs"]])
            mean, sd = curves.mean(0), curves.std(0)
            ax.plot(steps, mean, color=color, label=label, marker=".")
            ax.fill_between(steps, mean - sd, mean + sd, color=color, alpha=0.2)
        ax.axvline(
            study["runs"][0]["delay"], color="grey", linestyle="--", linewidth=1, label="conversion"
        )
        top = max(
            max(r["val_curve"]["dense"][1:] + r["val_curve"]["oialr"][1:]) for r in study["runs"]
        )
        low = min(
            min(r["val_curve"]["dense"][1:] + r["val_curve"]["oialr"][1:]) for r in study["runs"]
        )
        ax.set_ylim(low - 0.01, min(1.0, top + 0.01))
        ax.set_xlabel("training step")
        ax.set_ylabel("validation accuracy")
        ax.set_title(f"{title} ({len(study['runs'])} seeds)")
        ax.legend(fontsize="small", loc="lower right")
    figure.tight_layout()
    paths.append(out / "fashion_mnist_oialr_accuracy.png")
    figure.savefig(paths[-1], dpi=100)

    figure = Figure(figsize=(6.5, 3.8))
    ax = figure.add_subplot()
    for title, study in zip(titles, studies):
        run = study["runs"][0]
        events = run["trainable_events"] + [[run["steps"], run["trainable_events"][-1][1]]]
        ax.step(
            [s / run["steps"] for s, _ in events],
            [100 * f for _, f in events],
            where="post",
            label=title,
        )
    ax.axhline(20, color="black", linestyle=":", linewidth=1, label="target 20 %")
    ax.axvline(
        run["delay"] / run["steps"],
        color="grey",
        linestyle="--",
        linewidth=1,
        label="conversion",
    )
    ax.set_xlabel("fraction of training")
    ax.set_ylabel("trainable parameters (% of dense)")
    ax.set_title("OIALR: trainable parameters (seed 0)")
    ax.legend(fontsize="small")
    figure.tight_layout()
    paths.append(out / "fashion_mnist_oialr_trainable.png")
    figure.savefig(paths[-1], dpi=100)
    return paths


def copy_figures(paths: list[Path], figures: Path | None) -> None:
    """Print each path; copy it to `figures` (if given) as a 256-colour palette PNG, a third of
    the size with the same look."""
    for path in paths:
        print("wrote", path)
        if figures is not None:
            from PIL import Image  # matplotlib's own dependency

            figures.mkdir(parents=True, exist_ok=True)
            image = Image.open(path).convert("RGB").quantize(colors=256)
            image.save(figures / path.name, optimize=True)


def machine() -> str:
    return f"{platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} thread(s)"


def report(results: dict, out: Path, figures: Path | None) -> None:
    table = markdown(results)
    (out / "oialr_fashion_mnist.md").write_text(table + "\n")
    print(table)
    copy_figures(draw_figures(results, out), figures)


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def run_record(script: str, argv: list[str] | None, quick: bool, config: dict) -> dict:
    """What a study's JSON starts with: when, where, how it was run, and the load at the start."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "torch": torch.__version__,
        "command": f"python examples/{script} "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "quick": quick,
        "config": config,
        "load_start": load_average(),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small subsets, 1 seed, 1–2 epochs")
    parser.add_argument(
        "--studies",
        nargs="+",
        default=[f"{d}:{m}" for d, m in STUDIES],
        help="which of " + " ".join(f"{d}:{m}" for d, m in STUDIES),
    )
    parser.add_argument("--seeds", type=int, help="number of seeds (3)")
    parser.add_argument(
        "--epochs",
        nargs="+",
        default=[],
        metavar="STUDY=N",
        help="epochs of a study, e.g. mnist:MLP=2 (full: "
        + ", ".join(f"{k}={v}" for k, v in FULL["epochs"].items())
        + ")",
    )
    parser.add_argument("--out", type=Path, default=HERE / "out" / "oialr_fashion_mnist")
    parser.add_argument("--figures", type=Path, help="also write the figures here (palette PNGs)")
    parser.add_argument("--replot", action="store_true", help="tables and figures from OUT's json")
    parser.add_argument(
        "--merge",
        nargs="+",
        type=Path,
        default=[],
        help="with --replot: append the studies of these other runs' json files",
    )
    parser.add_argument("--threads", type=int, help="torch threads (torch's default: every core)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    saved = args.out / "oialr_fashion_mnist.json"
    if args.replot:
        results = json.loads(saved.read_text())
        for other in args.merge:
            extra = json.loads(other.read_text())
            studies = extra.pop("studies")
            results["studies"] += studies
            extra["study_count"] = len(studies)
            results.setdefault("merged", []).append(extra)
        report(results, args.out, args.figures)
        return results
    unknown = [s for s in args.studies if tuple(s.split(":")) not in STUDIES]
    if unknown:
        parser.error(f"argument --studies: unknown {unknown}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    config = copy.deepcopy(QUICK if args.quick else FULL)
    if args.seeds is not None:
        config["seeds"] = args.seeds
    for item in args.epochs:
        study, _, value = item.partition("=")
        if study not in config["epochs"] or not value.isdigit() or int(value) < 1:
            parser.error(
                f"argument --epochs: expected STUDY=N with STUDY in {list(FULL['epochs'])}, "
                f"got {item!r}"
            )
        config["epochs"][study] = int(value)
    started = time.perf_counter()
    results = {**run_record("oialr_fashion_mnist.py", argv, args.quick, config), "studies": []}

    def log(message: str) -> None:
        print(
            f"[{time.perf_counter() - started:7.0f} s, load {load_average()}] {message}", flush=True
        )

    cache = {}
    for study in args.studies:
        dataset, name = study.split(":")
        if dataset not in cache:
            cache = {dataset: load(dataset, config)}  # one data set in memory at a time
        log(f"{dataset} {name}: {config['seeds']} seed(s)")
        results["studies"].append(run_study(dataset, name, cache[dataset], config, log))
        saved.write_text(json.dumps(results, indent=1) + "\n")  # partial results survive
    results["wall_seconds"] = time.perf_counter() - started
    results["load_end"] = load_average()
    saved.write_text(json.dumps(results, indent=1) + "\n")
    report(results, args.out, args.figures)
    return results


if __name__ == "__main__":
    main()
