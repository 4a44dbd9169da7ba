"""Successive refinement in orthogonal subspaces (poster "Low Rank, Identifiable Neural Networks").

Train every low-rank layer at rank 1; freeze its singular pair; learn the next pair in the
orthogonal complement of the frozen ones; repeat. Coarse features come first, fine ones later, and
the rank at which validation stops improving marks where the model starts fitting noise.

- `grow_model`: one growth step for every low-rank layer of a model, with `update_optimizer`
  keeping an existing optimizer in step (new tensors in, frozen ones out, all other state kept).
- `fit_successive`: the schedule (grow every E epochs, or earlier on a validation plateau; stop at
  the noise rank or a maximum rank), recording per epoch and per rank the losses and the gradient
  and parameter norms of every parameter group, the poster's identifiability signals.
- `noise_rank`: the rank after which `patience` further ranks bring no relative improvement of
  the validation loss larger than `min_delta`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .growth import (
    LOW_RANK_LAYERS,
    Growth,
    _layers_or_raise,
    _limit,
    _norms,
    grow_model,
    low_rank_layers,
    model_rank,
    parameter_norms,
    update_optimizer,
)

__all__ = [
    "LOW_RANK_LAYERS",
    "EpochRecord",
    "Growth",
    "GrowthSchedule",
    "RankRecord",
    "SuccessiveHistory",
    "fit_successive",
    "grow_model",
    "low_rank_layers",
    "model_rank",
    "noise_rank",
    "parameter_norms",
    "update_optimizer",
]


def noise_rank(
    val_losses: Mapping[int, float], patience: int = 3, min_delta: float = 0.01
) -> tuple[int, bool]:
    """The rank where validation stops improving, and whether that is confirmed.

    Walking up the ranks, a rank counts as an improvement when its loss is below
    (1 − min_delta) × the best loss so far. The noise rank is the last improving rank once
    `patience` further ranks have brought none (confirmed = True); if the ranks run out first it
    is the last improving rank so far (confirmed = False).

    Args:
        val_losses: rank -> validation loss of the model at that rank.
        patience: ranks without improvement that confirm the noise rank (≥ 1).
        min_delta: relative improvement that counts, in [0, 1).
    """
    if not isinstance(val_losses, Mapping) or not val_losses:
        raise ValueError("argument 'val_losses' must be a non-empty mapping rank -> loss")
    if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
        raise ValueError(f"argument 'patience' must be a positive int, got {patience!r}")
    if not isinstance(min_delta, (int, float)) or not 0.0 <= min_delta < 1.0:
        raise ValueError(f"argument 'min_delta' must be a number in [0, 1), got {min_delta!r}")
    ranks = sorted(val_losses)
    best = ranks[0]
    for index, rank in enumerate(ranks[1:], start=1):
        if val_losses[rank] < (1.0 - min_delta) * val_losses[best]:
            best = rank
        elif index - ranks.index(best) >= patience:
            return best, True
    return best, False


@dataclass(frozen=True)
class GrowthSchedule:
    """When to grow and when to stop.

    Attributes:
        epochs_per_rank: grow after this many epochs at a rank (the poster used 500).
        plateau_patience: if set, grow earlier once the validation loss has gone this many
            epochs at the current rank without a relative improvement above plateau_min_delta.
        plateau_min_delta: relative improvement that resets the plateau count.
        max_rank: stop after the model (its largest layer) has trained at this rank; None: go on
            until no layer can grow.
        noise_patience, noise_min_delta: the `noise_rank` rule, on each rank's final
            validation loss.
        stop_at_noise_rank: stop as soon as the noise rank is confirmed.
        k, freeze_scales, scale_init, freeze_capped: passed to `grow_model`.
    """

    epochs_per_rank: int = 500
    plateau_patience: int | None = None
    plateau_min_delta: float = 1e-4
    max_rank: int | None = None
    noise_patience: int = 3
    noise_min_delta: float = 0.01
    stop_at_noise_rank: bool = True
    k: int = 1
    freeze_scales: bool = False
    scale_init: float = 0.0
    freeze_capped: bool = True

    def __post_init__(self):
        def positive(name, optional=False):
            value = getattr(self, name)
            if optional and value is None:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"argument '{name}' must be a positive int, got {value!r}")

        for name in ("epochs_per_rank", "noise_patience", "k"):
            positive(name)
        for name in ("plateau_patience", "max_rank"):
            positive(name, optional=True)
        for name in ("plateau_min_delta", "noise_min_delta"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"argument '{name}' must be a number in [0, 1), got {value!r}")
        for name in ("stop_at_noise_rank", "freeze_scales", "freeze_capped"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"argument '{name}' must be a bool, got {getattr(self, name)!r}")


@dataclass
class EpochRecord:
    """One epoch: losses, mean gradient norm per parameter over the epoch's optimizer steps, and
    the norms of parameters and frozen factors at its end (names as `parameter_norms`)."""

    epoch: int
    rank: int
    train_loss: float
    val_loss: float
    grad_norms: dict[str, float]
    param_norms: dict[str, float]


@dataclass
class RankRecord:
    """One rank: its epochs' summary. grad_norms are averaged over the rank's epochs,
    param_norms and losses are those at its last epoch; `extra` holds what `on_rank_end`
    returned (e.g. a test loss)."""

    rank: int
    layer_ranks: dict[str, int]
    first_epoch: int
    epochs: int
    seconds: float
    train_loss: float
    val_loss: float
    best_val_loss: float
    grad_norms: dict[str, float]
    param_norms: dict[str, float]
    extra: dict[str, float] = field(default_factory=dict)


@dataclass
class SuccessiveHistory:
    """Everything `fit_successive` measured; `to_json`/`from_json` round-trip it."""

    epochs: list[EpochRecord] = field(default_factory=list)
    ranks: list[RankRecord] = field(default_factory=list)
    noise_rank: int | None = None
    noise_rank_confirmed: bool = False
    stop_reason: str = ""
    seconds: float = 0.0

    @property
    def growth_epochs(self) -> list[int]:
        """Epochs that started a new rank (each rank update happened just before them)."""
        return [record.first_epoch for record in self.ranks[1:]]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> SuccessiveHistory:
        return cls(
            epochs=[EpochRecord(**record) for record in data["epochs"]],
            ranks=[RankRecord(**record) for record in data["ranks"]],
            **{key: data[key] for key in ("noise_rank", "noise_rank_confirmed", "stop_reason")},
            seconds=data["seconds"],
        )

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()))

    @classmethod
    def from_json(cls, path: str | Path) -> SuccessiveHistory:
        return cls.from_dict(json.loads(Path(path).read_text()))


class _GradientMeter:
    """Mean ‖grad‖ per parameter name over the optimizer steps of an epoch (a step pre-hook)."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.names: dict[torch.Tensor, str] = {}
        self.sums: dict[str, float] = {}
        self.steps = 0
        self._handle = optimizer.register_step_pre_hook(self._record)

    def track(self, model: nn.Module) -> None:
        self.names = {p: name for name, p in model.named_parameters()}

    def _record(self, optimizer, args, kwargs) -> None:
        grads = {
            self.names[p]: p.grad
            for group in optimizer.param_groups
            for p in group["params"]
            if p.grad is not None and p in self.names
        }
        for name, value in _norms(grads).items():
            self.sums[name] = self.sums.get(name, 0.0) + value
        self.steps += 1

    def take(self) -> dict[str, float]:
        means = {name: total / self.steps for name, total in self.sums.items()}
        self.sums, self.steps = {}, 0
        return means

    def remove(self) -> None:
        self._handle.remove()


