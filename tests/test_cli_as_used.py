"""`lowrank-ext analyze` as people use it (issue 17, item 6): Hugging Face model folders (one
file or sharded), pickled callables named in every container, a table that fits 120 columns
with every column explained, factored layers displayed consistently, rows in model order,
--plot into a new folder, --rtol with --atol, --version."""

import csv
import io
import json
import os
import pickle
import re

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from lowrank_ext import LowRankLinear, cli, spectral
from lowrank_ext.analysis.report import COMPACT_COLUMNS, TABLE_COLUMNS
from lowrank_ext.version import __version__


def run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


class Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.self_attention_query_key_value_input_projection_of_all_heads = nn.Linear(width, width)
        self.feed_forward_down_projection = nn.Linear(2 * width, width)


def hf_like_model():
    """12 blocks with long names (layers.2 before layers.10 in model order), a factored layer
    between them and a planted rank-3 matrix: a model whose names make the table wide."""
    torch.manual_seed(0)
    model = nn.Module()
    model.embed_tokens = nn.Embedding(50, 16)
    model.layers = nn.ModuleList(Block(16) for _ in range(12))
    model.bottleneck = LowRankLinear(16, 24, rank=4)
    model.lm_head = nn.Linear(16, 50, bias=False)
    with torch.no_grad():
        left, right = torch.linalg.qr(torch.randn(16, 3))[0], torch.linalg.qr(torch.randn(32, 3))[0]
        model.layers[10].feed_forward_down_projection.weight.copy_(left @ right.T)
    return model


def layer_names(state_dict):
    """The rows analyze makes of a state_dict, in its order."""
    return [row.name for row in spectral.analyze(state_dict)]


def json_rows(out):
    return json.loads(out)["layers"]


# ---- folders ----------------------------------------------------------------------------------


def tensors_of(model):
    return {k: v.contiguous() for k, v in model.state_dict().items() if torch.is_tensor(v)}


def test_folder_with_model_safetensors_and_pytorch_model_bin(tmp_path, capsys):
    model = hf_like_model()
    expected = spectral.analyze(model.state_dict())
    for name, save in (
        ("model.safetensors", lambda d, p: save_file(d, p, metadata={"format": "pt"})),
        ("pytorch_model.bin", torch.save),
    ):
        folder = tmp_path / name.split(".")[1]
        folder.mkdir()
        save(tensors_of(model), folder / name)
        (folder / "config.json").write_text("{}")
        code, out, err = run(["analyze", folder, "--format", "json"], capsys)
        assert code == 0, err
        rows = {row["name"]: row for row in json_rows(out)}
        assert set(rows) == {row.name for row in expected}
        for row in expected:
            assert rows[row.name]["hard_rank"] == row.hard_rank
            assert rows[row.name]["sigma_max"] == pytest.approx(row.sigma_max, rel=1e-12)
        assert rows["layers.10.feed_forward_down_projection"]["hard_rank"] == 3
        assert rows["bottleneck"]["factored"] and rows["bottleneck"]["full_rank"] == 4


def write_shards(folder, tensors, kind):
    """Split like save_pretrained: consecutive keys into shards, an index whose weight_map is
    sorted by key (as transformers writes it)."""
    keys = list(tensors)
    parts = [
        keys[: len(keys) // 3],
        keys[len(keys) // 3 : 2 * len(keys) // 3],
        keys[2 * len(keys) // 3 :],
    ]
    weight_map = {}
    for i, part in enumerate(parts, 1):
        if kind == "safetensors":
            shard = f"model-{i:05d}-of-00003.safetensors"
            save_file({k: tensors[k] for k in part}, folder / shard, metadata={"format": "pt"})
        else:
            shard = f"pytorch_model-{i:05d}-of-00003.bin"
            torch.save({k: tensors[k] for k in part}, folder / shard)
        weight_map.update(dict.fromkeys(part, shard))
    index = folder / (
        "model.safetensors.index.json" if kind == "safetensors" else "pytorch_model.bin.index.json"
    )
    index.write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}, sort_keys=True)
    )
    return index, weight_map


