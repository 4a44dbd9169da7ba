"""`distill(student, teacher, batches)`: recover a compressed model by matching the original.

Knowledge distillation in its plainest form (Hinton et al., arXiv:1503.02531, with the teacher's
outputs as regression targets rather than softened labels): the student is trained to give the
teacher's output on the same inputs. The default loss is the relative squared error
‖y_s − y_t‖² / ‖y_t‖² of the models' first tensor outputs (real tokens only, as in calibrate);
`loss` replaces it (e.g. one on pooled sentence embeddings).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import linalg
from ..nn.factored import FactoredModule
from .batches import padding_mask, run_batch, token_rows
from .sensitivity import first_tensor

__all__ = ["distill"]

_TRAIN = ("S", "all")
_SCHEDULES = ("constant", "cosine")


def lr_factor(step: int, steps: int, warmup: int, schedule: str) -> float:
    """The learning rate of `step` (0-based) as a fraction of the peak: linear warm-up over
    `warmup` steps, then constant or a cosine decay reaching 0 after the last step."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / (steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def relative_error(student_output, teacher_output, batch) -> torch.Tensor:
    """‖y_s − y_t‖² / ‖y_t‖² over the first tensor outputs' real-token rows."""
    mask = padding_mask(batch)
    s = token_rows(first_tensor(student_output), mask)
    t = token_rows(first_tensor(teacher_output), mask)
    return ((s - t) ** 2).sum() / (t**2).sum().clamp_min(torch.finfo(t.dtype).tiny)


def check_separate_teacher(student: nn.Module, teacher: nn.Module, verb: str) -> None:
    """Raises ValueError when `teacher` is `student` or shares a parameter with it: training
    or refitting the student would then move the target too."""
    if teacher is student or {id(p) for p in teacher.parameters()} & {
        id(p) for p in student.parameters()
    }:
        raise ValueError(
            f"argument 'teacher' is the student or shares parameters with it: {verb} against "
            "a separate copy of the original model (copy.deepcopy before convert)"
        )