def fit_successive(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_epoch: Callable[[], float],
    validate: Callable[[], float],
    schedule: GrowthSchedule | None = None,
    *,
    on_rank_end: Callable[[RankRecord, nn.Module], Mapping[str, float] | None] | None = None,
    generator: torch.Generator | None = None,
    progress: bool = True,
) -> SuccessiveHistory:
    """Train `model` by successive refinement and return what was measured.

    Args:
        model: holds the low-rank layers to grow (LowRankLinear, LowRankConv2d), at their
            starting rank (usually 1).
        optimizer: over the model's parameters; updated in place at every growth, so closures
            holding it stay valid.
        train_epoch: runs one epoch (forward, backward, optimizer.step) and returns its loss.
            Gradient norms are read at each optimizer step, so any loop structure works.
        validate: returns the validation loss of the model as it is now.
        schedule: when to grow and stop (default: every 500 epochs, stop at the noise rank).
        on_rank_end: called with each finished rank's record and the model before it grows;
            what it returns (e.g. {"test_loss": ...}) is stored in the record's `extra`.
        generator: random source for the new directions.
        progress: show a tqdm bar over epochs.
    """
    schedule = GrowthSchedule() if schedule is None else schedule
    if not isinstance(schedule, GrowthSchedule):
        raise TypeError(
            f"argument 'schedule' must be a GrowthSchedule, got {type(schedule).__name__}"
        )
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"argument 'optimizer' must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
        )
    layers = _layers_or_raise(model)
    history = SuccessiveHistory()
    meter = _GradientMeter(optimizer)
    ranks_to_go = None if schedule.max_rank is None else schedule.max_rank - model_rank(model) + 1
    bar = tqdm(
        total=None if ranks_to_go is None else max(ranks_to_go, 1) * schedule.epochs_per_rank,
        disable=not progress,
        unit="epoch",
        desc="successive",
    )
    started = time.perf_counter()
    try:
        meter.track(model)
        while True:
            record = _train_one_rank(model, train_epoch, validate, schedule, meter, history, bar)
            if on_rank_end is not None:
                record.extra.update(on_rank_end(record, model) or {})
            history.ranks.append(record)
            losses = {r.rank: r.val_loss for r in history.ranks}
            history.noise_rank, history.noise_rank_confirmed = noise_rank(
                losses, schedule.noise_patience, schedule.noise_min_delta
            )
            if schedule.stop_at_noise_rank and history.noise_rank_confirmed:
                history.stop_reason = "validation stopped improving (noise rank confirmed)"
            elif schedule.max_rank is not None and record.rank >= schedule.max_rank:
                history.stop_reason = f"reached max_rank={schedule.max_rank}"
            elif all(layer.rank == _limit(layer) for layer in layers.values()):
                history.stop_reason = "every layer at full rank"
            if history.stop_reason:
                break
            grow_model(
                model,
                schedule.k,
                optimizer=optimizer,
                freeze_scales=schedule.freeze_scales,
                scale_init=schedule.scale_init,
                freeze_capped=schedule.freeze_capped,
                generator=generator,
            )
            meter.track(model)
    finally:
        meter.remove()
        bar.close()
    history.seconds = time.perf_counter() - started
    return history