@pytest.mark.parametrize("kind", ["safetensors", "bin"])
def test_sharded_folder(tmp_path, capsys, kind):
    model = hf_like_model()
    tensors = tensors_of(model)
    index, weight_map = write_shards(tmp_path, tensors, kind)
    code, out, err = run(["analyze", tmp_path, "--format", "json"], capsys)
    assert code == 0, err
    rows = json_rows(out)
    expected = spectral.analyze(model.state_dict())
    assert sorted(r["name"] for r in rows) == sorted(r.name for r in expected)
    for parsed in rows:
        assert parsed["hard_rank"] == expected[parsed["name"]].hard_rank
    names = [r["name"] for r in rows]
    if kind == "bin":
        assert names == [r.name for r in expected]  # shards in order: the model's order
    else:
        assert names.index("layers.2.feed_forward_down_projection") < names.index(
            "layers.10.feed_forward_down_projection"
        )
    # A shard the index names but the folder lacks, a tensor no shard holds, a broken index.
    first = sorted(set(weight_map.values()))[0]
    (tmp_path / first).rename(tmp_path / "moved")
    code, out, err = run(["analyze", tmp_path], capsys)
    assert code == 1 and out == "" and f"names the shard {first}, which is missing" in err
    (tmp_path / "moved").rename(tmp_path / first)
    index.write_text(json.dumps({"weight_map": {**weight_map, "ghost.weight": first}}))
    code, _, err = run(["analyze", tmp_path], capsys)
    assert code == 1 and "lists 1 tensor(s) that no shard holds, e.g. 'ghost.weight'" in err
    index.write_text("{not json")
    code, _, err = run(["analyze", tmp_path], capsys)
    assert code == 1 and f"cannot read {index} as a checkpoint index" in err
    index.write_text(json.dumps({"weight_map": {"a.weight": "../outside.bin"}}))
    code, _, err = run(["analyze", tmp_path], capsys)
    assert code == 1 and "names a shard outside its folder: '../outside.bin'" in err


