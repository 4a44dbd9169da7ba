"""`refit(student, teacher, batches)`: sequential closed-form refit of a compressed model.

`convert(calibration=stats)` truncates every layer for the inputs X the ORIGINAL model gives it.
Once the layers upstream are truncated, a layer receives X̂ ≠ X instead, and its error adds to
theirs. The refit corrects that layer by layer, in the order the forward reaches them (SVD-LLM,
Wang et al., arXiv:2403.07378, Sec. 3.3, "parameter update with sequential low-rank
approximation"; the sequential calibration of GPTQ, arXiv:2210.17323): each low-rank layer is
refactored at its own rank r so that, from the inputs x̂ it actually receives in the student
(upstream layers already refitted), it best reproduces the ORIGINAL layer's output W x + b:

    min over rank-r W′ and b′ of  E‖(W x + b) − (W′ x̂ + b′)‖²          (a reduced-rank regression)

With centred moments C_x̂x̂ = Cov(x̂), C_x̂x = Cov(x̂, x) (the means removed: the bias absorbs
them, b′ = b + W μ_x − W′ μ_x̂; a layer without bias keeps uncentred moments and none), and
L̂ L̂ᵀ = C_x̂x̂ + λ·mean(diag C_x̂x̂)·I (the regularization of whitening.py, λ = `ridge`), the
objective is ‖W C_xx̂ L̂⁻ᵀ − W′ L̂‖_F² + const, so

    W′ = [W C_xx̂ L̂⁻ᵀ]_r L̂⁻¹        (Eckart–Young in the whitened basis),

which for x̂ = x is the whitened truncation itself: the refit generalizes it (and the
closed-form left-factor update of SVD-LLM Sec. 3.3 at a fixed V′ is a special case it never
does worse than). W′ is stored as orthonormal U, V with S (whitening.py). A refitted layer whose
error on the calibration data would exceed that of its current factors keeps them.

The regression fits in_features coefficients per output from the calibration rows, so it needs
many more rows than inputs: on all-MiniLM-L6-v2 (inputs of 384 and 1,536) 8,014 tokens gain
(50 % kept: mean cosine 0.864 → 0.886 with ridge 1e-2, README) while 865 tokens overfit
(0.926 → 0.919). A larger `ridge` pulls it toward the plain regularized solution; 0.1 was
worse there than 1e-2.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..nn.calibrated import linear_matrix
from ..nn.hf_conv1d import linear_kinds
from ..nn.linear import LowRankLinear
from .batches import padding_mask, run_batch, token_rows
from .distill import check_separate_teacher
from .whitening import WhitenedSVD, whitening_factor

__all__ = ["refit"]


class _Stop(Exception):
    """Raised by a hook once the inputs a stage needs are captured: the rest of the forward is
    not needed."""


def refit(
    student: nn.Module,
    teacher: nn.Module,
    batches: Sequence,
    *,
    ridge: float = 1e-6,
    progress: bool = True,
) -> dict[str, tuple[float, float]]:
    """Refactor every low-rank linear layer of `student` (in place, ranks unchanged) to best
    reproduce `teacher`'s layer outputs from the inputs the student gives it (module doc).

    Args:
        student: the compressed model (`lowrank_ext.convert`), on the batches' device.
        teacher: the original model it was converted from (same module names), never changed.
        batches: a list or tuple of model inputs as in `calibrate` (tensor, tuple/list,
            mapping; padding left out through a mapping's "attention_mask"); it is run once per
            stage (a group of layers sharing one input: query/key/value are one stage).
        ridge: λ ≥ 0 of the regularization C_x̂x̂ + λ·mean(diag C_x̂x̂)·I (whitening.py).
        progress: a tqdm bar over the layers.

    Layers refitted: every LowRankLinear of the student (without frozen part) whose name is an
    nn.Linear or a transformers Conv1D in the teacher; others are left as they are.

    Returns {layer name: (error before, error after)}: the mean squared error per input row of
    the layer's output against the original layer's, on the inputs the student gives it, with
    the factors before and after (after ≤ before: a refit that is not better is not applied).

    Costs per stage one forward of both models over `batches`, cut after the stage's layers,
    and O(in²) float64 memory per layer. Both models run in eval mode under no_grad; training
    flags are restored and hooks removed afterwards, also on error.

    Raises ValueError naming the argument or layer: `batches` not a list/tuple or empty; no
    layer to refit; the teacher is the student or shares its parameters; a layer whose shape
    differs from the teacher's; a teacher layer whose weight or bias holds NaN or inf; an
    input holding NaN or inf (the student's or the teacher's, named); a layer no batch
    reaches; student and teacher inputs with different row counts. On error the student is
    left as it was.
    """
    if not isinstance(student, nn.Module) or not isinstance(teacher, nn.Module):
        raise TypeError("arguments 'student' and 'teacher' must be nn.Module instances")
    if not isinstance(batches, (list, tuple)):
        raise ValueError(
            f"argument 'batches' must be a list or tuple (it is run once per stage), got "
            f"{type(batches).__name__}"
        )
    if not batches:
        raise ValueError("argument 'batches' is empty: the refit needs at least one batch")
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not ridge >= 0:
        raise ValueError(f"argument 'ridge' must be a number ≥ 0, got {ridge!r}")
    check_separate_teacher(student, teacher, "refit")
    layers = _layers(student, teacher)
    for name, (_, dense) in layers.items():
        weights = [linear_matrix(name, dense)] + ([dense.bias] if dense.bias is not None else [])
        if not all(torch.isfinite(w).all() for w in weights):
            raise ValueError(
                f"argument 'teacher': layer {name!r} has NaN or inf in its weight or bias"
            )
    saved = {k: v.detach().clone() for k, v in student.state_dict(keep_vars=True).items()}
    modes = {m: m.training for m in list(student.modules()) + list(teacher.modules())}
    report = {}
    try:
        student.eval()
        teacher.eval()
        remaining = list(layers)
        with torch.no_grad(), tqdm(total=len(remaining), desc="refit", disable=not progress) as bar:
            while remaining:
                group = _next_stage(student, remaining, batches[0], layers)
                moments = _stage_moments(student, teacher, group, batches)
                for name in group:
                    report[name] = _refit_layer(name, layers[name], moments[name], float(ridge))
                    remaining.remove(name)
                bar.update(len(group))
    except BaseException:
        student.load_state_dict(saved)
        raise
    finally:
        for module, mode in modes.items():
            module.training = mode
    return report


def _layers(student, teacher) -> dict[str, tuple[LowRankLinear, nn.Module]]:
    """{name: (student's LowRankLinear, teacher's dense linear)} of the layers to refit."""
    dense = {name: m for name, m in teacher.named_modules() if isinstance(m, linear_kinds())}
    layers = {}
    for name, module in student.named_modules():
        if isinstance(module, LowRankLinear) and not module.frozen_rank and name in dense:
            shape = tuple(linear_matrix(name, dense[name]).shape)
            if shape != (module.out_features, module.in_features):
                raise ValueError(
                    f"layer {name!r}: the student's ({module.out_features}, "
                    f"{module.in_features}) differs from the teacher's weight {shape}: "
                    "argument 'teacher' must be the model the student was converted from"
                )
            layers[name] = (module, dense[name])
    if not layers:
        raise ValueError(
            "argument 'student' has no low-rank linear layer that is a dense linear layer of "
            "the same name in 'teacher' (convert a copy of the teacher first)"
        )
    return layers


def _input_key(x: torch.Tensor) -> tuple:
    return (x.data_ptr(), tuple(x.shape), x.stride(), x._version)


def _next_stage(student, remaining, batch, layers) -> list[str]:
    """The first remaining layer the student's forward reaches, and the remaining layers that
    receive the very same input tensor (query, key, value): their inputs do not depend on
    each other's outputs. The forward stops at the first remaining layer with another input."""
    group, first = [], []

    def hook(name):
        def capture(module, args):
            key = _input_key(args[0])
            if not first:
                first.append(key)
            elif key != first[0]:
                raise _Stop
            group.append(name)

        return capture

    handles = [layers[n][0].register_forward_pre_hook(hook(n)) for n in remaining]
    try:
        run_batch(student, batch)
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
    if not group:
        raise ValueError(
            f"argument 'batches': {len(remaining)} layer(s) never receive an input from the "
            f"first batch: {', '.join(remaining[:8])}"
        )
    return group


def _inputs(
    model, modules: dict[str, nn.Module], batch, index: int, role: str
) -> dict[str, torch.Tensor]:
    """{name: float64 input rows (real tokens)} of `modules` on `batch`, the forward cut once
    all are captured; `role` ("student" or "teacher") names the model in errors."""
    captured, mask = {}, padding_mask(batch)

    def hook(name):
        def capture(module, args):
            rows = token_rows(args[0].detach(), mask)
            if not torch.isfinite(rows).all():
                raise ValueError(
                    f"argument 'batches': batch {index} gives the {role}'s layer {name!r} an "
                    f"input with NaN or inf values (in the batch, or made by the {role}'s "
                    "earlier layers)"
                )
            captured[name] = rows.double()
            if len(captured) == len(modules):
                raise _Stop

        return capture

    handles = [module.register_forward_pre_hook(hook(n)) for n, module in modules.items()]
    try:
        run_batch(model, batch)
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in modules if name not in captured]
    if missing:
        raise ValueError(f"argument 'batches': batch {index} never reaches layer(s) {missing}")
    return captured


