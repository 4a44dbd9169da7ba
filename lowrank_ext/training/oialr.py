"""OIALR: orthogonality-informed adaptive low-rank training (Coquelin et al., arXiv:2401.08505).

The model trains dense for `delay` optimizer steps. Then every eligible layer becomes U S Vᵀ at
full rank (the same function), with S an r×r trainable core and U, V frozen; only S and the
biases train. Every `frequency` steps after that, the SVD S = P Σ Qᵀ (in float32, or float64
for float64 cores; never in a half precision, autocast or not) rotates the bases
(U ← U P, V ← V Q, S ← Σ: W unchanged, S diagonal) and the components with σ < cutoff·σ_max
are dropped (Eckart–Young: the best approximation of that rank), at most a fraction `max_drop`
of a layer's rank per update and never below `min_rank`.

Unlike the paper's reference code, which rebuilds the dense W every forward, the layers here
run factored (`lowrank_ext.ops.linear`, two convolutions for LowRankConv2d), so a training step
costs O((in + out)·r) per sample.

The optimizer's state follows every change of parametrization (`state_mode`):
- "rotate": moments are carried into the new coordinates (`lowrank_ext.training.optimizer_state`):
  exactly for those linear in the gradient (momentum, Adam's exp_avg), so that a pure rotation
  followed by a step equals the step in the old coordinates; for squared ones (exp_avg_sq) as
  the diagonal of the rotated covariance, exact once S is diagonal (the rotation is then a
  signed permutation).
- "slice": the reference's choice: state entries are cut to the kept leading block, unrotated;
  at conversion the new cores start with fresh state.
- "reset": every changed parameter starts with fresh state (Adam restarts its bias correction).

Distributed: with torch.distributed initialized (world size > 1), rank decisions and the new
factors and moments are broadcast from process 0, so all processes stay bitwise equal. A change
of parameter shapes needs a new DistributedDataParallel wrapper; `step()` returns True then.

torch.compile: each change of shapes compiles the model once more (an update that keeps the
ranks writes in place and does not). Dynamo runs a frame eagerly once it has been recompiled
`torch._dynamo.config.recompile_limit` times (8 by default): raise that limit above the number
of rank changes a run makes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from .. import linalg
from ..nn import convert
from ..nn.transaction import all_or_nothing
from . import oialr_history, optimizer_state
from .oialr_checkpoint import STATE_VERSION, check_saved_ranks, check_state
from .oialr_selection import (
    _dense_factorizations,
    _dense_weights,
    _factored_layers,
    _selection,
    _share_and_map,
    _unwrap,
)

__all__ = ["OIALR"]

STATE_MODES = ("rotate", "slice", "reset")


class OIALR:
    """Adaptive low-rank training of `model`, driven by `step()` after each optimizer step.

    Args:
        model: the model (a DistributedDataParallel or torch.compile wrapper is unwrapped); its
            eligible modules are replaced in place at conversion.
        optimizer: the optimizer over the model's parameters; its param groups and state are
            updated in place at conversion and at every rank change.
        delay: optimizer steps of dense training before conversion (0: convert now).
        frequency: optimizer steps between basis updates after conversion.
        cutoff: drop singular values below cutoff·σ_max of each layer's S, in [0, 1).
        max_drop: at most this fraction of a layer's rank is dropped per update, in [0, 1].
        min_rank: no layer is truncated below this rank.
        keep_last_dense: leave the output layer dense (see `lowrank_ext.convert`); only with
            target_modules None.
        target_modules, exclude_modules: which modules to convert, as `lowrank_ext.convert`
            takes them (None: every nn.Linear, transformers Conv1D, nn.Conv2d with groups=1
            and nn.MultiheadAttention). Low-rank modules with core="full" already in the model and
            selected by these are adopted as they are.
        state_mode: "rotate", "slice" or "reset" (see the module doc).
        process_group: the group to broadcast decisions in (default: the default group when
            torch.distributed is initialized).

    `history`: per conversion (the first entry) and update, {"step", "ranks", "parameters",
    "trainable"}: the ranks and the model's counts after it (`lowrank_ext.nn.count_parameters`),
    logged on the logger "lowrank_ext"; the conversion's also has "dense": the dense model's
    {"parameters", "trainable"}. Converting at full rank makes the model larger than dense
    (past every break-even rank) until truncations shrink it.

    Usage: `loss.backward(); optimizer.step(); oialr.step()`. Checkpoint `oialr.state_dict()`
    with the model's and optimizer's; to resume, build the dense model, optimizer and OIALR as
    before, then `oialr.load_state_dict(...)` first (it converts and resizes the model to the
    saved ranks), then `model.load_state_dict(...)` and `optimizer.load_state_dict(...)`.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        delay: int,
        frequency: int,
        cutoff: float = 0.1,
        *,
        max_drop: float = 0.5,
        min_rank: int = 1,
        keep_last_dense: bool = True,
        target_modules: str | Iterable[str] | None = None,
        exclude_modules: str | Iterable[str] | None = None,
        state_mode: str = "rotate",
        process_group=None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"argument 'model' must be an nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"argument 'optimizer' must be a torch.optim.Optimizer, got "
                f"{type(optimizer).__name__}"
            )
        self.model = _unwrap(model)
        self.optimizer = optimizer
        self.delay = _count("delay", delay, minimum=0)
        self.frequency = _count("frequency", frequency, minimum=1)
        self.cutoff = _fraction("cutoff", cutoff, upper_open=True)
        self.max_drop = _fraction("max_drop", max_drop, upper_open=False)
        self.min_rank = _count("min_rank", min_rank, minimum=1)
        if not isinstance(keep_last_dense, bool):
            raise TypeError(f"argument 'keep_last_dense' must be a bool, got {keep_last_dense!r}")
        if not keep_last_dense and target_modules is not None:
            raise ValueError(
                "argument 'keep_last_dense': False only applies with target_modules=None (a "
                "given target_modules already says whether the output layer is converted)"
            )
        self.keep_last_dense = keep_last_dense
        if state_mode not in STATE_MODES:
            raise ValueError(
                f"argument 'state_mode' must be one of {STATE_MODES}, got {state_mode!r}"
            )
        self.state_mode = state_mode
        self.process_group = process_group
        self.steps = 0
        self.converted = False
        self.history: list[dict] = []
        self._to_convert, self._to_adopt = _selection(
            self.model, target_modules, exclude_modules, keep_last_dense
        )
        if not self._to_convert and not self._to_adopt:
            raise ValueError(
                f"OIALR finds no module to train in {type(self.model).__name__}: "
                f"target_modules={target_modules!r}, exclude_modules={exclude_modules!r}"
            )
        self._managed: dict[str, nn.Module] = {}
        if self.delay == 0:
            self._convert()

    # ---------------------------------------------------------------- the training-loop hook

    def step(self) -> bool:
        """Count one optimizer step; convert or update when due. True if parameter shapes changed.

        A True return means the model's parameters were replaced or resized: rebuild a
        DistributedDataParallel wrapper (the optimizer is already updated).
        """
        steps = self.steps + 1
        if not self.converted:
            if steps < self.delay:
                self.steps = steps
                return False
            self.steps = steps  # recorded in the history by the conversion
            try:
                self._convert()
            except BaseException:
                self.steps -= 1
                raise
            return True
        if (steps - self.delay) % self.frequency:
            self.steps = steps
            return False
        changed = self._update(steps)
        self.steps = steps
        return changed

    def ranks(self) -> dict[str, int]:
        """{name: rank} of every layer OIALR trains ({} before conversion)."""
        return {name: module.rank for name, module in self._managed.items()}

    # ---------------------------------------------------------------- conversion

    def _convert(self, carry_state: bool = True) -> None:
        """Convert the selected modules and adopt the low-rank ones; all or nothing (model,
        optimizer and this object's counters and history are restored on any error)."""
        with all_or_nothing(self.model, self.optimizer, objects=[self]):
            self._convert_unguarded(carry_state)

    def _convert_unguarded(self, carry_state: bool) -> None:
        modules = dict(self.model.named_modules())
        missing = [name for name in self._to_convert + self._to_adopt if name not in modules]
        if missing:
            raise RuntimeError(
                f"OIALR: the model no longer has the modules {missing} it selected at construction"
            )
        dense = {name: modules[name] for name in self._to_convert}
        if carry_state:
            self._check_states(_dense_weights(dense.values()))
        before = oialr_history.counts(self.model)
        if dense:
            exact = "|".join(re.escape(name) for name in dense)
            # Full rank keeps the function exactly; it is larger than dense until truncations.
            convert(self.model, target_modules=f"(?:{exact})", core="full", allow_larger=True)
        transfers = []
        for name, old in dense.items():
            transfers += _share_and_map(old, self.model.get_submodule(name))
        for old_param, new_params in transfers:
            self._carry(old_param, new_params, carry_state)
        managed = {}
        for name in self._to_convert + self._to_adopt:
            module = self.model.get_submodule(name)
            for child_name, child in _factored_layers(name, module):
                child.U.requires_grad_(False)
                child.V.requires_grad_(False)
                optimizer_state.drop(self.optimizer, (child.U, child.V))
                managed[child_name] = child
        self._managed = managed
        self.converted = True
        self._broadcast_layers()
        self.history.append(oialr_history.entry(self.model, self.steps, self.ranks(), before))

    # ---------------------------------------------------------------- basis update and pruning

    @torch.no_grad()
    def _update(self, steps: int) -> bool:
        """Rotate every layer into the SVD of its S and truncate; True if any rank dropped.

        Everything that can fail is checked before the first layer changes.
        """
        plans = {}
        for name, layer in self._managed.items():
            if not torch.isfinite(layer.S).all():
                raise RuntimeError(
                    f"OIALR.step: the core S of {name!r} holds NaN or inf (the training "
                    "diverged); nothing was changed"
                )
            with torch.autocast(layer.S.device.type, enabled=False):
                # float32 at least (also under bf16 autocast or for bf16 cores)
                precision = torch.promote_types(layer.S.dtype, torch.float32)
                P, sigma, Qh = linalg.svd(layer.S.detach().to(precision))
            plans[name] = (P, sigma, Qh.mT, self._kept(sigma))
        kept = self._agree_on([plan[3] for plan in plans.values()])
        self._check_states([layer.S for layer in self._managed.values()])
        changed = False
        # Same-rank layers are written in place: their values are kept to restore too.
        layers = list(self._managed.values())
        with all_or_nothing(self.model, self.optimizer, values=layers, objects=[self]):
            for (name, layer), k in zip(self._managed.items(), kept):
                P, sigma, Q, _ = plans[name]
                changed |= k < sigma.numel()
                self._rotate(layer, P[:, :k], sigma[:k], Q[:, :k])
            self._broadcast_layers()
            self.history.append(oialr_history.entry(self.model, steps, self.ranks()))
        return changed

    def _kept(self, sigma: torch.Tensor) -> int:
        rank = sigma.numel()
        # A zero core (σ_max = 0) holds no energy: as `lowrank_ext.nn.energy_rank`, one
        # component counts, and max_drop and min_rank bound the cut as always.
        above = int((sigma >= self.cutoff * sigma[0]).sum()) if rank and sigma[0] > 0 else 1
        floor = max(rank - int(self.max_drop * rank), min(self.min_rank, rank))
        return max(above, floor)

    def _rotate(self, layer, P: torch.Tensor, sigma: torch.Tensor, Q: torch.Tensor) -> None:
        """U ← U P, V ← V Q, S ← diag(σ) (products in float64), and S's optimizer state.

        Same rank: written in place, so the parameters (and a DDP wrapper) stay. Lower rank:
        new Parameters, put where the old ones were in the optimizer; a grad accumulator that
        autograd cached for the old shapes would reject the new ones.
        """
        old = layer.S
        factors = {
            "U": _times(layer.U, P),
            "S": torch.diag(sigma.double()).to(old.dtype),
            "V": _times(layer.V, Q),
        }
        if factors["S"].shape == old.shape:
            for name, value in factors.items():
                getattr(layer, name).copy_(value)
            old.grad = None
            new = old
            state = self.optimizer.state.pop(old, None)
        else:
            for name, value in factors.items():
                trainable = getattr(layer, name).requires_grad
                setattr(layer, name, nn.Parameter(value, requires_grad=trainable))
            new = layer.S
            state = optimizer_state.replace(self.optimizer, old, [new])
        if not state or self.state_mode == "reset":
            return
        k = sigma.numel()
        for key, value in state.items():
            if not optimizer_state.per_element(value, old):
                continue
            if self.state_mode == "slice":
                state[key] = value[:k, :k].clone()
            else:
                state[key] = optimizer_state.change_basis(key, value, P, Q)
        self.optimizer.state[new] = state

    # ---------------------------------------------------------------- optimizer state

    def _check_states(self, params) -> None:
        if self.state_mode == "rotate":
            optimizer_state.check_transformable(self.optimizer, params)

    def _carry(self, old, successors: list, carry_state: bool) -> None:
        """Put `successors` [(param, how)] where `old` was in the optimizer, with its state:
        how = ("project", U, V) for a core replacing a dense weight, ("project_transposed", U, V)
        for one replacing a weight stored (in, out) (a Conv1D's), ("chunk", i, n) for the i-th
        of n pieces of a packed bias."""
        state = optimizer_state.replace(self.optimizer, old, [new for new, _ in successors])
        if not state or not carry_state:
            return
        for new, how in successors:
            if how[0] != "chunk" and self.state_mode != "rotate":
                continue  # slice and reset: the core starts fresh
            carried = {}
            for key, value in state.items():
                if not optimizer_state.per_element(value, old):
                    carried[key] = value.clone() if torch.is_tensor(value) else value
                elif how[0] == "chunk":
                    carried[key] = value.chunk(how[2])[how[1]].clone()
                else:
                    if how[0] == "project_transposed":
                        value = value.mT  # the moments of W stored (in, out): those of Wᵀ
                    carried[key] = optimizer_state.change_basis(key, value, how[1], how[2])
            self.optimizer.state[new] = carried

    # ---------------------------------------------------------------- distributed agreement

    def _distributed(self) -> bool:
        return (
            dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size(self.process_group) > 1
        )

    def _agree_on(self, kept: list[int]) -> list[int]:
        """Process 0's truncation ranks, everywhere."""
        if not self._distributed() or not kept:
            return kept
        device = next(iter(self._managed.values())).S.device
        counts = torch.tensor(kept, dtype=torch.int64, device=device)
        dist.broadcast(counts, _source(self.process_group), group=self.process_group)
        return counts.tolist()

    def _broadcast_layers(self) -> None:
        """Process 0's factors and the state of their cores, everywhere (SVDs may differ in the
        last bit between processes)."""
        if not self._distributed():
            return
        source = _source(self.process_group)
        for layer in self._managed.values():
            tensors = [layer.U, layer.S, layer.V]
            state = self.optimizer.state.get(layer.S, {})
            tensors += [v for v in state.values() if torch.is_tensor(v) and v.dim() > 0]
            for tensor in tensors:
                dist.broadcast(tensor.data, source, group=self.process_group)

    # ---------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict:
        """Counters, ranks, settings and history; plain Python objects (safe to torch.save)."""
        return {
            "version": STATE_VERSION,
            "steps": self.steps,
            "converted": self.converted,
            "ranks": self.ranks(),
            "config": self._config(),
            "history": [oialr_history.copy_entry(entry) for entry in self.history],
        }

    def load_state_dict(self, state: dict) -> None:
        """Take a saved state: convert the model and resize its layers to the saved ranks.

        Call it before model.load_state_dict and optimizer.load_state_dict. Raises ValueError
        when the checkpoint is malformed, was made with other settings, or names layers this
        model does not have. On any error, also one in its last step, the model, the optimizer
        and this OIALR are left as they were.
        """
        steps, converted, ranks, history = check_state(state, self.delay, self._config())
        if self.converted and not converted:
            raise ValueError(
                "OIALR.load_state_dict: the checkpoint is from dense training (before "
                "conversion) but this OIALR has converted the model already; load it into a "
                "freshly built dense model"
            )
        if converted:
            check_saved_ranks(ranks, self._layer_limits())
        with all_or_nothing(self.model, self.optimizer, objects=[self]):
            if converted:
                if not self.converted:
                    self._convert(carry_state=False)
                for name, rank in ranks.items():
                    layer = self._managed[name]
                    if layer.rank != rank:
                        self._resize(layer, rank)
            self.steps = steps
            self.history = history

    def _config(self) -> dict:
        return {
            "delay": self.delay,
            "frequency": self.frequency,
            "cutoff": self.cutoff,
            "max_drop": self.max_drop,
            "min_rank": self.min_rank,
            "state_mode": self.state_mode,
            "to_convert": list(self._to_convert),
            "to_adopt": list(self._to_adopt),
        }

    def _layer_limits(self) -> dict[str, int]:
        """{name: full rank} of the layers OIALR trains, or will train once it converts."""
        if self.converted:
            return {n: min(m.in_features, m.out_features) for n, m in self._managed.items()}
        limits = {}
        for name in self._to_convert:
            for suffix, weight in _dense_factorizations(self.model.get_submodule(name)).items():
                limits[name + suffix] = min(weight.shape[0], weight[0].numel())
        for name in self._to_adopt:
            for child_name, child in _factored_layers(name, self.model.get_submodule(name)):
                limits[child_name] = min(child.in_features, child.out_features)
        return limits

    def _resize(self, layer, rank: int) -> None:
        """Give U, S, V the saved rank's shapes (values come from the model's state_dict)."""
        old = layer.S
        for name, shape in (
            ("U", (layer.out_features, rank)),
            ("S", (rank, rank)),
            ("V", (layer.in_features, rank)),
        ):
            param = getattr(layer, name)
            setattr(layer, name, nn.Parameter(param.new_zeros(shape), param.requires_grad))
        optimizer_state.replace(self.optimizer, old, [layer.S])


# -------------------------------------------------------------------- small helpers


def _times(factor: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    return (factor.detach().double() @ rotation.double()).to(factor.dtype)


def _source(group) -> int:
    return 0 if group is None else dist.get_global_rank(group, 0)


def _count(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"argument '{name}' must be an int >= {minimum}, got {value!r}")
    return value


def _fraction(name: str, value, upper_open: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"argument '{name}' must be a number, got {value!r}")
    if not (0.0 <= value < 1.0 if upper_open else 0.0 <= value <= 1.0):
        raise ValueError(
            f"argument '{name}' must be in [0, 1{')' if upper_open else ']'}, got {value!r}"
        )
    return float(value)
