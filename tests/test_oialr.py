"""OIALR: conversion, basis updates and truncation, optimizer state, checkpoints, compile."""

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from lowrank_ext import OIALR, LowRankConv2d, LowRankLinear, LowRankMultiheadAttention
from lowrank_ext.reference import dense_weight


class Tokens(nn.Module):
    """A small transformer block on 6 tokens of 8 features, then a linear head."""

    def __init__(self, kdim=None):
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True, kdim=kdim, vdim=kdim)
        self.key = nn.Linear(8, kdim) if kdim else None
        self.ff = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = self.embed(x)
        keys = self.key(x) if self.key is not None else h
        h = h + self.attn(h, keys, keys, need_weights=False)[0]
        return self.head(torch.relu(self.ff(h)).mean(1))


def _mlp():
    return nn.Sequential(
        nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 20), nn.Tanh(), nn.Linear(20, 3)
    )


def _cnn():
    return nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1), nn.Tanh(), nn.Conv2d(6, 8, 3), nn.Flatten(), nn.Linear(32, 3)
    )


MODELS = {
    "mlp": (_mlp, (16, 12)),
    "cnn": (_cnn, (16, 2, 4, 4)),
    "attention": (Tokens, (16, 6, 8)),
    "attention_kdim": (lambda: Tokens(kdim=6), (16, 6, 8)),
}


def _setup(kind="mlp", dtype=torch.float64, optimizer=None, seed=0, **kwargs):
    torch.manual_seed(seed)
    build, shape = MODELS[kind]
    model = build().to(dtype)
    g = torch.Generator().manual_seed(seed + 1)
    data = [
        (
            torch.randn(*shape, generator=g, dtype=dtype),
            torch.randint(0, 3, (shape[0],), generator=g),
        )
        for _ in range(4)
    ]
    opt = (optimizer or (lambda p: torch.optim.Adam(p, lr=1e-2)))(model.parameters())
    settings = {"delay": 2, "frequency": 3, "cutoff": 0.1} | kwargs
    return model, opt, OIALR(model, opt, **settings), data


def _optimizer_step(model, opt, data, i) -> float:
    x, y = data[i % len(data)]
    opt.zero_grad()
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return loss.item()


def _train(model, opt, oialr, data, steps, start=0):
    changes, losses = [], []
    for i in range(start, start + steps):
        losses.append(_optimizer_step(model, opt, data, i))
        changes.append(oialr.step())
    return losses, changes


def _weights(oialr):
    return {name: dense_weight(*layer.factors()).detach() for name, layer in oialr._managed.items()}


def _optimized(opt):
    return [p for group in opt.param_groups for p in group["params"]]


@pytest.mark.parametrize("kind", list(MODELS))
def test_conversion_keeps_function_and_trains_only_cores_and_biases(kind):
    model, opt, oialr, data = _setup(kind, delay=3)
    _train(model, opt, oialr, data, 2)
    assert not oialr.converted and oialr.ranks() == {}
    x = data[2][0]
    dense_biases = [p for n, p in model.named_parameters() if "bias" in n]
    _optimizer_step(model, opt, data, 2)
    before = model(x).detach()
    dense = {"parameters": sum(p.numel() for p in model.parameters())}
    dense["trainable"] = dense["parameters"]
    assert oialr.step() is True and oialr.converted
    torch.testing.assert_close(model(x).detach(), before, rtol=1e-10, atol=1e-12)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert oialr.history == [
        {
            "step": 3,
            "ranks": oialr.ranks(),
            "parameters": total,
            "trainable": trainable,
            "dense": dense,
        }
    ]
    assert total > dense["parameters"] > trainable  # full rank grows; only cores, biases train
    optimized = {id(p) for p in _optimized(opt)}
    for name, layer in oialr._managed.items():
        assert isinstance(layer, (LowRankLinear, LowRankConv2d)) and layer.core == "full"
        assert layer.rank == min(layer.in_features, layer.out_features), name
        assert not layer.U.requires_grad and not layer.V.requires_grad
        assert id(layer.U) not in optimized and id(layer.V) not in optimized
        assert id(layer.S) in optimized
    # The output layer stays dense; every parameter the model trains is in the optimizer.
    assert isinstance(model.head if kind.startswith("attention") else model[-1], nn.Linear)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == optimized
    # Biases are the same Parameters (their Adam moments continue), except the chunks of a
    # separate-q/k/v attention's packed bias.
    kept = [p for p in dense_biases if any(p is q for q in trainable)]
    assert len(kept) == len(dense_biases) - (1 if kind == "attention_kdim" else 0)
    if kind.startswith("attention"):
        assert isinstance(model.attn, LowRankMultiheadAttention)
    losses, _ = _train(model, opt, oialr, data, 12, start=3)
    assert losses[-1] < losses[0]


