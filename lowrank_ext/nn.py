"""LowRankLinear: a drop-in for nn.Linear whose weight lives only as W = U S Vᵀ."""

from __future__ import annotations

import math

import torch
from torch import nn

from . import ops, reference

_CORES = ("diag", "full")


def _check_rank(rank, in_features: int, out_features: int) -> int:
    limit = min(in_features, out_features)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= limit:
        raise ValueError(
            "argument 'rank' must be an int in [1, min(in_features, out_features)] = "
            f"[1, {limit}], got {rank!r}"
        )
    return rank


def _check_features(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"argument '{name}' must be a positive int, got {value!r}")
    return value


def energy_rank(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest k whose k largest singular values hold `energy` of Σσ² (energy in (0, 1])."""
    if not isinstance(energy, (int, float)) or not 0.0 < energy <= 1.0:
        raise ValueError(f"argument 'energy' must be a number in (0, 1], got {energy!r}")
    power = singular_values.double() ** 2
    fraction = torch.cumsum(power, 0) / power.sum()
    # The tolerance keeps energy=1.0 from landing past the end through rounding.
    return int(torch.searchsorted(fraction, torch.tensor(energy - 1e-12, dtype=fraction.dtype))) + 1


class LowRankLinear(nn.Module):
    """y = x Wᵀ + b with W = U S Vᵀ of rank r, computed as ((x V) Sᵀ) Uᵀ + b by the fused op.

    Args:
        in_features, out_features: as nn.Linear.
        rank: r, in [1, min(in_features, out_features)].
        bias: learn an additive bias, as nn.Linear.
        core: "diag" (S is a vector of r scales) or "full" (S is a trainable r×r matrix).

    Parameters U (out, r) and V (in, r) start orthonormal and S at √(out / (3r)), so that
    ‖W‖_F² = out/3 as for nn.Linear's default init and outputs have the same variance; the bias
    is initialized as nn.Linear's. The dense W is never formed in forward or backward; `.weight`
    builds it on demand for tools that read it.

    The state_dict records the rank: loading a checkpoint saved at another rank resizes U, S and
    V to the saved rank (re-create optimizers afterwards: they hold the old parameters).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        *,
        core: str = "diag",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.in_features = _check_features("in_features", in_features)
        self.out_features = _check_features("out_features", out_features)
        rank = _check_rank(rank, in_features, out_features)
        if core not in _CORES:
            raise ValueError(f"argument 'core' must be one of {_CORES}, got {core!r}")
        self.core = core
        factory = {"device": device, "dtype": dtype}
        self.U = nn.Parameter(torch.empty(out_features, rank, **factory))
        self.S = nn.Parameter(torch.empty(self._core_shape(rank), **factory))
        self.V = nn.Parameter(torch.empty(in_features, rank, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.reset_parameters()

    def _core_shape(self, rank: int) -> tuple[int, ...]:
        return (rank,) if self.core == "diag" else (rank, rank)

    @property
    def rank(self) -> int:
        return self.U.shape[1]

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for factor in (self.U, self.V):
                q, _ = torch.linalg.qr(torch.randn(factor.shape, dtype=torch.float64))
                factor.copy_(q)
            scale = math.sqrt(self.out_features / (3 * self.rank))
            if self.core == "diag":
                self.S.fill_(scale)
            else:
                self.S.copy_(scale * torch.eye(self.rank))
            if self.bias is not None:
                bound = 1 / math.sqrt(self.in_features)
                nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self.U, self.S, self.V, self.bias)

    @property
    def weight(self) -> torch.Tensor:
        """The dense (out, in) W = U S Vᵀ, built on demand; forward never uses it."""
        return reference.dense_weight(self.U, self.S, self.V)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        rank: int | None = None,
        energy: float | None = None,
        *,
        core: str = "diag",
    ) -> LowRankLinear:
        """Truncated SVD of linear.weight (in float64): exact at full rank to float tolerance.

        Give `rank`, or `energy` to keep the smallest rank holding that fraction of Σσ², or
        neither for full rank min(in, out).
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"argument 'linear' must be an nn.Linear, got {type(linear).__name__}")
        if rank is not None and energy is not None:
            raise ValueError("give at most one of the arguments 'rank' and 'energy'")
        weight = linear.weight.detach()
        U, sigma, Vh = torch.linalg.svd(weight.double(), full_matrices=False)
        if energy is not None:
            rank = energy_rank(sigma, energy)
        elif rank is None:
            rank = sigma.numel()
        module = cls(
            linear.in_features,
            linear.out_features,
            rank,
            bias=linear.bias is not None,
            core=core,
            device=weight.device,
            dtype=weight.dtype,
        )
        with torch.no_grad():
            module.U.copy_(U[:, :rank])
            module.V.copy_(Vh[:rank].T)
            module.S.copy_(sigma[:rank] if core == "diag" else torch.diag(sigma[:rank]))
            if linear.bias is not None:
                module.bias.copy_(linear.bias)
        return module

    def to_linear(self) -> nn.Linear:
        """A dense nn.Linear with the same function."""
        linear = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=self.U.device,
            dtype=self.U.dtype,
        )
        with torch.no_grad():
            linear.weight.copy_(self.weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, core={self.core!r}, bias={self.bias is not None}"
        )

    def get_extra_state(self) -> dict:
        return {"rank": self.rank, "core": self.core}

    def set_extra_state(self, state) -> None:
        pass  # read (and validated) in _load_from_state_dict, before the parameters are copied

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        problem = self._adopt_saved_rank(state_dict, prefix)
        if problem:
            error_msgs.append(problem)
            return
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _adopt_saved_rank(self, state_dict, prefix) -> str | None:
        """Resize U, S, V to the checkpoint's rank; return a message if the checkpoint can't fit."""
        saved = {name: state_dict.get(prefix + name) for name in ("U", "S", "V")}
        if any(t is None for t in saved.values()):
            return None  # missing keys are reported by the default loader
        for name, tensor in saved.items():
            if not torch.is_tensor(tensor):
                return f"{prefix}{name}: checkpoint holds a {type(tensor).__name__}, not a tensor"
        extra = state_dict.get(prefix + "_extra_state", {})
        if not isinstance(extra, dict):
            return f"{prefix}_extra_state: expected a dict with 'rank' and 'core', got {extra!r}"
        if extra.get("core", self.core) != self.core:
            return (
                f"{prefix}S: checkpoint has core={extra['core']!r} but the module has "
                f"core={self.core!r}"
            )
        rank = saved["U"].shape[1] if saved["U"].dim() == 2 else -1
        if extra.get("rank", rank) != rank:
            return (
                f"{prefix}_extra_state: recorded rank {extra!r} disagrees with U of shape "
                f"{tuple(saved['U'].shape)}"
            )
        expected = {
            "U": (self.out_features, rank),
            "S": self._core_shape(rank),
            "V": (self.in_features, rank),
        }
        for name, tensor in saved.items():
            if tuple(tensor.shape) != expected[name] or not 1 <= rank <= min(
                self.in_features, self.out_features
            ):
                return (
                    f"size mismatch for {prefix}{name}: copying a param with shape "
                    f"{tuple(tensor.shape)} from checkpoint, the shape in current model is "
                    f"{tuple(getattr(self, name).shape)}; a LowRankLinear({self.in_features}, "
                    f"{self.out_features}) accepts {name} of shape {expected[name]} at any rank"
                )
        if rank != self.rank:
            for name in ("U", "S", "V"):
                old = getattr(self, name)
                setattr(self, name, nn.Parameter(old.new_empty(expected[name]), old.requires_grad))
        return None
