"""FactoredModule: the base of every module whose weight lives only as W = U S Vᵀ.

It holds what LowRankLinear and LowRankConv2d share: the factors U (out, r), S (r,) or (r, r),
V (in, r) and the bias; the rank bookkeeping and the initialization; `factors()` as forward uses
them; rank growth and freezing (successive refinement); the dense view `.weight`; `extra_repr`;
and loading a state dict, whose layout (rank, core, frozen part) is read from its tensors'
shapes (nn/checkpoint.py) so that a checkpoint saved at one rank loads into a module built at
another. A subclass adds only its forward, the shape of its dense weight
(`_weight_shape`), its `extra_repr` fields and its from_*/to_* conversions; in_features and
out_features are the sizes of the matrix W (for a convolution, in·kh·kw and out). The dense
face of the module, the read-only view `.weight` and `set_weight`, is its base `DenseWeight`
(dense_weight.py); choosing a rank by SVD and the break-even rank are in truncation.py.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import linalg, ops
from . import checkpoint
from .checkpoint import FACTORS as _FACTORS
from .checkpoint import FROZEN as _FROZEN  # training.growth imports it from here
from .dense_weight import DenseWeight
from .transaction import all_or_nothing
from .truncation import _CORES, _check_rank


def _check_features(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"argument '{name}' must be a positive int, got {value!r}")
    return value


def _check_dtype(dtype) -> None:
    """The factors are trained and run by the float kernels: a real floating dtype (or None)."""
    if dtype is None:
        return
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(
            "argument 'dtype' must be a real floating-point torch.dtype (float32, float64, "
            f"float16, bfloat16) or None, got {dtype!r}"
        )


def _random_orthonormal(
    shape: tuple[int, int],
    frozen: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Random (n, k) float64 matrix with orthonormal columns, orthogonal to `frozen`'s columns."""
    X = torch.randn(shape, dtype=torch.float64, generator=generator)
    if frozen is not None and shape[1]:
        X = ops.project_out(frozen.detach().double(), X)
    # QR's Q is column-major; a parameter made from it would be a non-contiguous tensor, which
    # safetensors refuses to save.
    return torch.linalg.qr(X)[0].contiguous()


