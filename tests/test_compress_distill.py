"""lowrank_ext.distill: it recovers the teacher's outputs, is deterministic for a seed, trains
only what `train` says, keeps the factors orthonormal, and undoes itself on error."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from test_compress_whitened import inputs, mlp

import lowrank_ext


def setup(rank=3):
    X = inputs(rows=512)
    teacher = mlp()
    student = lowrank_ext.convert(copy.deepcopy(teacher), rank=rank, target_modules=["0"])
    batches = [X[i : i + 64] for i in range(0, 512, 64)]
    return X, teacher, student, batches


def relative(student, teacher, X):
    with torch.no_grad():
        return float((student(X) - teacher(X)).norm() ** 2 / teacher(X).norm() ** 2)


def test_distill_reduces_the_output_error_and_is_deterministic():
    X, teacher, student, batches = setup()
    twin = copy.deepcopy(student)
    teacher_state = copy.deepcopy(teacher.state_dict())
    before = relative(student, teacher, X)
    losses = lowrank_ext.distill(
        student, teacher, batches, steps=60, train="all", lr=3e-3, progress=False
    )
    after = relative(student, teacher, X)
    assert len(losses) == 60 and after < 0.5 * before
    assert losses[0] == pytest.approx(
        relative(twin, teacher, batches[0]), rel=1e-9
    )  # the default loss is the relative squared error of the outputs
    again = lowrank_ext.distill(twin, teacher, batches, steps=60, train="all", lr=3e-3,
                                progress=False)  # fmt: skip
    assert again == losses
    assert all(torch.equal(a, b) for a, b in zip(student.parameters(), twin.parameters()))
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_state.items())
    # "all" leaves orthonormal factors (W kept through the rotation)
    U, V = student[0].U.detach(), student[0].V.detach()
    torch.testing.assert_close(U.T @ U, torch.eye(3, dtype=U.dtype), rtol=0, atol=1e-12)
    torch.testing.assert_close(V.T @ V, torch.eye(3, dtype=V.dtype), rtol=0, atol=1e-12)
    S = student[0].S.detach()
    assert bool((S[:-1] >= S[1:]).all())


def test_train_s_changes_only_the_singular_values_and_restores_flags():
    X, teacher, student, batches = setup()
    student[2].weight.requires_grad_(False)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    lowrank_ext.distill(student, teacher, batches, steps=20, train="S", lr=1e-2, progress=False)
    after = student.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"0.S"}
    assert student[0].U.requires_grad and not student[2].weight.requires_grad
    assert student.training and teacher.training  # modes restored (nn.Sequential default)
    assert relative(student, teacher, X) < relative(setup()[2], teacher, X)


def test_distill_bad_inputs_are_named_and_the_student_is_restored():
    X, teacher, student, batches = setup()
    saved = {k: v.clone() for k, v in student.state_dict().items()}
    for kwargs, message in (
        ({"steps": 0}, "argument 'steps'"),
        ({"steps": 3, "train": "U"}, "argument 'train'"),
        ({"steps": 3, "lr": -1.0}, "argument 'lr'"),
    ):
        with pytest.raises(ValueError, match=message):
            lowrank_ext.distill(student, teacher, batches, progress=False, **kwargs)
    with pytest.raises(ValueError, match="argument 'batches' is empty"):
        lowrank_ext.distill(student, teacher, [], steps=2, progress=False)
    with pytest.raises(ValueError, match="one-shot iterator"):
        lowrank_ext.distill(student, teacher, iter(batches[:2]), steps=5, progress=False)
    bad = [batches[0], batches[1].clone().fill_(math.inf)]
    with pytest.raises(ValueError, match="the loss is nan at step 1"):
        lowrank_ext.distill(student, teacher, bad, steps=4, train="all", progress=False)
    with pytest.raises(ValueError, match="no low-rank module"):
        lowrank_ext.distill(copy.deepcopy(teacher), teacher, batches, steps=2, progress=False)
    for bad_loss, got in (
        (lambda s, t, batch: s - t, r"\(64, 6\)"),  # per-element, not reduced
        (lambda s, t, batch: 0.5, "float"),
    ):
        with pytest.raises(ValueError, match=f"argument 'loss' must return a one-element.*{got}"):
            lowrank_ext.distill(student, teacher, batches, steps=3, loss=bad_loss, progress=False)
    now = student.state_dict()
    assert all(torch.equal(now[k], saved[k]) for k in saved)
    assert all(p.requires_grad for p in student.parameters())


def test_a_teacher_that_is_the_student_is_refused():
    X, teacher, student, batches = setup()
    saved = copy.deepcopy(student.state_dict())
    with pytest.raises(ValueError, match="argument 'teacher' is the student or shares"):
        lowrank_ext.distill(student, student, batches, steps=5, progress=False)
    shares = copy.deepcopy(teacher)
    shares[2] = student[2]  # one layer shared: weight decay would move the teacher too
    with pytest.raises(ValueError, match="argument 'teacher' is the student or shares"):
        lowrank_ext.distill(student, shares, batches, steps=5, progress=False)
    for key, value in student.state_dict().items():
        assert torch.equal(value, saved[key])


@pytest.mark.parametrize(("train", "lr"), [("S", 1e-3), ("all", 5e-5)])
def test_default_learning_rate_follows_train(monkeypatch, train, lr):
    X, teacher, student, batches = setup()
    seen = {}
    real = torch.optim.AdamW

    def recording(parameters, **options):
        seen.update(options)
        return real(parameters, **options)

    monkeypatch.setattr(torch.optim, "AdamW", recording)
    lowrank_ext.distill(student, teacher, batches, steps=2, train=train, progress=False)
    assert seen == {"lr": lr, "weight_decay": 0.01}
    with pytest.raises(ValueError, match="argument 'weight_decay'"):
        lowrank_ext.distill(student, teacher, batches, steps=2, weight_decay=-1.0, progress=False)


def test_learning_rate_schedule_warmup_then_cosine():
    from lowrank_ext.compress.distill import lr_factor

    # warm-up 1/w, 2/w, ..., then the cosine from 1 down towards 0 after the last step
    factors = [lr_factor(step, 10, 2, "cosine") for step in range(10)]
    expected = [0.5, 1.0] + [0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(8)]
    assert factors == pytest.approx(expected, rel=1e-12)
    assert [lr_factor(step, 5, 0, "constant") for step in range(5)] == [1.0] * 5
    # it is applied: Adam's first update of each S entry is lr_t·g/|g| with lr_t = lr/3 here
    X, teacher, student, batches = setup()
    seen = []

    def loss(student_output, teacher_output, batch):
        seen.append(student[0].S.detach().clone())
        return ((student_output - teacher_output) ** 2).mean()

    lowrank_ext.distill(student, teacher, batches, steps=4, warmup=3, lr=1e-3, weight_decay=0.0,
                        loss=loss, progress=False)  # fmt: skip
    torch.testing.assert_close((seen[1] - seen[0]).abs(), torch.full_like(seen[0], 1e-3 / 3),
                               rtol=1e-4, atol=0)  # fmt: skip


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"warmup": 5}, "argument 'warmup'"),
        ({"warmup": -1}, "argument 'warmup'"),
        ({"schedule": "linear"}, "argument 'schedule'"),
    ],  # fmt: skip
)
def test_bad_schedule_is_named(options, message):
    X, teacher, student, batches = setup()
    with pytest.raises(ValueError, match=message):
        lowrank_ext.distill(student, teacher, batches, steps=5, progress=False, **options)
