"""to_plain where lowrank_ext is absent: a mixed model and transformers models pickled and run
in a subprocess that never imports lowrank_ext, a state dict loaded into the architecture rebuilt
from torch classes, and the ONNX export run in onnxruntime.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_to_plain import F64, TOL, assert_plain
from torch import nn

import lowrank_ext
from lowrank_ext import LowRankConv2d, LowRankLinear, LowRankMultiheadAttention, convert, to_plain

ROOT = Path(__file__).resolve().parents[1]


MIXED_ARCHITECTURE = """
from torch import nn


def build():
    # The plain form of tests/test_to_plain_export.py's _mixed(), written with torch classes only.
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    layer.linear1 = nn.Sequential(nn.Linear(16, 6, bias=False), nn.Linear(6, 32))
    layer.linear2 = nn.Sequential(nn.Linear(32, 4, bias=False), nn.Linear(4, 16))
    layer.activation_relu_or_gelu = 0
    return nn.Sequential(
        nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect", bias=False), nn.Conv2d(4, 8, 1)
        ),
        nn.ReLU(),
        nn.Sequential(nn.Conv2d(8, 4, 3, stride=2, padding=1, bias=False), nn.Conv2d(4, 8, 1)),
        nn.Flatten(2),
        layer,
        nn.Flatten(1),
        nn.Sequential(nn.Linear(128, 3, bias=False), nn.Linear(3, 10)),
    ).double().eval()
"""


def _mixed(dtype=F64):
    """Convolutions, a transformer encoder layer (attention and a grown feed-forward layer) and a
    full-core head; input (N, 3, 8, 8), output (N, 10). Torch containers only, so that the plain
    form pickles without this test module."""
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect"),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),  # (N, 8, 4, 4)
        nn.Flatten(2),  # (N, 8, 16): 8 tokens of 16 features
        nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True),
        nn.Flatten(1),
        nn.Linear(128, 10),
    ).to(dtype)
    convert(model, rank=4)  # all but the output layer, model[6]
    model[6] = LowRankLinear.from_linear(model[6], rank=3, core="full")
    layer = model[4]
    with torch.no_grad():
        layer.self_attn.in_proj.bias.normal_(generator=generator)  # PyTorch zeros it
    layer.linear1.grow(2, scale_init=0.5, generator=generator)
    with torch.no_grad():
        layer.linear1.U.add_(torch.randn(layer.linear1.U.shape, generator=generator).to(dtype))
    return model.eval()


def test_mixed_model():
    model = _mixed()
    x = torch.randn(3, 3, 8, 8, dtype=F64)
    expected = model(x)
    types = {type(m) for m in model.modules()}
    assert {LowRankConv2d, LowRankLinear, LowRankMultiheadAttention} <= types
    to_plain(model)
    assert_plain(model)
    # Eval mode, batched input: nn.TransformerEncoderLayer's fast path would read
    # linear1.weight, which the pair lacks; to_plain sends the layer down its regular path.
    torch.testing.assert_close(model(x), expected, **TOL)
    assert not model[4].training and model[4].activation_relu_or_gelu == 0
    namespace = {}
    exec(MIXED_ARCHITECTURE, namespace)
    rebuilt = namespace["build"]()
    rebuilt.load_state_dict(model.state_dict())
    torch.testing.assert_close(rebuilt(x), expected, **TOL)


def _bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
    )
    model = BertModel(config).double().eval()
    convert(model, rank=4)
    return model


def test_transformers_models():
    from transformers import GPT2Config, GPT2Model

    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    bert = _bert()
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=50,
        n_embd=16,
        n_layer=2,
        n_head=2,
        n_positions=16,
        bos_token_id=0,
        eos_token_id=0,
    )
    gpt2 = GPT2Model(config).double().eval()
    convert(gpt2, rank=4, target_modules=["c_attn", "c_proj", "c_fc"])  # Conv1D layers
    for model in (bert, gpt2):
        assert len(lowrank_ext.ranks(model)) >= 8
        expected = model(ids).last_hidden_state
        to_plain(model)
        assert_plain(model)
        torch.testing.assert_close(model(ids).last_hidden_state, expected, **TOL)


# Loads what the test saved and runs it, in a process that never imports lowrank_ext itself;
# prints the largest error per model and the lowrank_ext modules that loading pulled in.
LOAD_AND_RUN = """
import json, sys
import torch

cases = torch.load(sys.argv[1], weights_only=True)
errors = {}
for name, case in cases.items():
    if name == "state_dict":
        namespace = {}
        exec(case["architecture"], namespace)
        model = namespace["build"]()
        model.load_state_dict(torch.load(case["path"], weights_only=True))
    else:
        model = torch.load(case["path"], weights_only=False)
    output = model(case["input"])
    output = getattr(output, "last_hidden_state", output)
    errors[name] = (output - case["output"]).abs().max().item()
loaded = sorted(m for m in sys.modules if m.split(".")[0] == "lowrank_ext")
print(json.dumps({"errors": errors, "lowrank_ext": loaded}))
"""


def _run_elsewhere(cases, tmp_path):
    torch.save(cases, tmp_path / "cases.pt")
    # cwd = the repository root, where lowrank_ext is importable: a pickle that needs it would
    # load, and the sys.modules check is what tells.
    result = subprocess.run(
        [sys.executable, "-c", LOAD_AND_RUN, str(tmp_path / "cases.pt")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_runs_in_a_process_without_lowrank_ext(tmp_path):
    x = torch.randn(2, 3, 8, 8, dtype=F64)
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    mixed, bert = _mixed(), _bert()
    with torch.no_grad():
        mixed_output, bert_output = mixed(x), bert(ids).last_hidden_state
    to_plain(mixed)
    to_plain(bert)
    torch.save(mixed, tmp_path / "mixed.pt")
    torch.save(bert, tmp_path / "bert.pt")
    torch.save(mixed.state_dict(), tmp_path / "mixed_state.pt")
    cases = {
        "mixed": {"path": str(tmp_path / "mixed.pt"), "input": x, "output": mixed_output},
        "bert": {"path": str(tmp_path / "bert.pt"), "input": ids, "output": bert_output},
        "state_dict": {
            "path": str(tmp_path / "mixed_state.pt"),
            "architecture": MIXED_ARCHITECTURE,
            "input": x,
            "output": mixed_output,
        },
    }
    report = _run_elsewhere(cases, tmp_path)
    assert report["lowrank_ext"] == []
    assert set(report["errors"]) == set(cases)
    assert all(error <= 1e-10 for error in report["errors"].values()), report


def test_low_rank_model_needs_lowrank_ext_elsewhere(tmp_path):
    """The control for the test above: its check does see a model that needs the extension."""
    x = torch.randn(2, 3, 8, 8, dtype=F64)
    model = _mixed()
    torch.save(model, tmp_path / "low_rank.pt")
    case = {"path": str(tmp_path / "low_rank.pt"), "input": x, "output": model(x).detach()}
    report = _run_elsewhere({"low_rank": case}, tmp_path)
    assert "lowrank_ext" in report["lowrank_ext"]


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError as error:  # in the test extra: missing means a broken environment
        pytest.fail(f"onnxruntime is needed (pip install -e '.[test]'): {error}")
    return onnxruntime


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # shape checks the trace fixes
def test_onnx_export(dynamo, tmp_path):
    onnxruntime = _onnxruntime()
    model = _mixed(torch.float32)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
        to_plain(model)
        plain_output = model(x)
    path = tmp_path / "model.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=dynamo)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (output,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(output), plain_output, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(output), expected, rtol=1e-5, atol=1e-5)