def distill(
    student: nn.Module,
    teacher: nn.Module,
    batches: Iterable,
    steps: int,
    *,
    train: str = "S",
    lr: float | None = None,
    weight_decay: float = 0.01,
    loss: Callable | None = None,
    seed: int = 0,
    dropout: bool = False,
    warmup: int = 0,
    schedule: str = "constant",
    progress: bool = True,
) -> list[float]:
    """Train `student` to reproduce `teacher`'s outputs on `batches` for `steps` AdamW steps.

    Args:
        student: the compressed model (trained in place), on the batches' device.
        teacher: the original model, on the same device; never changed (eval, no_grad).
        batches: model inputs as in `calibrate` (tensor, tuple/list, mapping); iterated again
            from the start when they run out (a one-shot iterator that runs out is an error).
        steps: optimizer steps (one batch each), ≥ 1.
        train: "S": only the S of every low-rank module (its singular values or r×r core) and
            nothing else; "all": every parameter that requires grad. Parameters' requires_grad
            flags are restored afterwards. After "all" each low-rank module's U, V are made
            orthonormal again (W unchanged), so growth, OIALR and the spectral report apply.
        lr: AdamW's learning rate; default 1e-3 for train="S" and 5e-5 for "all" (the MiniLM
            study's: 1e-3 on every parameter made a good student worse within 20 steps).
        weight_decay: AdamW's decoupled weight decay (torch's default, 0.01).
        loss: (student_output, teacher_output, batch) → scalar tensor; default relative_error.
        seed: seeds torch's global generator for the run (dropout), restored afterwards, so the
            same seed gives the same student.
        dropout: train the student in training mode (its dropout active); default eval mode.
        warmup: steps over which the learning rate rises linearly from lr/warmup to lr
            (0 ≤ warmup < steps; default 0).
        schedule: the learning rate after the warm-up: "constant" (default) or "cosine",
            decaying from lr to 0 at the last step (Loshchilov & Hutter, SGDR,
            arXiv:1608.03983, Eq. 5 without restarts).
        progress: a tqdm bar over the steps.

    Returns the loss of every step. Raises ValueError naming the argument (steps, train, lr,
    weight_decay, warmup, schedule, a teacher that is the student or shares a parameter with
    it, no trainable parameter, batches empty or run out, a loss that is not a one-element
    tensor or is not finite); on any error the student's parameters and buffers are put back
    as they were.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"argument 'steps' must be a positive int, got {steps!r}")
    if train not in _TRAIN:
        raise ValueError(f"argument 'train' must be one of {_TRAIN}, got {train!r}")
    if lr is None:
        lr = 1e-3 if train == "S" else 5e-5
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"argument 'lr' must be a positive number, got {lr!r}")
    if (
        isinstance(weight_decay, bool)
        or not isinstance(weight_decay, (int, float))
        or not weight_decay >= 0
    ):
        raise ValueError(f"argument 'weight_decay' must be a number >= 0, got {weight_decay!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or not 0 <= warmup < steps:
        raise ValueError(f"argument 'warmup' must be an int in [0, steps={steps}), got {warmup!r}")
    if schedule not in _SCHEDULES:
        raise ValueError(f"argument 'schedule' must be one of {_SCHEDULES}, got {schedule!r}")
    check_separate_teacher(student, teacher, "distill")
    parameters = _trainable(student, train)
    loss_fn = loss or relative_error
    saved = {k: v.detach().clone() for k, v in student.state_dict(keep_vars=True).items()}
    flags = {p: p.requires_grad for p in student.parameters()}
    modes = {m: m.training for m in list(student.modules()) + list(teacher.modules())}
    devices = [p.device for p in parameters if p.is_cuda][:1]
    losses = []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            for p in student.parameters():
                p.requires_grad_(False)
            for p in parameters:
                p.requires_grad_(True)
            optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
            scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda step: lr_factor(step, steps, warmup, schedule)
            )
            teacher.eval()
            student.train(dropout)
            stream = _cycle(batches)
            for _ in tqdm(range(steps), desc="distill", disable=not progress):
                batch = next(stream)
                with torch.no_grad():
                    target = run_batch(teacher, batch)
                value = loss_fn(run_batch(student, batch), target, batch)
                if not isinstance(value, torch.Tensor) or value.numel() != 1:
                    got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value)
                    raise ValueError(
                        f"argument 'loss' must return a one-element tensor (autograd needs a "
                        f"scalar to call backward on), got {got!r} at step {len(losses)}"
                    )
                if not torch.isfinite(value):
                    raise ValueError(
                        f"distill: the loss is {value.item()} at step {len(losses)} (argument "
                        "'lr' too large, or non-finite inputs in 'batches')"
                    )
                optimizer.zero_grad(set_to_none=True)
                value.backward()
                optimizer.step()
                scheduler.step()
                losses.append(value.item())
        if train == "all":
            _reorthonormalize(student)
    except BaseException:
        student.load_state_dict(saved)
        raise
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        for module, mode in modes.items():
            module.training = mode
    return losses


def _trainable(student: nn.Module, train: str) -> list[nn.Parameter]:
    if train == "S":
        parameters = [
            m.S for m in student.modules() if isinstance(m, FactoredModule) and m.S is not None
        ]
        what = "no low-rank module with a trainable S (convert the student first)"
    else:
        parameters = [p for p in student.parameters() if p.requires_grad]
        what = "no parameter that requires grad"
    if not parameters:
        raise ValueError(f"argument 'student' has {what}")
    return parameters


def _cycle(batches: Iterable):
    """The batches again and again; an error when they are empty or a one-shot iterator ends."""
    for epoch in itertools.count():
        count = 0
        for batch in batches:
            count += 1
            yield batch
        if count == 0:
            raise ValueError(
                "argument 'batches' is empty"
                + (" (a one-shot iterator that ran out: pass a list)" if epoch else "")
            )


def _reorthonormalize(model: nn.Module) -> None:
    """Rotate every low-rank module (never grown) to the SVD of its trained factors, W kept:
    U S Vᵀ = Q_u (R_u S R_vᵀ) Q_vᵀ = (Q_u P) Σ (Q_v E)ᵀ with P Σ Eᵀ the SVD of the r×r middle."""
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, FactoredModule) or module.frozen_rank or module.U is None:
                continue
            U, S, V = (t.double() for t in module.factors())
            Q_u, R_u = torch.linalg.qr(U)
            Q_v, R_v = torch.linalg.qr(V)
            core = torch.diag(S) if S.dim() == 1 else S
            P, sigma, Eh = linalg.svd(R_u @ core @ R_v.mT)
            module._copy_svd(Q_u @ P, sigma, Q_v @ Eh.mT, None)
