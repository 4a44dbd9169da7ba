"""`lowrank-ext analyze`: real checkpoints (torch and safetensors), the demo, and files it must
refuse with a message and a non-zero exit: corrupt, empty, pickled code (never executed)."""

import csv
import io
import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from lowrank_ext import LowRankLinear, cli, spectral

SCRIPT = Path(sys.executable).with_name("lowrank-ext")


class CreatesFile:
    """Unpickling this runs open(marker, "w"): the side effect the CLI must never cause."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def trained_model():
    """A small MLP fitted for a few steps (a real checkpoint, not fresh init), with a planted
    rank-4 layer and a LowRankLinear."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), LowRankLinear(32, 16, rank=3)
    )
    x, y = torch.randn(256, 8), torch.randn(256, 16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(20):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    left, right = torch.linalg.qr(torch.randn(32, 4))[0], torch.linalg.qr(torch.randn(32, 4))[0]
    with torch.no_grad():
        model[2].weight.copy_(left @ right.T)
    return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = trained_model()
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    torch.save(model.state_dict(), path)
    return path, model


def run(argv, capsys):
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_table_of_a_saved_checkpoint(checkpoint, capsys):
    path, model = checkpoint
    code, out, err = run(["analyze", str(path)], capsys)
    assert code == 0 and err == ""
    table, summary = out.split("\n\n")
    lines = table.splitlines()
    assert lines[0].startswith("| layer") and len(lines) == 2 + 3
    rows = {line.split("|")[1].strip(): line for line in lines[2:5]}
    assert list(rows) == ["0", "2", "4"]
    assert "yes (88%)" in rows["2"] and "no (0%)" in rows["0"]
    # The summary, wrapped at 120 characters like the table.
    assert max(len(line) for line in out.splitlines()) <= 120
    assert " ".join(summary.split()) == " ".join(
        f"{path}: {spectral.analyze(model.state_dict()).summary()}".split()
    )


def test_json_and_csv_match_the_python_api(checkpoint, capsys):
    path, model = checkpoint
    expected = spectral.analyze(model)
    code, out, _ = run(["analyze", str(path), "--format", "json"], capsys)
    assert code == 0
    layers = {layer["name"]: layer for layer in json.loads(out)["layers"]}
    for row in expected:
        assert layers[row.name]["hard_rank"] == row.hard_rank
        assert layers[row.name]["sigma_max"] == pytest.approx(row.sigma_max, rel=1e-12)
    assert layers["4"]["factored"] and layers["2"]["hard_rank"] == 4
    code, out, _ = run(["analyze", str(path), "--format", "csv"], capsys)
    parsed = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and [r["name"] for r in parsed] == ["0", "2", "4"]  # the model's order
    assert [int(r["numerical_rank"]) for r in parsed] == [8, 4, 3]


def test_tolerance_options_reach_the_analysis(checkpoint, capsys):
    path, model = checkpoint
    options = [
        (["--rtol", "0.5"], {"rtol": 0.5}),
        (["--atol", "0.9"], {"atol": 0.9}),
        (["--rtol", "0.5", "--collapse-fraction", "0.9"], {"rtol": 0.5, "collapse_fraction": 0.9}),
    ]
    for flags, kwargs in options:
        _, out, _ = run(["analyze", str(path), "--format", "json", *flags], capsys)
        document = json.loads(out)
        expected = spectral.analyze(model.state_dict(), **kwargs)
        assert document["settings"]["rule"] == expected.rule()
        got = [(layer["hard_rank"], layer["collapsed"]) for layer in document["layers"]]
        assert got == [(row.hard_rank, row.collapsed) for row in expected]
    # The options change the verdicts: both cut into the trained layer "0" (σ from 1.7 to 0.58).
    assert spectral.analyze(model.state_dict())["0"].hard_rank == 8
    assert spectral.analyze(model.state_dict(), rtol=0.5)["0"].hard_rank == 5
    assert spectral.analyze(model.state_dict(), atol=0.9)["0"].hard_rank == 5
    code, _, err = run(["analyze", str(path), "--rtol", "-1"], capsys)
    assert code == 1 and "argument 'rtol' must be a number in [0, 1)" in err


def test_safetensors_checkpoint(tmp_path, checkpoint, capsys):
    from safetensors.torch import save_file

    _, model = checkpoint
    tensors = {k: v for k, v in model.state_dict().items() if torch.is_tensor(v)}
    for name in ("model.safetensors", "model.bin"):  # recognised by suffix or by content
        save_file(tensors, tmp_path / name)
        code, out, _ = run(["analyze", str(tmp_path / name), "--format", "json"], capsys)
        assert code == 0
        assert [layer["name"] for layer in json.loads(out)["layers"]] == ["0", "2", "4"]


def test_single_tensor_file(tmp_path, capsys):
    torch.save(torch.eye(5), tmp_path / "eye.pt")
    code, out, _ = run(["analyze", str(tmp_path / "eye.pt"), "--format", "csv"], capsys)
    row = next(csv.DictReader(io.StringIO(out)))
    assert code == 0 and row["name"] == "eye" and row["hard_rank"] == "5"


def test_demo(capsys, tmp_path):
    code, out, _ = run(["analyze", "--demo", "--plot", str(tmp_path)], capsys)
    assert code == 0
    rows = {line.split("|")[1].strip(): line for line in out.splitlines()[2:7]}
    assert list(rows) == ["conv", "fc1", "fc2", "fc3", "head"]
    assert "yes (88%)" in rows["fc2"] and "4 (USVᵀ)" in rows["fc3"]
    assert out.split("\n\n")[1].startswith("demo model: 5 layers, 1 collapsed: fc2")
    assert sorted(p.name for p in tmp_path.rglob("*.png")) == sorted(
        ["sigma_min_histogram.png", "spectra.png", *(f"{n}.png" for n in rows)]
    )
    # Deterministic, and the caller's random stream is left alone.
    state = torch.random.get_rng_state()
    first, second = cli.demo_model(), cli.demo_model()
    assert torch.equal(torch.random.get_rng_state(), state)
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert not torch.is_tensor(a) or torch.equal(a, b)


def test_pickled_callable_is_refused_and_never_run(tmp_path, capsys):
    marker = tmp_path / "side_effect"
    # The payload is live: a plain unpickler runs it.
    pickle.loads(pickle.dumps(CreatesFile(marker)))
    assert marker.exists()
    marker.unlink()
    torch.save({"weight": torch.eye(3), "hook": CreatesFile(marker)}, tmp_path / "zip.pt")
    with (tmp_path / "raw.pkl").open("wb") as file:
        pickle.dump({"weight": CreatesFile(marker)}, file, protocol=4)
    for name in ("zip.pt", "raw.pkl"):
        code, out, err = run(["analyze", str(tmp_path / name)], capsys)
        assert code == 1 and out == ""
        assert f"refused to load {tmp_path / name}: it holds pickled Python code" in err
        assert "never executes" in err
        assert not marker.exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "is empty (0 bytes)"),
        (b"\x80\x02}q\x00X\x01\x00\x00\x00aq\x01" + bytes(range(200)), "cannot read"),
        (b"this is not a checkpoint\n", "cannot read"),
        ((20).to_bytes(8, "little") + b"{" + b"x" * 50, "as safetensors"),
    ],
    ids=["empty", "corrupt-pickle", "text", "safetensors-header"],
)
def test_unreadable_files(tmp_path, capsys, content, message):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    code, out, err = run(["analyze", str(path)], capsys)
    assert code == 1 and out == ""
    assert err.startswith("lowrank-ext analyze: ") and message in err


