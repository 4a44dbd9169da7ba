"""refit: the sequential closed-form refit against an independent float64 reduced-rank regression
(least squares, then projection of the fitted values on their top-r directions), its errors
against the whitened truncation's, and bad input leaving the student as it was."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lowrank_ext

IN, HIDDEN, OUT, RANK = 24, 20, 6, 3


def inputs(rows=600, seed=0):
    """Correlated inputs with a non-zero mean, float64."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(IN, IN, generator=g, dtype=torch.float64)
    mixing *= torch.logspace(0, -2, IN, dtype=torch.float64)
    return torch.randn(rows, IN, generator=g, dtype=torch.float64) @ mixing.T + 0.5


def setup():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, OUT)).double()
    X = inputs()
    batches = [X[:250], X[250:]]
    stats = lowrank_ext.calibrate(teacher, batches, target_modules=["0", "2"], progress=False)
    student = lowrank_ext.convert(
        copy.deepcopy(teacher), rank=RANK, calibration=stats, target_modules=["0", "2"]
    )
    return teacher, student, X, batches


def reduced_rank_regression(X_hat, Y, rank):
    """argmin over rank-r W′ and b′ of ‖Y − X̂ W′ᵀ − b′‖_F: least squares on centred data, the
    fitted values projected on their top-`rank` right singular vectors (Izenman 1975)."""
    Xc, Yc = X_hat - X_hat.mean(0), Y - Y.mean(0)
    B = torch.linalg.lstsq(Xc, Yc).solution  # (in, out)
    _, _, Vh = torch.linalg.svd(Xc @ B, full_matrices=False)
    W = (B @ Vh[:rank].T @ Vh[:rank]).T
    return W, Y.mean(0) - W @ X_hat.mean(0)


def weight(layer):
    U, S, V = (t.detach() for t in layer.factors())
    return (U * S) @ V.T


def test_refit_equals_the_float64_reduced_rank_regression_layer_by_layer():
    teacher, student, X, batches = setup()
    whitened = copy.deepcopy(student)
    report = lowrank_ext.refit(student, teacher, batches, ridge=0.0, progress=False)
    with torch.no_grad():
        # layer 0 sees the original inputs: the refit only adds the optimal bias to whitening
        W0, b0 = reduced_rank_regression(X, teacher[0](X), RANK)
        torch.testing.assert_close(weight(student[0]), W0, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(student[0].bias.detach(), b0, rtol=1e-8, atol=1e-10)
        # layer 2 sees the refitted layer 0's output and must reproduce the original output
        hidden_hat = torch.tanh(student[0](X))
        target = teacher(X)
        W2, b2 = reduced_rank_regression(hidden_hat, target, RANK)
        torch.testing.assert_close(weight(student[2]), W2, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(student[2].bias.detach(), b2, rtol=1e-8, atol=1e-10)
        # the reported errors are the mean squared output errors per row, before and after
        after = float(((student(X) - target) ** 2).sum(1).mean())
        assert report["2"][1] == pytest.approx(after, rel=1e-9)
        before = float(((whitened[2](hidden_hat) - target) ** 2).sum(1).mean())
        assert report["2"][0] == pytest.approx(before, rel=1e-9)
        first = float(((whitened[0](X) - teacher[0](X)) ** 2).sum(1).mean())
        assert report["0"][0] == pytest.approx(first, rel=1e-9)
        for before, after in report.values():
            assert after < before
        # and the whole model's output error is below the whitened truncation's here
        assert after < float(((whitened(X) - target) ** 2).sum(1).mean())
    # factors stay orthonormal (growth, OIALR and the spectral report rely on it)
    for layer in (student[0], student[2]):
        torch.testing.assert_close(layer.U.T @ layer.U, torch.eye(RANK, dtype=torch.float64))
        torch.testing.assert_close(layer.V.T @ layer.V, torch.eye(RANK, dtype=torch.float64))
        assert layer.rank == RANK


def test_a_layer_the_refit_does_not_improve_keeps_its_factors():
    teacher, student, X, batches = setup()
    lowrank_ext.refit(student, teacher, batches, ridge=0.0, progress=False)
    state = copy.deepcopy(student.state_dict())
    report = lowrank_ext.refit(student, teacher, batches, ridge=0.0, progress=False)
    for name, (before, after) in report.items():  # already optimal: nothing to gain
        assert after == pytest.approx(before, rel=1e-9), name
    for key, value in student.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=1e-9, atol=1e-12)


def test_query_key_value_sharing_one_input_form_one_stage_and_flags_are_restored():
    class Attention(nn.Module):  # three projections of one input, as in BERT
        def __init__(self):
            super().__init__()
            self.query, self.key, self.value = (nn.Linear(IN, IN) for _ in range(3))
            self.out = nn.Linear(IN, OUT)

        def forward(self, x):
            return self.out(self.query(x) * torch.sigmoid(self.key(x)) + self.value(x))

    torch.manual_seed(1)
    teacher = Attention().double()
    X = inputs()
    names = ["query", "key", "value", "out"]
    stats = lowrank_ext.calibrate(teacher, [X], progress=False, target_modules=names)
    student = lowrank_ext.convert(copy.deepcopy(teacher), rank=4, calibration=stats,
                                  target_modules=names)  # fmt: skip
    calls = []
    student.register_forward_pre_hook(lambda module, args: calls.append(1))
    student.train()
    teacher.train()
    teacher_state = copy.deepcopy(teacher.state_dict())
    report = lowrank_ext.refit(student, teacher, [X], ridge=0.0, progress=False)
    assert set(report) == set(names)
    assert len(calls) == 4  # two stages (query/key/value, out), each: find it, then one batch
    assert student.training and all(m.training for m in student.modules())
    assert teacher.training
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, teacher_state[key])
    with torch.no_grad():
        for name in ("query", "key", "value"):  # their inputs are the original ones
            W, b = reduced_rank_regression(X, getattr(teacher, name)(X), 4)
            torch.testing.assert_close(weight(getattr(student, name)), W, rtol=1e-6, atol=1e-8)