def _stage_moments(student, teacher, group, batches) -> dict[str, dict]:
    """Per layer of the group, the sums over all rows of x̂, x, x̂ᵀx̂, x̂ᵀx, xᵀx and the count
    (x̂: the student's input, x: the teacher's; the student's group shares one input)."""
    student_modules = {name: student.get_submodule(name) for name in group}
    teacher_modules = {name: teacher.get_submodule(name) for name in group}
    sums = {name: None for name in group}
    for index, batch in enumerate(batches):
        x_hat = _inputs(student, student_modules, batch, index, "student")
        x = _inputs(teacher, teacher_modules, batch, index, "teacher")
        hat = x_hat[group[0]]
        hat_moment = hat.mT @ hat
        for name in group:
            if x[name].shape != hat.shape:
                raise ValueError(
                    f"layer {name!r}: batch {index} gives the student {tuple(hat.shape)} input "
                    f"rows and the teacher {tuple(x[name].shape)}: the models must take the "
                    "same inputs"
                )
            terms = (hat.sum(0), x[name].sum(0), hat_moment, hat.mT @ x[name],
                     x[name].mT @ x[name])  # fmt: skip
            if sums[name] is None:
                sums[name] = [t.clone() for t in terms] + [hat.shape[0]]
            else:
                for total, term in zip(sums[name], terms):
                    total.add_(term)
                sums[name][-1] += hat.shape[0]
    return {name: dict(zip(("s_hat", "s_x", "hat_hat", "hat_x", "x_x", "n"), s)) for name, s
            in sums.items()}  # fmt: skip