def test_update_is_invariant_rotates_to_diagonal_and_keeps_bases_orthonormal():
    model, opt, oialr, data = _setup("mlp", torch.float32, cutoff=0.0, frequency=100)
    _train(model, opt, oialr, data, 8)  # S trained off-diagonal
    before = _weights(oialr)
    for layer in oialr._managed.values():
        assert (layer.S - torch.diag(torch.diagonal(layer.S))).abs().max() > 1e-4
    ranks = oialr.ranks()
    assert oialr._update(oialr.steps) is False
    assert oialr.ranks() == ranks
    for name, layer in oialr._managed.items():
        W = dense_weight(*layer.factors()).detach()
        assert torch.linalg.norm(W - before[name]) / torch.linalg.norm(before[name]) < 1e-6
        S = layer.S.detach()
        assert torch.equal(S, torch.diag(torch.diagonal(S)))
        assert torch.all(torch.diagonal(S)[:-1] >= torch.diagonal(S)[1:])
        for factor in (layer.U, layer.V):
            gram = factor.double().T @ factor.double()
            assert (gram - torch.eye(gram.shape[0], dtype=torch.float64)).abs().max() < 1e-5


def test_update_under_bf16_autocast_uses_fp32():
    model, opt, oialr, data = _setup("mlp", torch.float32, cutoff=0.0, frequency=100)
    _train(model, opt, oialr, data, 6)
    before = _weights(oialr)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        oialr._update(oialr.steps)
    for name, W in _weights(oialr).items():
        assert torch.linalg.norm(W - before[name]) / torch.linalg.norm(before[name]) < 1e-6
        assert oialr._managed[name].S.dtype == torch.float32