def test_truncated_checkpoint(tmp_path, checkpoint, capsys):
    data = checkpoint[0].read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    code, _, err = run(["analyze", str(tmp_path / "cut.pt")], capsys)
    assert code == 1 and "not a PyTorch checkpoint or a corrupt one" in err


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({}, "the state_dict is empty"),
        ({"bias": torch.zeros(3), "step": 7}, "holds no weight matrix"),
        ([torch.eye(3)], "holds a list, not a state_dict or a tensor"),
        ({"w": torch.tensor([[1.0, float("nan")], [0.0, 1.0]])}, "layer 'w' has non-finite"),
    ],
    ids=["empty-state-dict", "no-matrices", "list", "nan"],
)
def test_checkpoints_without_an_analysable_matrix(tmp_path, capsys, payload, message):
    torch.save(payload, tmp_path / "x.pt")
    code, out, err = run(["analyze", str(tmp_path / "x.pt")], capsys)
    assert code == 1 and out == "" and message in err


def test_missing_file_and_usage_errors(tmp_path, capsys):
    code, _, err = run(["analyze", str(tmp_path / "nope.pt")], capsys)
    assert code == 1 and "no such file" in err
    for argv in (["analyze"], ["analyze", "x.pt", "--demo"], ["analyze", "--demo", "--format=x"]):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        assert exit_info.value.code == 2
    assert "give a checkpoint PATH or --demo" in capsys.readouterr().err


def test_console_script(checkpoint):
    if not SCRIPT.exists():
        pytest.fail(f"console script {SCRIPT} is not installed; reinstall the package")
    result = subprocess.run(
        [str(SCRIPT), "analyze", str(checkpoint[0]), "--format", "json"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)["layers"]) == 3
    refused = subprocess.run(
        [str(SCRIPT), "analyze", str(checkpoint[0].with_name("missing.pt"))],
        capture_output=True,
        text=True,
    )
    assert refused.returncode == 1 and "no such file" in refused.stderr