def _train_one_rank(model, train_epoch, validate, schedule, meter, history, bar) -> RankRecord:
    rank = model_rank(model)
    first_epoch = len(history.epochs)
    best, since_best = math.inf, 0
    started = time.perf_counter()
    epochs: list[EpochRecord] = []
    while len(epochs) < schedule.epochs_per_rank:
        train_loss = float(train_epoch())
        val_loss = float(validate())
        record = EpochRecord(
            len(history.epochs),
            rank,
            train_loss,
            val_loss,
            meter.take() if meter.steps else {},
            parameter_norms(model),
        )
        epochs.append(record)
        history.epochs.append(record)
        bar.update()
        bar.set_postfix(rank=rank, train=f"{train_loss:.4g}", val=f"{val_loss:.4g}", refresh=False)
        if val_loss < (1.0 - schedule.plateau_min_delta) * best:
            best, since_best = val_loss, 0
        else:
            since_best += 1
        if schedule.plateau_patience is not None and since_best >= schedule.plateau_patience:
            break
    seconds = time.perf_counter() - started
    grad_names = {name for record in epochs for name in record.grad_norms}
    grad_norms = {
        name: sum(r.grad_norms[name] for r in epochs if name in r.grad_norms)
        / sum(name in r.grad_norms for r in epochs)
        for name in sorted(grad_names)
    }
    last = epochs[-1]
    return RankRecord(
        rank=rank,
        layer_ranks={name: layer.rank for name, layer in low_rank_layers(model).items()},
        first_epoch=first_epoch,
        epochs=len(epochs),
        seconds=seconds,
        train_loss=last.train_loss,
        val_loss=last.val_loss,
        best_val_loss=min(r.val_loss for r in epochs),
        grad_norms=grad_norms,
        param_norms=last.param_norms,
    )