@pytest.mark.parametrize("cutoff", [0.2, 0.5, 0.97])
def test_truncation_error_is_the_dropped_singular_values(cutoff):
    model, opt, oialr, data = _setup("mlp", cutoff=cutoff, frequency=100, max_drop=0.5, min_rank=3)
    _train(model, opt, oialr, data, 8)
    before = _weights(oialr)
    spectra = {
        name: torch.linalg.svdvals(layer.S.detach()) for name, layer in oialr._managed.items()
    }
    ranks = oialr.ranks()
    changed = oialr._update(oialr.steps)
    for name, sigma in spectra.items():
        r = ranks[name]
        above = int((sigma >= cutoff * sigma[0]).sum())
        k = max(above, r - r // 2, 3)
        assert oialr.ranks()[name] == k
        difference = _weights(oialr)[name] - before[name]
        dropped = sigma[k:]
        # Eckart–Young: the Frobenius error is the dropped σ's norm, the spectral one the first.
        torch.testing.assert_close(
            torch.linalg.norm(difference), torch.linalg.norm(dropped), rtol=1e-8, atol=1e-12
        )
        if dropped.numel():
            torch.testing.assert_close(
                torch.linalg.matrix_norm(difference, 2), dropped[0], rtol=1e-8, atol=1e-12
            )
    assert changed == any(oialr.ranks()[n] < ranks[n] for n in ranks)
    if cutoff == 0.97:  # the cap: at most half the rank per update
        assert all(oialr.ranks()[n] == ranks[n] - ranks[n] // 2 for n in ranks)


def test_min_rank_is_a_floor():
    model, opt, oialr, data = _setup("mlp", cutoff=0.99, frequency=1, max_drop=1.0, min_rank=5)
    _train(model, opt, oialr, data, 6)
    assert set(oialr.ranks().values()) == {5}


def _sgd(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-3)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_rotate_then_step_equals_step_in_old_coordinates(kind):
    """A pure rotation (cutoff 0) then one SGD-momentum step: the same W as without rotating."""
    runs = []
    for frequency in (3, 100):  # with and without a basis update after step 5
        model, opt, oialr, data = _setup(kind, optimizer=_sgd, cutoff=0.0, frequency=frequency)
        _train(model, opt, oialr, data, 5)
        _train(model, opt, oialr, data, 1, start=5)
        runs.append(_weights(oialr))
    rotated, plain = runs
    for name in plain:
        torch.testing.assert_close(rotated[name], plain[name], rtol=1e-10, atol=1e-12)


def test_rotate_carries_adam_moments_exactly_in_w_coordinates():
    """Adam's first moment maps to the same W-space moment U M Vᵀ before and after an update;
    with S diagonal the rotation is a signed permutation and a following step is exact too."""
    model, opt, oialr, data = _setup("mlp", cutoff=0.0, frequency=100)
    _train(model, opt, oialr, data, 6)

    def moments():
        return {
            name: dense_weight(layer.U, opt.state[layer.S]["exp_avg"], layer.V).detach()
            for name, layer in oialr._managed.items()
        }

    before = moments()
    oialr._update(oialr.steps)
    for name, moment in moments().items():
        torch.testing.assert_close(moment, before[name], rtol=1e-10, atol=1e-14)
    # S is now diagonal: permute it out of order; the SVD maps it back by a signed permutation.
    for layer in oialr._managed.values():
        with torch.no_grad():
            order = torch.randperm(layer.S.shape[0])
            layer.U.copy_(layer.U[:, order])
            layer.V.copy_(-layer.V[:, order])
            layer.S.copy_(-layer.S[order][:, order])
            for key in ("exp_avg", "exp_avg_sq"):
                state = opt.state[layer.S][key]
                state.copy_((-1 if key == "exp_avg" else 1) * state[order][:, order])
    twin = copy.deepcopy((model, opt, oialr))
    oialr._update(oialr.steps)
    _train(model, opt, oialr, data, 1, start=6)
    twin_model, twin_opt, twin_oialr = twin
    _train(twin_model, twin_opt, twin_oialr, data, 1, start=6)
    for name, W in _weights(oialr).items():
        torch.testing.assert_close(W, _weights(twin_oialr)[name], rtol=1e-10, atol=1e-12)


def test_conversion_projects_adam_moments_onto_the_bases():
    model, opt, oialr, data = _setup("mlp", delay=4)
    _train(model, opt, oialr, data, 3)
    _optimizer_step(model, opt, data, 3)
    dense = {name: model.get_submodule(name).weight for name in ("0", "2")}
    moments = {
        n: {k: opt.state[w][k].clone() for k in ("exp_avg", "exp_avg_sq")} for n, w in dense.items()
    }
    assert oialr.step() is True
    for name, layer in oialr._managed.items():
        old = moments[name]
        U, V = layer.U.detach(), layer.V.detach()
        state = opt.state[layer.S]
        torch.testing.assert_close(state["exp_avg"], U.T @ old["exp_avg"] @ V)
        torch.testing.assert_close(state["exp_avg_sq"], (U * U).T @ old["exp_avg_sq"] @ (V * V))
        assert state["step"] == 4


@pytest.mark.parametrize("mode", ["rotate", "slice", "reset"])
def test_state_modes_on_truncation(mode):
    model, opt, oialr, data = _setup("mlp", cutoff=0.9, frequency=100, state_mode=mode)
    _train(model, opt, oialr, data, 6)
    cores = {n: layer.S for n, layer in oialr._managed.items()}
    old = {n: {k: v.clone() for k, v in opt.state[S].items()} for n, S in cores.items()}
    svds = {n: torch.linalg.svd(S.detach()) for n, S in cores.items()}
    assert oialr._update(oialr.steps) is True
    for name, layer in oialr._managed.items():
        k = layer.rank
        assert k < cores[name].shape[0]
        assert layer.S is not cores[name] and cores[name] not in opt.state
        assert sum(p is layer.S for p in _optimized(opt)) == 1
        state = opt.state.get(layer.S)
        if mode == "reset":
            assert state is None
            continue
        assert state["exp_avg"].shape == (k, k) and state["step"] == old[name]["step"]
        if mode == "slice":
            torch.testing.assert_close(state["exp_avg_sq"], old[name]["exp_avg_sq"][:k, :k])
        else:
            P, _, Qh = svds[name]
            P, Q = P[:, :k].double(), Qh.mT[:, :k].double()
            torch.testing.assert_close(state["exp_avg"], P.T @ old[name]["exp_avg"] @ Q)
    _train(model, opt, oialr, data, 2, start=6)  # the optimizer runs on the new parameters


def test_rotate_refuses_an_unknown_state_before_changing_anything():
    model, opt, oialr, data = _setup("mlp", optimizer=lambda p: torch.optim.Rprop(p), delay=3)
    _train(model, opt, oialr, data, 2)
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="step_size.*state_mode='slice' or 'reset'"):
        _train(model, opt, oialr, data, 1, start=2)
    assert not oialr.converted and oialr.steps == 2
    assert isinstance(model[0], nn.Linear) and model.state_dict().keys() == state.keys()
    # slice and reset need no transform of the state
    model, opt, oialr, data = _setup(
        "mlp", optimizer=lambda p: torch.optim.Rprop(p), state_mode="slice", frequency=2
    )
    _train(model, opt, oialr, data, 8)


def test_nan_core_is_refused_and_nothing_changes():
    model, opt, oialr, data = _setup("mlp", frequency=2)
    _train(model, opt, oialr, data, 3)
    layer = oialr._managed["2"]
    with torch.no_grad():
        layer.S[0, 1] = float("nan")
    snapshot = {n: p.clone() for n, p in model.named_parameters()}
    steps, history = oialr.steps, list(oialr.history)
    with pytest.raises(RuntimeError, match="'2' holds NaN"):
        oialr.step()
    assert oialr.steps == steps and oialr.history == history
    for name, p in model.named_parameters():
        assert torch.equal(p, snapshot[name]) or (name == "2.S" and p.isnan().sum() == 1)


def test_bad_arguments_name_themselves():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cases = [
        ({"delay": -1}, "'delay'"),
        ({"frequency": 0}, "'frequency'"),
        ({"cutoff": 1.0}, "'cutoff'"),
        ({"max_drop": 1.5}, "'max_drop'"),
        ({"min_rank": 0}, "'min_rank'"),
        ({"state_mode": "moments"}, "'state_mode'"),
        ({"target_modules": ["nothing"]}, "'target_modules'"),
        ({"exclude_modules": r"\d"}, "no module to train"),
        ({"keep_last_dense": False, "target_modules": ["0"]}, "'keep_last_dense'"),
    ]
    for extra, message in cases:
        with pytest.raises(ValueError, match=message):
            OIALR(model, opt, **({"delay": 1, "frequency": 1} | extra))
    with pytest.raises(TypeError, match="'optimizer'"):
        OIALR(model, object(), delay=1, frequency=1)
    with pytest.raises(TypeError, match="'model'"):
        OIALR(object(), opt, delay=1, frequency=1)
    diag = nn.Sequential(LowRankLinear(4, 4, 2), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="core='full'.*'0' has core='diag'"):
        OIALR(diag, torch.optim.SGD(diag.parameters(), lr=0.1), delay=0, frequency=1)


def test_keep_last_dense_false_converts_the_head_and_adopts_full_core_layers():
    model = nn.Sequential(LowRankLinear(6, 8, 4, core="full"), nn.ReLU(), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    oialr = OIALR(model, opt, delay=0, frequency=1, keep_last_dense=False)
    assert oialr.ranks() == {"0": 4, "2": 3}
    assert {id(p) for p in _optimized(opt)} == {
        id(p) for p in model.parameters() if p.requires_grad
    }


def test_a_low_rank_attention_module_is_adopted_with_its_projections():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    attention = LowRankMultiheadAttention(8, 2, rank=8, core="full")
    opt = torch.optim.SGD([*model.parameters(), *attention.parameters()], lr=0.1)
    holder = nn.ModuleDict({"mlp": model, "attn": attention})
    oialr = OIALR(holder, opt, delay=0, frequency=1)
    assert oialr.ranks() == {"mlp.0": 8, "attn.in_proj": 8, "attn.out_proj": 8}
    assert not attention.in_proj.U.requires_grad
    assert all(p is not attention.in_proj.U for p in _optimized(opt))


# -------------------------------------------------------------------- checkpoints

RESUME_SCRIPT = r"""
import sys, torch
from torch import nn
sys.path.insert(0, {tests!r})
from test_oialr import _setup, _train

torch.set_num_threads(1)
mode, path = sys.argv[1], sys.argv[2]
model, opt, oialr, data = _setup("cnn", torch.float32, delay=2, frequency=2, cutoff=0.3)
if mode == "save":
    _, changes = _train(model, opt, oialr, data, 4)
    assert changes[-1] and oialr.history[-1]["step"] == 4, (changes, oialr.history)  # a prune
    torch.save({{"model": model.state_dict(), "optimizer": opt.state_dict(),
                "oialr": oialr.state_dict()}}, path)
else:
    checkpoint = torch.load(path)
    oialr.load_state_dict(checkpoint["oialr"])
    model.load_state_dict(checkpoint["model"])
    opt.load_state_dict(checkpoint["optimizer"])
losses, _ = _train(model, opt, oialr, data, 3, start=4)  # through the next update
print([float(loss).hex() for loss in losses], oialr.ranks())
"""


def test_resume_in_a_fresh_process_is_bit_identical(tmp_path):
    script = tmp_path / "resume.py"
    script.write_text(RESUME_SCRIPT.format(tests=str(Path(__file__).parent)))
    checkpoint = tmp_path / "checkpoint.pt"
    outputs = []
    for mode in ("save", "resume"):
        run = subprocess.run(
            [sys.executable, str(script), mode, str(checkpoint)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert run.returncode == 0, run.stderr
        outputs.append(run.stdout.strip())
    assert outputs[0] == outputs[1]
    assert "'0': 6" not in outputs[0]  # the first conv (6 = full rank) was pruned


def _saved(kind="mlp", steps=6, **kwargs):
    model, opt, oialr, data = _setup(kind, frequency=2, cutoff=0.5, **kwargs)
    _train(model, opt, oialr, data, steps)
    return {
        "model": copy.deepcopy(model.state_dict()),
        "optimizer": copy.deepcopy(opt.state_dict()),
        "oialr": copy.deepcopy(oialr.state_dict()),
    }, oialr


def test_checkpoint_roundtrip_in_process_and_mismatches_are_refused():
    saved, original = _saved()
    assert saved["oialr"]["ranks"] == original.ranks()
    assert any(r < 20 for r in original.ranks().values())
    model, opt, oialr, data = _setup("mlp", frequency=2, cutoff=0.5)
    oialr.load_state_dict(saved["oialr"])
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optimizer"])
    assert oialr.ranks() == original.ranks() and oialr.steps == 6
    assert oialr.history == original.history
    _train(model, opt, oialr, data, 3, start=6)

    def refused(state, message, **kwargs):
        model, opt, oialr, _ = _setup("mlp", **({"frequency": 2, "cutoff": 0.5} | kwargs))
        before = copy.deepcopy(model.state_dict())
        with pytest.raises(ValueError, match=message):
            oialr.load_state_dict(state)
        assert not oialr.converted and oialr.steps == 0
        assert all(isinstance(model[i], nn.Linear) for i in (0, 2))
        for name, tensor in model.state_dict().items():
            assert torch.equal(tensor, before[name])

    state = saved["oialr"]
    refused(state, "other settings.*cutoff", cutoff=0.4)
    refused(state, "other settings.*state_mode", state_mode="reset")
    refused(state | {"ranks": {"0": 3}}, "layers differ.*only in the model: \\['2'\\]")
    refused(state | {"ranks": {"0": 3, "2": 99}}, "rank 99 for '2' is outside \\[1, 20\\]")
    refused(state | {"steps": 1}, "'converted'=True disagrees with steps=1")
    refused(state | {"version": 7}, "version 7")
    refused({"steps": 3}, "not an OIALR state")
    refused([1, 2], "expected a dict")
    refused(state | {"history": [1]}, "'history'")

    # A dense-phase checkpoint cannot go into an OIALR that has converted.
    early, _ = _saved(steps=1)
    with pytest.raises(ValueError, match="before conversion"):
        original.load_state_dict(early["oialr"])


def test_checkpoint_of_attention_and_conv_models(tmp_path):
    for kind in ("attention", "attention_kdim", "cnn"):
        saved, original = _saved(kind, steps=7)
        model, opt, oialr, data = _setup(kind, frequency=2, cutoff=0.5)
        oialr.load_state_dict(saved["oialr"])
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        assert oialr.ranks() == original.ranks()
        _train(model, opt, oialr, data, 2, start=7)


# -------------------------------------------------------------------- torch.compile


def test_compile_recompiles_at_most_once_per_change():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    model, opt, oialr, data = _setup("mlp", torch.float32, delay=2, frequency=2, cutoff=0.8)
    compiled = torch.compile(model, backend=counter)
    _, changes = _train(compiled, opt, oialr, data, 14)
    events = sum(changes)
    assert events >= 3 and oialr.converted
    # one compile of the dense model, then at most one per change of shapes
    print(f"{counter.frame_count} compiles, {events} changes of shapes")
    assert 1 <= counter.frame_count <= 1 + events, (counter.frame_count, events)
    torch._dynamo.reset()


def test_oialr_accepts_wrapped_models():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    oialr = OIALR(torch.compile(model), opt, delay=0, frequency=1)
    assert oialr.model is model and isinstance(model[0], LowRankLinear)


def test_rank_history_figure(tmp_path):
    from lowrank_ext.plots.oialr import plot_rank_history

    model, opt, oialr, data = _setup(cutoff=0.6)
    _train(model, opt, oialr, data, 11)
    assert len(oialr.history) >= 3 and oialr.history[0]["step"] == 2
    figure = plot_rank_history(
        {"mlp": oialr.history, "again": oialr.history},
        tmp_path / "ranks.png",
        end_steps={"mlp": 11},
        label=lambda name: f"layer {name}",
    )
    assert (tmp_path / "ranks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    first, second = figure.axes
    assert [first.get_title(), second.get_title()] == ["mlp", "again"]
    lines = first.get_lines()
    full = oialr.history[0]["ranks"]
    assert [line.get_label() for line in lines[:-1]] == [
        f"layer {n} (full {r})" for n, r in full.items()
    ]
    assert lines[-1].get_label() == "conversion" and list(lines[-1].get_xdata()) == [2, 2]
    steps = [0] + [entry["step"] for entry in oialr.history]
    assert list(lines[0].get_xdata()) == [*steps, 11]
    assert list(second.get_lines()[0].get_xdata()) == [
        *steps,
        steps[-1],
    ]  # default end: last update
    ranks = [entry["ranks"]["0"] for entry in oialr.history]
    assert list(lines[0].get_ydata()) == [ranks[0], *ranks, ranks[-1]]
    with pytest.raises(ValueError, match="non-empty OIALR.history"):
        plot_rank_history({"before conversion": []})
    with pytest.raises(ValueError, match="non-empty mapping"):
        plot_rank_history(oialr.history)