def test_folder_without_a_checkpoint(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    code, out, err = run(["analyze", tmp_path], capsys)
    assert code == 1 and out == ""
    assert f"{tmp_path} is a folder without a checkpoint" in err
    assert "model.safetensors, model.safetensors.index.json, pytorch_model.bin" in err
    assert "found config.json" in err
    code, _, err = run(["analyze", tmp_path / "missing"], capsys)
    assert code == 1 and f"no such file or folder: {tmp_path / 'missing'}" in err


# ---- pickled callables are named, whatever the container ---------------------------------------


class RunsCommand:
    """Unpickling this calls os.system(command): what the CLI must name and never run."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_os_system_is_named_in_a_zip_a_legacy_file_and_plain_pickles(tmp_path, capsys):
    marker = tmp_path / "ran"
    payload = RunsCommand(f"touch {marker}")
    callable_name = f"{os.system.__module__}.system"  # posix.system on Linux
    files = {
        "zip.pt": lambda p: torch.save({"w": torch.eye(2), "x": payload}, p),
        "legacy.pt": lambda p: torch.save(
            {"w": torch.eye(2), "x": payload}, p, _use_new_zipfile_serialization=False
        ),
    }
    for protocol in (2, 4, 5):
        files[f"plain{protocol}.pkl"] = lambda p, protocol=protocol: p.write_bytes(
            pickle.dumps({"x": payload}, protocol=protocol)
        )
    for name, write in files.items():
        write(tmp_path / name)
        code, out, err = run(["analyze", tmp_path / name], capsys)
        assert code == 1 and out == "", name
        assert f"refused to load {tmp_path / name}: it holds pickled Python code" in err, name
        # Named, and alone: the tensors' own rebuild functions are allowed and not listed.
        assert f"({callable_name})" in err, (name, err)
        assert not marker.exists()


def test_several_callables_are_all_named(tmp_path, capsys):
    torch.save({"a": RunsCommand("true"), "b": print, "w": torch.eye(2)}, tmp_path / "two.pt")
    code, _, err = run(["analyze", tmp_path / "two.pt"], capsys)
    assert code == 1
    named = re.search(r"pickled Python code or objects \((.+?)\)", err).group(1).split(", ")
    assert set(named) == {f"{os.system.__module__}.system", "builtins.print"}


# ---- the table: 120 columns, every column explained -------------------------------------------


def table_rows(out):
    """The table's cells by header: {header: [cell per row]}, and the table lines."""
    lines = [line for line in out.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]
    return header, rows, lines


def test_default_table_fits_120_columns_and_its_numbers_are_the_reports(tmp_path, capsys):
    model = hf_like_model()
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    code, out, _ = run(["analyze", path], capsys)
    assert code == 0
    assert max(len(line) for line in out.splitlines()) <= 120
    header, rows, lines = table_rows(out)
    headers = {column.key: column.header for column in TABLE_COLUMNS}
    assert header == [headers[key] for key in COMPACT_COLUMNS]
    report = spectral.analyze(model.state_dict())
    assert len(rows) == len(report)
    for cells, row in zip(rows, report):
        cell = dict(zip(COMPACT_COLUMNS, cells))
        # Long names are shortened in the middle, keeping both ends.
        if len(row.name) <= len(cell["name"]):
            assert cell["name"] == row.name
        else:
            start, end = cell["name"].split("…")
            assert row.name.startswith(start) and row.name.endswith(end) and len(start) >= 5
        assert cell["shape"] == f"{row.shape[0]}×{row.shape[1]}"
        assert float(cell["sigma_max"]) == pytest.approx(row.sigma_max, rel=1e-3)
        assert float(cell["sigma_min"]) == pytest.approx(row.sigma_min, rel=1e-3)
        assert int(cell["hard_rank"]) == row.hard_rank
        assert cell["collapsed"].startswith("yes" if row.collapsed else "no")
    assert any("…" in cells[0] for cells in rows)  # the long names did need shortening


def test_wide_and_columns(tmp_path, capsys):
    model = hf_like_model()
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    report = spectral.analyze(model.state_dict())
    code, out, _ = run(["analyze", path, "--wide"], capsys)
    header, rows, lines = table_rows(out)
    assert code == 0 and header == [column.header for column in TABLE_COLUMNS]
    assert [cells[0] for cells in rows] == [row.name for row in report]  # full names
    assert max(len(line) for line in lines) > 120
    for cells, row in zip(rows, report):
        assert int(cells[header.index("σ>MP")]) == row.above_mp_edge
        assert float(cells[header.index("Q")]) == pytest.approx(row.aspect_ratio, rel=1e-3)
    code, out, _ = run(["analyze", path, "--columns", "name,numerical_rank,mp_edge"], capsys)
    header, rows, _ = table_rows(out)
    assert code == 0 and header == ["layer", "num. rank", "MP edge"]
    assert [int(cells[1]) for cells in rows] == [row.numerical_rank for row in report]
    for argv, message in (
        (["--columns", "name,bogus"], "unknown column(s) 'bogus'; known: name, kind"),
        (["--columns", ","], "name at least one column"),
        (["--wide", "--format", "json"], "--wide and --columns shape the table"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["analyze", str(path), *argv])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_help_explains_every_column(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["analyze", "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    for column in TABLE_COLUMNS:
        assert f"{column.key} ({column.header}): " in out, column.key
        assert len(column.meaning) > 10
    flat = " ".join(out.split())
    for words in (
        "aspect ratio max(N, M)/min(N, M)",
        "σ_r for a factored layer",
        "#σ above the MP",
    ):
        assert words in flat
    assert "--wide" in out and "--columns" in out and "max(rtol·σ_max, atol)" in flat


def test_report_to_markdown_column_errors():
    report = spectral.analyze(torch.eye(3))
    with pytest.raises(ValueError, match="unknown column"):
        report.to_markdown(["name", "nope"])
    with pytest.raises(ValueError, match="'columns' is empty"):
        report.to_markdown([])


# ---- factored layers: σ_min and cond over the rank they hold -----------------------------------


def test_factored_sigma_min_and_cond_are_over_the_rank(tmp_path, capsys):
    torch.manual_seed(0)
    layer = LowRankLinear(40, 30, rank=5)
    with torch.no_grad():
        layer.S.copy_(torch.tensor([4.0, 3.0, 2.0, 1.0, 0.5]))
    row = spectral.analyze(layer)[0]
    sigma = row.singular_values
    assert (sigma[5:] == 0).all() and row.full_rank == 5
    assert row.sigma_min == pytest.approx(0.5, rel=1e-5) == pytest.approx(float(sigma[4]))
    assert row.condition_number == pytest.approx(8.0, rel=1e-5)
    assert not row.collapsed
    # A factored layer that did collapse inside its rank shows it the same way.
    with torch.no_grad():
        layer.S.copy_(torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0]))
    row = spectral.analyze(layer)[0]
    assert row.sigma_min == 0 and row.condition_number == float("inf") and row.collapsed
    torch.save({"f.U": layer.U, "f.S": layer.S, "f.V": layer.V}, tmp_path / "f.pt")
    code, out, _ = run(["analyze", tmp_path / "f.pt"], capsys)
    _, rows, _ = table_rows(out)
    assert code == 0 and rows[0][COMPACT_COLUMNS.index("sigma_min")] == "0"
    assert rows[0][-1] == "yes (20%)"


# ---- rows in model order ----------------------------------------------------------------------


def test_rows_keep_the_checkpoint_order(tmp_path, capsys):
    model = hf_like_model()
    torch.save(model.state_dict(), tmp_path / "model.pt")
    code, out, _ = run(["analyze", tmp_path / "model.pt", "--format", "csv"], capsys)
    names = [row["name"] for row in csv.DictReader(io.StringIO(out))]
    in_model = [
        "embed_tokens",
        *(
            f"layers.{i}.{p}"
            for i in range(12)
            for p in (
                "self_attention_query_key_value_input_projection_of_all_heads",
                "feed_forward_down_projection",
            )
        ),
        "bottleneck",
        "lm_head",
    ]
    assert code == 0 and names == in_model  # the factored layer where it is, not first
    # safetensors writes its header sorted by dtype and name: rows come in natural order.
    save_file(tensors_of(model), tmp_path / "model.safetensors")
    code, out, _ = run(["analyze", tmp_path / "model.safetensors", "--format", "csv"], capsys)
    names = [row["name"] for row in csv.DictReader(io.StringIO(out))]
    layers = [n for n in names if n.startswith("layers.")]
    assert [int(n.split(".")[1]) for n in layers] == sorted(int(n.split(".")[1]) for n in layers)
    assert names == sorted(names, key=cli._natural_key) and set(names) == set(in_model)
    assert cli._natural_key("layers.2.fc") < cli._natural_key("layers.10.fc")


# ---- --plot, --rtol with --atol, --version ----------------------------------------------------


def test_plot_into_a_missing_folder_creates_it(tmp_path, capsys):
    target = tmp_path / "new" / "nested"
    code, _, err = run(["analyze", "--demo", "--plot", target], capsys)
    assert code == 0, err
    assert (target / "spectra.png").read_bytes()[:4] == b"\x89PNG"
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["analyze", "--demo", "--plot", str(tmp_path / "file.txt")])
    assert exit_info.value.code == 2 and "not a folder" in capsys.readouterr().err
    code, out, err = run(["analyze", "--demo", "--plot", tmp_path / "file.txt" / "sub"], capsys)
    assert code == 1 and out == ""
    assert f"cannot write the figures to {tmp_path / 'file.txt' / 'sub'}" in err


def test_rtol_and_atol_together_take_the_larger_tolerance(tmp_path, capsys):
    torch.manual_seed(0)
    sigma = torch.logspace(0, -4, 20, dtype=torch.float64)  # 1 … 1e-4
    left, right = (
        torch.linalg.qr(torch.randn(30, 20, dtype=torch.float64))[0],
        torch.linalg.qr(torch.randn(20, 20, dtype=torch.float64))[0],
    )
    torch.save({"w": left @ torch.diag(sigma) @ right.T}, tmp_path / "w.pt")

    def hard_rank(*flags):
        code, out, _ = run(["analyze", tmp_path / "w.pt", "--format", "json", *flags], capsys)
        assert code == 0
        document = json.loads(out)
        return document["layers"][0]["hard_rank"], document["settings"]

    expected = {tol: int((sigma > tol).sum()) for tol in (1e-1, 1e-2, 1e-3)}
    assert hard_rank()[0] == expected[1e-3]  # default rtol 1e-3
    assert hard_rank("--atol", "1e-2")[0] == expected[1e-2]  # atol alone: no rtol
    assert hard_rank("--rtol", "1e-1", "--atol", "1e-2")[0] == expected[1e-1]  # rtol larger
    rank, settings = hard_rank("--rtol", "1e-3", "--atol", "1e-2")  # atol larger
    assert rank == expected[1e-2]
    assert settings["rtol"] == 1e-3 and settings["atol"] == 1e-2
    assert "max(0.001·σ_max, 0.01, numerical tolerance)" in settings["rule"]
    # The Python API agrees.
    both = spectral.analyze(left @ torch.diag(sigma) @ right.T, rtol=1e-1, atol=1e-2)
    assert both[0].hard_rank == expected[1e-1] and both.atol == 1e-2


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"lowrank-ext {__version__}"