def _refit_layer(name, pair, sums, ridge) -> tuple[float, float]:
    """Refactor one layer (module doc); (error before, error after) per row."""
    module, dense = pair
    W = linear_matrix(name, dense).detach().double()
    b = dense.bias.detach().double() if dense.bias is not None else None
    n = sums["n"]
    mu_hat, mu_x = sums["s_hat"] / n, sums["s_x"] / n
    hat_hat, hat_x, x_x = sums["hat_hat"] / n, sums["hat_x"] / n, sums["x_x"] / n
    if b is not None:  # centred: the bias absorbs the means
        hat_hat = hat_hat - torch.outer(mu_hat, mu_hat)
        hat_x = hat_x - torch.outer(mu_hat, mu_x)
        x_x = x_x - torch.outer(mu_x, mu_x)
    hat_hat = (hat_hat + hat_hat.mT) / 2
    # E‖W x − W′ x̂‖² (centred where there is a bias) of a candidate W′
    reference = float((W @ x_x * W).sum())

    def error(W_prime):
        return (
            reference
            - 2 * float((W_prime @ hat_x * W).sum())
            + float((W_prime @ hat_hat * W_prime).sum())
        )

    # W C_xx̂ (L̂ L̂ᵀ)⁻¹ times L̂ is W C_xx̂ L̂⁻ᵀ: WhitenedSVD's W L̂ (module doc)
    L, _ = whitening_factor(hat_hat, ridge)
    target = torch.cholesky_solve((W @ hat_x.mT).mT, L).mT
    U, s, V = WhitenedSVD(target, hat_hat, ridge).whitened_factors(module.rank)
    current = tuple(t.detach().double() for t in module.factors())
    S = torch.diag(current[1]) if current[1].dim() == 1 else current[1]
    W_now = current[0] @ S @ current[2].mT
    before, after = error(W_now), error((U * s) @ V.mT)
    if b is not None:  # the current bias need not match the means: its share of the error
        before += float(((W @ mu_x + b - W_now @ mu_hat - module.bias.double()) ** 2).sum())
    if after > before:
        return before, before
    bias = None
    if b is not None:
        bias = b + W @ mu_x - (U * s) @ (V.mT @ mu_hat)
    dtype = module.U.dtype
    module._copy_svd(
        U.to(dtype), s.to(dtype), V.to(dtype), None if bias is None else bias.to(dtype)
    )
    return before, after
