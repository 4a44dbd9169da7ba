"""LowRankMultiheadAttention: nn.MultiheadAttention whose projections are LowRankLinear layers."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .factored import _check_features
from .linear import LowRankLinear
from .truncation import LargerThanDenseError, check_matrix

_IN_PROJECTIONS = ("q_proj", "k_proj", "v_proj")


class LowRankMultiheadAttention(nn.Module):
    """Multi-head attention with the contract of nn.MultiheadAttention and low-rank projections.

    Layout of the in-projection:
        - kdim == vdim == embed_dim (nn.MultiheadAttention's packed in_proj_weight): one
          LowRankLinear `in_proj` (embed_dim → 3·embed_dim) factorizes the packed (3E, E) matrix,
          so q, k and v share one input basis V. Self-attention (query is key is value) runs it
          as one fused op; otherwise each of q, k, v uses its third of U's rows.
        - otherwise (nn.MultiheadAttention's separate q/k/v_proj_weight): three LowRankLinear
          layers `q_proj` (E → E), `k_proj` (kdim → E), `v_proj` (vdim → E).
        `out_proj` is a LowRankLinear (E → E). Every factorization is a LowRankLinear child, so
        anything that acts on LowRankLinear layers (rank growth, OIALR, spectra, checkpoints at
        another rank) acts on these too.

    Args:
        embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim, vdim, batch_first:
            as nn.MultiheadAttention.
        rank: the rank of every projection; each must be at most min(in, out) of its projection
            (embed_dim for in_proj and out_proj).
        core: "diag" or "full", as LowRankLinear.

    Forward is nn.MultiheadAttention.forward's: (query, key, value, key_padding_mask=None,
    need_weights=True, attn_mask=None, average_attn_weights=True, is_causal=False), batched or
    unbatched inputs, bool or float masks, attention dropout in training mode. With need_weights
    it computes the softmax explicitly and returns the weights (after dropout, as PyTorch does);
    without, it calls F.scaled_dot_product_attention.

    Init: in-projections scaled to ‖W‖_F² of nn.MultiheadAttention's xavier_uniform init,
    out_proj as nn.Linear, projection biases zero and bias_k/bias_v xavier_normal, as PyTorch.
    """

    # nn.TransformerEncoderLayer/Encoder take their fused fast path, which reads dense packed
    # weights, only when this is True; False sends them through forward.
    _qkv_same_embed_dim = False

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        rank: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        *,
        core: str = "diag",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.embed_dim = _check_features("embed_dim", embed_dim)
        self.num_heads = _check_features("num_heads", num_heads)
        if embed_dim % num_heads:
            raise ValueError(
                f"argument 'embed_dim' ({embed_dim}) must be divisible by num_heads ({num_heads})"
            )
        self.head_dim = embed_dim // num_heads
        self.kdim = embed_dim if kdim is None else _check_features("kdim", kdim)
        self.vdim = embed_dim if vdim is None else _check_features("vdim", vdim)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)):
            raise TypeError(f"argument 'dropout' must be a number, got {dropout!r}")
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"argument 'dropout' must be in [0, 1], got {dropout!r}")
        self.dropout = float(dropout)
        self.batch_first = batch_first
        self.add_zero_attn = add_zero_attn
        self.packed_in_proj = self.kdim == self.vdim == embed_dim
        factory = {"core": core, "device": device, "dtype": dtype}
        if self.packed_in_proj:
            self.in_proj = self._projection(
                "in_proj", embed_dim, 3 * embed_dim, rank, bias, factory
            )
        else:
            for name, in_features in zip(_IN_PROJECTIONS, (embed_dim, self.kdim, self.vdim)):
                layer = self._projection(name, in_features, embed_dim, rank, bias, factory)
                setattr(self, name, layer)
        self.out_proj = self._projection("out_proj", embed_dim, embed_dim, rank, bias, factory)
        if add_bias_kv:
            tensor = {"device": device, "dtype": dtype}
            self.bias_k = nn.Parameter(torch.empty(1, 1, embed_dim, **tensor))
            self.bias_v = nn.Parameter(torch.empty(1, 1, embed_dim, **tensor))
        else:
            self.bias_k = self.bias_v = None
        self._reset_to_attention_init()

    @staticmethod
    def _projection(name, in_features, out_features, rank, bias, factory) -> LowRankLinear:
        try:
            return LowRankLinear(in_features, out_features, rank, bias=bias, **factory)
        except ValueError as error:
            raise ValueError(f"{name} ({in_features} → {out_features}): {error}") from None

    def _in_projections(self) -> list[LowRankLinear]:
        if self.packed_in_proj:
            return [self.in_proj]
        return [getattr(self, name) for name in _IN_PROJECTIONS]

    def _reset_to_attention_init(self) -> None:
        with torch.no_grad():
            for layer in self._in_projections():
                # LowRankLinear's init gives ‖W‖_F² = out/3; xavier_uniform gives
                # out·in·2/(in + out). (S is None for a layer whose scales are all frozen.)
                if layer.S is not None:
                    layer.S.mul_(
                        math.sqrt(6 * layer.in_features / (layer.in_features + layer.out_features))
                    )
                if layer.bias is not None:
                    layer.bias.zero_()
            if self.out_proj.bias is not None:
                self.out_proj.bias.zero_()
            if self.bias_k is not None:
                nn.init.xavier_normal_(self.bias_k)
                nn.init.xavier_normal_(self.bias_v)

    def reset_parameters(self) -> None:
        """Re-draw every projection and bias (nn.MultiheadAttention's init, see the class doc)."""
        for layer in (*self._in_projections(), self.out_proj):
            layer.reset_parameters()
        self._reset_to_attention_init()

    @property
    def ranks(self) -> dict[str, int]:
        """The rank of each projection by child name."""
        return {name: layer.rank for name, layer in self.named_children()}

    @property
    def in_proj_bias(self) -> torch.Tensor | None:
        """The packed (3E,) in-projection bias as nn.MultiheadAttention holds it (or None)."""
        biases = [layer.bias for layer in self._in_projections()]
        if biases[0] is None:
            return None
        return biases[0] if self.packed_in_proj else torch.cat(biases)

    def _check_inputs(self, query, key, value, key_padding_mask, attn_mask) -> bool:
        """Shape checks with messages naming the argument; True for batched inputs."""
        for name, tensor in (("query", query), ("key", key), ("value", value)):
            kind = ops.tensor_kind(tensor)
            if kind is not None:
                raise RuntimeError(
                    f"argument '{name}' is {kind}; a dense (strided) tensor is expected"
                )
        if query.dim() not in (2, 3):
            raise ValueError(
                f"argument 'query' must be 3-D (batched) or 2-D (unbatched), got {query.dim()}-D"
            )
        batched = query.dim() == 3
        for name, tensor, features in (
            ("query", query, self.embed_dim),
            ("key", key, self.kdim),
            ("value", value, self.vdim),
        ):
            if tensor.dim() != query.dim() or tensor.shape[-1] != features:
                raise ValueError(
                    f"argument '{name}' must be {query.dim()}-D like query with last dim "
                    f"{features}, got shape {tuple(tensor.shape)}"
                )
        seq_dim = 1 if batched and self.batch_first else 0
        batch_dim = 1 - seq_dim
        if batched and not query.shape[batch_dim] == key.shape[batch_dim] == value.shape[batch_dim]:
            raise ValueError(
                f"arguments 'query', 'key', 'value' must share the batch size (dim {batch_dim}), "
                f"got shapes {tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
            )
        if key.shape[seq_dim] != value.shape[seq_dim]:
            raise ValueError(
                f"arguments 'key' and 'value' must have the same sequence length, got shapes "
                f"{tuple(key.shape)} and {tuple(value.shape)}"
            )
        batch = query.shape[batch_dim] if batched else 1
        target, source = query.shape[seq_dim], key.shape[seq_dim]
        if key_padding_mask is not None:
            expected = (batch, source) if batched else (source,)
            if tuple(key_padding_mask.shape) != expected:
                raise ValueError(
                    f"argument 'key_padding_mask' must have shape {expected}, got "
                    f"{tuple(key_padding_mask.shape)}"
                )
        if attn_mask is not None:
            allowed = [(target, source), (batch * self.num_heads, target, source)]
            if tuple(attn_mask.shape) not in allowed:
                raise ValueError(
                    f"argument 'attn_mask' must have shape {allowed[0]} or {allowed[1]}, got "
                    f"{tuple(attn_mask.shape)}"
                )
        for name, mask in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
            if mask is not None and mask.dtype != torch.bool and not mask.is_floating_point():
                raise TypeError(
                    f"argument '{name}' must be a bool or floating tensor, got {mask.dtype}"
                )
        return batched

    def _project(self, query, key, value, self_attention: bool):
        """q, k, v of shape (N, L, E), (N, S, E), (N, S, E) from batch-first inputs."""
        if not self.packed_in_proj:
            return self.q_proj(query), self.k_proj(key), self.v_proj(value)
        if self_attention:
            return self.in_proj(query).chunk(3, dim=-1)
        U, S, V = self.in_proj.factors()
        bias = self.in_proj.bias
        biases = (None, None, None) if bias is None else bias.chunk(3)
        return tuple(
            ops.linear(x, U_rows, S, V, b)
            for x, U_rows, b in zip((query, key, value), U.chunk(3), biases)
        )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batched = self._check_inputs(query, key, value, key_padding_mask, attn_mask)
        if is_causal and attn_mask is None:
            raise ValueError(
                "argument 'is_causal' is a hint that attn_mask is causal and needs the attn_mask"
            )
        self_attention = query is key and key is value
        if not batched:
            query, key, value = (t.unsqueeze(0) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        # As PyTorch: a causal hint with no padding mask and no weights to return lets SDPA apply
        # the causal mask itself.
        sdpa_causal = is_causal and key_padding_mask is None and not need_weights
        if sdpa_causal:
            attn_mask = None

        q, k, v = self._project(query, key, value, self_attention)
        batch, target = q.shape[:2]
        masks = [_additive_mask(m, q.dtype) for m in (attn_mask, key_padding_mask)]
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(batch, 1, -1)], dim=1)
            v = torch.cat([v, self.bias_v.expand(batch, 1, -1)], dim=1)
            masks = [_attend_to_one_more(m) for m in masks]
        q, k, v = (
            t.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2) for t in (q, k, v)
        )
        if self.add_zero_attn:
            zeros = k.new_zeros(batch, self.num_heads, 1, self.head_dim)
            k, v = torch.cat([k, zeros], dim=2), torch.cat([v, zeros], dim=2)
            masks = [_attend_to_one_more(m) for m in masks]
        mask = self._merge_masks(*masks, batch)
        dropout = self.dropout if self.training else 0.0

        if need_weights:
            scores = (q * self.head_dim**-0.5) @ k.transpose(-2, -1)
            weights = torch.softmax(scores if mask is None else scores + mask, dim=-1)
            if dropout > 0.0:
                weights = F.dropout(weights, dropout)
            heads = weights @ v
        else:
            heads = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=sdpa_causal
            )
            weights = None
        output = self.out_proj(heads.transpose(1, 2).reshape(batch, target, self.embed_dim))

        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        if not batched:
            return output.squeeze(0), None if weights is None else weights.squeeze(0)
        if not self.batch_first:
            output = output.transpose(0, 1)
        return output, weights

    def _merge_masks(self, attn_mask, key_padding_mask, batch: int) -> torch.Tensor | None:
        """One additive mask broadcasting to (N, heads, L, S), or None."""
        if attn_mask is not None and attn_mask.dim() == 3:
            attn_mask = attn_mask.unflatten(0, (batch, self.num_heads))
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask[:, None, None, :]
        if attn_mask is None:
            return key_padding_mask
        return attn_mask if key_padding_mask is None else attn_mask + key_padding_mask

    @classmethod
    def from_multihead_attention(
        cls,
        attention: nn.MultiheadAttention,
        rank: int | None = None,
        energy: float | None = None,
        *,
        core: str = "diag",
        allow_larger: bool = False,
    ) -> LowRankMultiheadAttention:
        """Truncated SVD (float64) of each projection of `attention`; exact at full rank.

        `rank` (the same for every projection), or `energy` (each projection keeps the smallest
        rank holding that fraction of its Σσ²), or neither for full rank (an exact conversion,
        which needs allow_larger).

        Every projection must be no larger than its dense matrix: a projection whose rank is
        above its break-even rank (`LowRankLinear.from_linear`; E·E/(2E + 1) for out_proj,
        3E·E/(4E + 1) for a packed in_proj, with core="diag") raises `LargerThanDenseError`
        (a ValueError naming the projection, its rank and break-even rank) unless
        `allow_larger=True`. A projection weight that is on the meta device, not real floating
        point or holds NaN/inf is refused (ValueError/TypeError naming it, e.g.
        "in_proj_weight of argument 'attention'") before any SVD.
        """
        if not isinstance(attention, nn.MultiheadAttention):
            raise TypeError(
                "argument 'attention' must be an nn.MultiheadAttention, got "
                f"{type(attention).__name__}"
            )
        if rank is not None and energy is not None:
            raise ValueError("give at most one of the arguments 'rank' and 'energy'")
        E = attention.embed_dim
        if attention._qkv_same_embed_dim:
            weights = {"in_proj": attention.in_proj_weight}
            biases = {"in_proj": attention.in_proj_bias}
        else:
            weights = {
                "q_proj": attention.q_proj_weight,
                "k_proj": attention.k_proj_weight,
                "v_proj": attention.v_proj_weight,
            }
            split = (
                (None,) * 3 if attention.in_proj_bias is None else attention.in_proj_bias.chunk(3)
            )
            biases = dict(zip(_IN_PROJECTIONS, split))
        weights["out_proj"] = attention.out_proj.weight
        biases["out_proj"] = attention.out_proj.bias
        for name, weight in weights.items():
            # Named here: from_linear would name its own argument, which the caller never saw.
            attribute = "out_proj.weight" if name == "out_proj" else f"{name}_weight"
            check_matrix(weight, f"{attribute} of argument 'attention'")
        projections = {}
        for name, weight in weights.items():
            try:
                projections[name] = LowRankLinear.from_linear(
                    _linear_over(weight, biases[name]),
                    rank,
                    energy,
                    core=core,
                    allow_larger=allow_larger,
                )
            except LargerThanDenseError as error:
                prefix = f"{name} ({weight.shape[1]} → {weight.shape[0]}): "
                raise error.within(name, prefix) from None
            except ValueError as error:
                raise ValueError(
                    f"{name} ({weight.shape[1]} → {weight.shape[0]}): {error}"
                ) from None
        like = attention.out_proj.weight
        module = cls(
            E,
            attention.num_heads,
            1,
            attention.dropout,
            bias=attention.in_proj_bias is not None,
            add_bias_kv=attention.bias_k is not None,
            add_zero_attn=attention.add_zero_attn,
            kdim=attention.kdim,
            vdim=attention.vdim,
            batch_first=attention.batch_first,
            core=core,
            device=like.device,
            dtype=like.dtype,
        )
        for name, layer in projections.items():
            setattr(module, name, layer)
        if attention.bias_k is not None:
            with torch.no_grad():
                module.bias_k.copy_(attention.bias_k)
                module.bias_v.copy_(attention.bias_v)
        return module

    def to_multihead_attention(self) -> nn.MultiheadAttention:
        """A dense nn.MultiheadAttention with the same function."""
        like = self.out_proj.weight.detach()
        attention = nn.MultiheadAttention(
            self.embed_dim,
            self.num_heads,
            self.dropout,
            bias=self.out_proj.bias is not None,
            add_bias_kv=self.bias_k is not None,
            add_zero_attn=self.add_zero_attn,
            kdim=self.kdim,
            vdim=self.vdim,
            batch_first=self.batch_first,
            device=like.device,
            dtype=like.dtype,
        )
        with torch.no_grad():
            if self.packed_in_proj:
                attention.in_proj_weight.copy_(self.in_proj.weight)
            else:
                for name in _IN_PROJECTIONS:
                    getattr(attention, f"{name}_weight").copy_(getattr(self, name).weight)
            if attention.in_proj_bias is not None:
                attention.in_proj_bias.copy_(self.in_proj_bias)
                attention.out_proj.bias.copy_(self.out_proj.bias)
            attention.out_proj.weight.copy_(like)
            if self.bias_k is not None:
                attention.bias_k.copy_(self.bias_k)
                attention.bias_v.copy_(self.bias_v)
        return attention

    def extra_repr(self) -> str:
        extras = [f"embed_dim={self.embed_dim}", f"num_heads={self.num_heads}"]
        if not self.packed_in_proj:
            extras += [f"kdim={self.kdim}", f"vdim={self.vdim}"]
        if self.dropout:
            extras.append(f"dropout={self.dropout}")
        if self.bias_k is not None:
            extras.append("add_bias_kv=True")
        if self.add_zero_attn:
            extras.append("add_zero_attn=True")
        extras.append(f"batch_first={self.batch_first}")
        return ", ".join(extras)


def _linear_over(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An nn.Linear holding `weight` (out, in) and `bias` without copying them.

    Hands each projection's weight (a slice of a packed projection) to
    `LowRankLinear.from_linear`, so every projection factorizes with its SVD and rank rules.
    """
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.detach(), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach(), requires_grad=False)
    return linear


def _additive_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A bool mask (True = may not attend) as 0/-inf; a float mask as is, in `dtype`."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
            mask, float("-inf")
        )
    return mask.to(dtype)


def _attend_to_one_more(mask: torch.Tensor | None) -> torch.Tensor | None:
    """Extend the key dim by one key every query may attend (bias_k/bias_v, add_zero_attn)."""
    return None if mask is None else F.pad(mask, (0, 1))