class FactoredModule(DenseWeight):
    """A module whose weight is W = U S Vᵀ (out_features × in_features) of rank r.

    Args:
        in_features, out_features: the sizes of the matrix W (as nn.Linear's).
        rank: r, in [1, min(in_features, out_features)].
        bias: learn an additive bias of out_features entries.
        core: "diag" (S is a vector of r scales) or "full" (S is a trainable r×r matrix).
        device, dtype: of the factors; dtype a real floating torch.dtype (TypeError otherwise).

    Parameters U (out, r) and V (in, r) start orthonormal and S at √(out / (3r)), so that
    ‖W‖_F² = out/3 as for nn.Linear's default init; the bias is initialized as nn.Linear's. The
    dense W is never formed in forward or backward; `.weight` builds it on demand for tools that
    read it, as a read-only view (`set_weight` sets it; see `DenseWeight`).

    The state_dict holds tensors only (safetensors can save it), and their shapes tell the rank,
    the core and the frozen part: loading a checkpoint saved at another rank or layout resizes U,
    S, V and the frozen buffers to it (re-create optimizers afterwards: they hold the old
    parameters). A checkpoint that cannot fit is refused with an error naming the key and the
    module, and leaves the module as it was.

    Successive refinement (`grow`, `freeze`) splits the components in two. The frozen ones live
    in the buffers U_frozen (out, f), V_frozen (in, f) with orthonormal columns, and S_frozen (f,)
    when their scales are frozen too. The active ones are the parameters U (out, a), V (in, a),
    whose columns are used projected onto the orthogonal complement of the frozen ones and
    normalized (`lowrank_ext.ops.project_out`), so no optimizer step can leave that complement;
    S holds the trainable scales. A layer never grown has no frozen part and no projection cost.
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
        in_features = _check_features("in_features", in_features)
        out_features = _check_features("out_features", out_features)
        rank = _check_rank(rank, in_features, out_features)
        if core not in _CORES:
            raise ValueError(f"argument 'core' must be one of {_CORES}, got {core!r}")
        _check_dtype(dtype)
        self.in_features = in_features
        self.out_features = out_features
        self.core = core
        factory = {"device": device, "dtype": dtype}
        self.U = nn.Parameter(torch.empty(out_features, rank, **factory))
        self.S = nn.Parameter(torch.empty(self._core_shape(rank), **factory))
        self.V = nn.Parameter(torch.empty(in_features, rank, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        # The frozen part of successive refinement: absent (None) until the first grow/freeze.
        for name in _FROZEN:
            self.register_buffer(name, None)
        self.reset_parameters()

    def _core_shape(self, rank: int) -> tuple[int, ...]:
        return (rank,) if self.core == "diag" else (rank, rank)

    @property
    def frozen_rank(self) -> int:
        """f: the number of frozen components (0 for a layer never grown)."""
        return 0 if self.U_frozen is None else self.U_frozen.shape[1]

    @property
    def active_rank(self) -> int:
        """a: the number of components whose u, v are trained."""
        return 0 if self.U is None else self.U.shape[1]

    @property
    def rank(self) -> int:
        """r = f + a, the rank of W."""
        return self.frozen_rank + self.active_rank

    def reset_parameters(self) -> None:
        """Re-draw the trainable factors; frozen components (if any) are kept.

        U and V get random orthonormal columns (orthogonal to the frozen ones), every trainable
        scale √(out / (3r)) so that a fresh layer has ‖W‖_F² = out/3 like nn.Linear, and the bias
        nn.Linear's init.
        """
        with torch.no_grad():
            for factor, frozen in ((self.U, self.U_frozen), (self.V, self.V_frozen)):
                if factor is not None:
                    factor.copy_(_random_orthonormal(factor.shape, frozen))
            if self.S is not None:
                scale = math.sqrt(self.out_features / (3 * self.rank))
                if self.core == "diag":
                    self.S.fill_(scale)
                else:
                    self.S.copy_(scale * torch.eye(self.rank))
            if self.bias is not None:
                bound = 1 / math.sqrt(self.in_features)
                nn.init.uniform_(self.bias, -bound, bound)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The effective (U, S, V) of all r components, frozen ones first, as forward uses them.

        For a layer never grown these are the parameters themselves. Otherwise each active column
        is projected out of the span of the frozen ones and normalized; with a > 1 the active
        columns are not orthogonalized against each other (freezing them does that).
        """
        return checkpoint.effective_factors(
            self.U, self.S, self.V, self.U_frozen, self.V_frozen, self.S_frozen
        )

    def _weight_shape(self) -> tuple[int, ...]:
        """The shape of the dense module's weight (a subclass's; W reshaped to it)."""
        raise NotImplementedError

    def grow(
        self,
        k: int = 1,
        *,
        freeze_scales: bool = False,
        scale_init: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> None:
        """Freeze every current component and add k new ones in their orthogonal complement.

        The active components are first rotated to the SVD of their own block (W unchanged), so
        U_frozen and V_frozen stay orthonormal and the frozen scales are its singular values. The
        k new u, v start as random orthonormal columns orthogonal to all frozen ones, with scales
        `scale_init`: the default 0 keeps W, and so the loss, unchanged at the moment of growth;
        a nonzero value perturbs it (the loss spike seen in the poster). The new u, v get their
        first gradient once their scale has moved off 0, one optimizer step later.

        Args:
            k: components to add, rank + k ≤ min(in_features, out_features).
            freeze_scales: also freeze the scales of all frozen components (only the k new
                scales train); False (default) keeps every scale trainable.
            scale_init: the initial scale of the new components.
            generator: random source for the new directions.

        Replaces the parameters U, V and S with new tensors (the bias is kept): tell optimizers,
        e.g. with `lowrank_ext.training.successive.update_optimizer`. Only core="diag" layers
        grow: one singular pair (u, σ, v) is learned at a time. Raises RuntimeError, naming the
        layer and the tensor, for factors on the meta device (no values yet) or holding NaN/inf
        (a diverged training: their SVD would fail or spread NaN). On error the layer is left
        unchanged.
        """
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"argument 'k' must be a positive int, got {k!r}")
        limit = min(self.in_features, self.out_features)
        if self.rank + k > limit:
            raise ValueError(
                f"argument 'k': growing rank {self.rank} by {k} would pass "
                f"min(in_features, out_features) = {limit}"
            )
        if isinstance(scale_init, bool) or not isinstance(scale_init, (int, float)):
            raise TypeError(f"argument 'scale_init' must be a real number, got {scale_init!r}")
        if not math.isfinite(scale_init):
            raise ValueError(f"argument 'scale_init' must be finite, got {scale_init!r}")
        self._refine(k, freeze_scales, scale_init, generator)

    def freeze(self, *, freeze_scales: bool = False) -> None:
        """Freeze every current component without adding new ones (for a layer at full rank).

        As `grow`, but afterwards nothing but the scales (unless `freeze_scales`) and the bias
        trains: the layer's u, v parameter groups drop out.
        """
        self._refine(0, freeze_scales, 0.0, None)

    def _refine_problem(self) -> str | None:
        """Why this layer cannot grow or freeze now, or None (grow_model asks every layer first)."""
        where = f"{type(self).__name__}({self._repr_shape()})"
        if self.core != "diag":
            return (
                "grow/freeze need core='diag' (one scale per singular pair); this layer has "
                f"core={self.core!r}"
            )
        for name in (*_FACTORS, *_FROZEN):
            tensor = getattr(self, name)
            if tensor is None:
                continue
            if tensor.is_meta:
                return (
                    f"{name} of this {where} is on the meta device and holds no values: load a "
                    "state dict (after to_empty) before growing it"
                )
            if not bool(torch.isfinite(tensor).all()):
                return (
                    f"{name} of this {where} holds NaN or inf (the training diverged?); its SVD "
                    "cannot rotate the components it would freeze"
                )
        return None

    def _refine(self, k, freeze_scales, scale_init, generator) -> None:
        problem = self._refine_problem()
        if problem is not None:
            raise RuntimeError(f"{'grow' if k else 'freeze'}: {problem}")
        if not isinstance(freeze_scales, bool):
            raise TypeError(f"argument 'freeze_scales' must be a bool, got {freeze_scales!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(
                f"argument 'generator' must be a torch.Generator, got {type(generator).__name__}"
            )
        # Everything new is built first, then swapped in, so an error leaves the layer as it was.
        with torch.no_grad():
            U, S, V = self._frozen_svd()
            new_U = _random_orthonormal((self.out_features, k), U, generator)
            new_V = _random_orthonormal((self.in_features, k), V, generator)
            S = torch.cat([S, S.new_full((k,), scale_init)])
        like = self.U_frozen if self.U is None else self.U
        to = {"dtype": like.dtype, "device": like.device}
        frozen = U.shape[1]
        trainable_scales = S[frozen:] if freeze_scales else S
        new = {
            "U_frozen": U.to(**to),
            "V_frozen": V.to(**to),
            "S_frozen": S[:frozen].to(**to) if freeze_scales else None,
            "U": nn.Parameter(new_U.to(**to)) if k else None,
            "V": nn.Parameter(new_V.to(**to)) if k else None,
            "S": nn.Parameter(trainable_scales.to(**to)) if trainable_scales.numel() else None,
        }
        with all_or_nothing(self):
            for name, tensor in new.items():
                setattr(self, name, tensor)

    def _frozen_svd(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """All r components in float64 with the active block rotated to its SVD (W unchanged).

        Active block: U_a diag(s) V_aᵀ = Q_u (R_u diag(s) R_vᵀ) Q_vᵀ = (Q_u P) Σ (Q_v R)ᵀ with
        P Σ Rᵀ the SVD of the small a×a middle; Q_u, Q_v lie in the span of the active columns,
        already orthogonal to the frozen ones.
        """
        U, S, V = (t.detach().double() for t in self.factors())
        f = self.frozen_rank
        if f == self.rank:
            return U, S, V
        Q_u, R_u = torch.linalg.qr(U[:, f:])
        Q_v, R_v = torch.linalg.qr(V[:, f:])
        P, sigma, R_h = linalg.svd((R_u * S[f:]) @ R_v.T)
        return (
            torch.cat([U[:, :f], Q_u @ P], dim=1),
            torch.cat([S[:f], sigma]),
            torch.cat([V[:, :f], Q_v @ R_h.T], dim=1),
        )

    def _copy_svd(self, U: torch.Tensor, sigma: torch.Tensor, V: torch.Tensor, bias) -> None:
        """Set the factors to the leading `rank` singular triplets (from `_truncated_svd`) and
        the bias to `bias`."""
        rank = self.rank
        with torch.no_grad():
            self.U.copy_(U[:, :rank])
            self.V.copy_(V[:, :rank])
            self.S.copy_(sigma[:rank] if self.core == "diag" else torch.diag(sigma[:rank]))
            if bias is not None:
                self.bias.copy_(bias)

    def _copy_into_dense(self, dense: nn.Module, weight: torch.Tensor) -> nn.Module:
        """`dense` (the dense module a to_* method built) with `weight` and the bias copied in."""
        with torch.no_grad():
            dense.weight.copy_(weight)
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        return dense

    def _repr_shape(self) -> str:
        """The leading fields of extra_repr: the sizes (a subclass's)."""
        raise NotImplementedError

    def _repr_options(self) -> str:
        """Fields of extra_repr after the rank (", name=value" each); none by default."""
        return ""

    def extra_repr(self) -> str:
        frozen = f", frozen={self.frozen_rank}" if self.frozen_rank else ""
        return (
            f"{self._repr_shape()}, rank={self.rank}{self._repr_options()}, core={self.core!r}, "
            f"bias={self.bias is not None}{frozen}"
        )

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # The layout comes from the checkpoint's tensors (lowrank_ext/nn/checkpoint.py).
        def load() -> None:
            super(FactoredModule, self)._load_from_state_dict(
                state_dict,
                prefix,
                local_metadata,
                strict,
                missing_keys,
                unexpected_keys,
                error_msgs,
            )

        checkpoint.load_factored(self, load, state_dict, prefix, unexpected_keys, error_msgs)

    def _set_layout(self, rank: int, frozen_rank: int = 0, frozen_scales: bool = False) -> None:
        """Resize to rank `rank` with `frozen_rank` frozen components (their scales frozen too
        with `frozen_scales`), as a checkpoint of that layout would; the values are unset.

        For building a module whose values a checkpoint fills next (`lowrank_ext.from_pretrained`).
        """
        rank = _check_rank(rank, self.in_features, self.out_features)
        if isinstance(frozen_rank, bool) or not isinstance(frozen_rank, int):
            raise ValueError(f"argument 'frozen_rank' must be an int, got {frozen_rank!r}")
        if not 0 <= frozen_rank <= rank:
            raise ValueError(
                f"argument 'frozen_rank' must be in [0, rank={rank}], got {frozen_rank}"
            )
        if frozen_rank and self.core != "diag":
            raise ValueError(f"only core='diag' layers have frozen components, not {self.core!r}")
        if not isinstance(frozen_scales, bool) or (frozen_scales and not frozen_rank):
            raise ValueError(
                f"argument 'frozen_scales' must be a bool, True only with frozen components; got "
                f"{frozen_scales!r} with frozen_rank={frozen_rank}"
            )
        checkpoint.take_layout(
            self, checkpoint.layout_shapes(self, rank, frozen_rank, frozen_scales)
        )