def poisoned(teacher, index):
    """A copy of the teacher with one NaN: in layer 2's weight (index 2), or in the first
    layer's output through a hook on the Tanh (index 1), so layer 2's input is NaN."""
    teacher = copy.deepcopy(teacher)
    if index == 2:
        with torch.no_grad():
            teacher[2].weight[0, 0] = float("nan")
    else:
        teacher[1].register_forward_hook(lambda module, args, out: out * float("nan"))
    return teacher


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t, s, b: (s, t, iter(b), {}), "argument 'batches' must be a list"),
        (lambda t, s, b: (s, t, [], {}), "argument 'batches' is empty"),
        (lambda t, s, b: (s, t, b, {"ridge": -1.0}), "argument 'ridge'"),
        (lambda t, s, b: (s, s, b, {}), "argument 'teacher' is the student"),
        (lambda t, s, b: (t, copy.deepcopy(t), b, {}), "no low-rank linear layer"),
        (
            lambda t, s, b: (s, t, [b[0], b[1].clone().fill_(float("nan"))], {}),
            "batch 1 gives the student's layer '0' an input with NaN",
        ),  # fmt: skip
        (lambda t, s, b: (s, poisoned(t, 2), b, {}), "'teacher': layer '2' has NaN or inf"),
        (lambda t, s, b: (s, poisoned(t, 1), b, {}), "the teacher's layer '2' an input with NaN"),
    ],
)
def test_bad_input_is_named_and_leaves_the_student_unchanged(change, message):
    teacher, student, X, batches = setup()
    state = copy.deepcopy(student.state_dict())
    student_arg, teacher_arg, batches_arg, options = change(teacher, student, batches)
    with pytest.raises(ValueError, match=message):
        lowrank_ext.refit(student_arg, teacher_arg, batches_arg, progress=False, **options)
    for key, value in student.state_dict().items():
        assert torch.equal(value, state[key])


def test_a_failure_in_a_later_stage_restores_the_layers_already_refitted():
    teacher, student, X, batches = setup()
    state = copy.deepcopy(student.state_dict())

    def poison(module, args):  # layer 2's input is NaN in the student only, on batch 1
        return (args[0] * float("nan"),) if args[0].shape[0] == 350 else None

    handle = student[2].register_forward_pre_hook(poison)
    with pytest.raises(ValueError, match="batch 1 gives the student's layer '2'"):
        lowrank_ext.refit(student, teacher, batches, progress=False)
    handle.remove()
    for key, value in student.state_dict().items():
        assert torch.equal(value, state[key]), key  # layer 0 had been refitted: undone


def test_a_teacher_of_another_shape_is_refused():
    teacher, student, X, batches = setup()
    other = nn.Sequential(nn.Linear(IN, HIDDEN + 1), nn.Tanh(), nn.Linear(HIDDEN + 1, OUT))
    with pytest.raises(ValueError, match="layer '0'.*argument 'teacher'"):
        lowrank_ext.refit(student, other.double(), batches, progress=False)
