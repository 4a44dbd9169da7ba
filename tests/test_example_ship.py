"""examples/ship_hf_model.py --quick: the README's "Compress and ship a Hugging Face model" path
(real all-MiniLM-L6-v2, offline) runs end to end and its checks hold."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ship_hf_model_quick(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "ship_hf_model.py"), "--quick", "--out", tmp_path],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    text = out.stdout
    # rank 96 in every encoder Linear of MiniLM: 36 layers, 22,713,216 → 16,081,152 parameters
    assert "convert: 36 layers at rank 96, 22,713,216 → 16,081,152 parameters" in text
    assert "embeddings identical: True" in text
    error = float(re.search(r"onnxruntime: max \|error\| (\S+)", text).group(1))
    assert error < 1e-4
    cosines = [float(c) for c in re.findall(r"mean cosine (\d\.\d+)", text)]
    assert len(cosines) == 2 and cosines[1] > cosines[0]  # fine-tuning helps, even 5 steps
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lowrank", "model.onnx"]
