"""examples/compress_minilm.py --quick: the README's MiniLM compression study runs end to end on
the real all-MiniLM-L6-v2 (offline; the first two encoder blocks, 50 % kept) and its ordering
holds: whitening beats the plain per-layer SVD at the same parameter count."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_compress_minilm_quick(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = tmp_path / "result.json"
    figure = tmp_path / "figure.png"
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "compress_minilm.py"), "--quick",
         "--json", str(result), "--figure", str(figure)],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    data = json.loads(result.read_text())
    rows = {row["method"]: row for row in data["rows"]}
    assert set(rows) == {"plain", "whitened", "budget", "refit", "distilled"}
    for row in rows.values():
        # kept counts the biases too: a 50 % budget on the weights keeps 50.0–50.1 %
        assert row["fraction"] == 0.5 and 0.45 < row["kept"] < 0.502
        for domain in ("in_domain", "out_of_domain"):
            assert -1 <= row[domain]["p5_cos"] <= row[domain]["mean_cos"] <= 1
        assert 0 <= row["nn_agreement"] <= 1
    cos = {method: row["in_domain"]["mean_cos"] for method, row in rows.items()}
    assert cos["whitened"] > cos["plain"] + 0.02  # measured 0.93 against 0.86
    assert cos["budget"] > cos["plain"] + 0.02
    # 865 calibration tokens are too few for the refit's regression on 1,536 inputs: it
    # overfits (0.919 against 0.926 measured); the full study (8,014 tokens) gains from it
    assert abs(cos["refit"] - cos["budget"]) < 0.05
    curve = data["distill_curve_at_half"]  # (step, seconds, held-out cosine), first and last
    assert [point[0] for point in curve] == [0, 3]
    # quick: the curve's held-out set is the whole (32-sentence) evaluation set
    assert curve[0][2] == pytest.approx(rows["refit"]["in_domain"]["mean_cos"], abs=1e-6)
    assert data["calibrate_seconds"] > 0 and rows["budget"]["forward_speedup"] > 0
    assert figure.stat().st_size > 10_000
    assert "calibrate: 12 layers, 32 sentences" in out.stdout
