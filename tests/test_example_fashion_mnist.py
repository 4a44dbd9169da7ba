"""The Fashion-MNIST / MNIST studies' --quick modes run end to end (so the examples cannot rot)
and what they record holds: dense and OIALR are the same computation up to the conversion, the
trainable counts follow from the final ranks, the rebuild-W copy computes the same function, and
the successive model's noise rank follows the rule from its own validation losses.

They need the data (examples/data/images.py): skipped with the how-to where it is missing,
failed under LOWRANK_REQUIRE_DATA=1 (.ci/run).
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from test_example_data import data_or_skip, images

ROOT = Path(__file__).resolve().parent.parent


def run_quick(script: str, out: Path) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


def test_oialr_fashion_mnist_quick(tmp_path):
    data_or_skip(images.fashion_mnist)
    data_or_skip(images.mnist)
    text = run_quick("oialr_fashion_mnist.py", tmp_path)
    assert "QUICK MODE" in text
    results = json.loads((tmp_path / "oialr_fashion_mnist.json").read_text())
    studies = {(s["dataset"], s["model"]): s for s in results["studies"]}
    assert set(studies) == {
        ("fashion-mnist", "MLP"),
        ("fashion-mnist", "ViT"),
        ("fashion-mnist", "CNN"),
        ("mnist", "MLP"),
    }
    for (dataset, name), study in studies.items():
        for run in study["runs"]:
            # same init, batches and AdamW: bitwise the same weights until the conversion
            assert run["gap_before_conversion"] == 0.0, (dataset, name)
            assert all(run["ranks"][k] <= run["full_ranks"][k] for k in run["full_ranks"])
            assert run["steps"] == 2048 // 128 * study["epochs"]
            assert run["delay"] == round(run["steps"] / 6)
        gap = float(re.search(r"max \|Δ logits\| = (\S+)", " ".join(study["notes"])).group(1))
        assert gap < 1e-4, (dataset, name)
    for dataset in ("fashion-mnist", "mnist"):
        run = studies[(dataset, "MLP")]["runs"][0]
        assert run["full_ranks"] == {"fc1": 784, "fc2": 1024}
        # the dense MLP: 784·1024 + 1024 + 1024² + 1024 + 1024·10 + 10
        assert run["dense_trainable"] == 1_863_690
        # OIALR trains the r×r cores, the biases and the dense head
        r1, r2 = run["ranks"]["fc1"], run["ranks"]["fc2"]
        trainable = r1 * r1 + r2 * r2 + 1024 + 1024 + 10250
        assert abs(run["final_trainable_fraction"] - trainable / 1_863_690) < 1e-12
        # 32 steps on 2,048 images learn well above chance (10 %)
        assert min(run["test_accuracy"].values()) > 0.7, run["test_accuracy"]
    for name in ("ranks", "accuracy", "trainable"):
        assert (tmp_path / f"fashion_mnist_oialr_{name}.png").stat().st_size > 10_000


def test_successive_fashion_mnist_quick(tmp_path):
    data_or_skip(images.fashion_mnist)
    run_quick("successive_fashion_mnist.py", tmp_path)
    saved = json.loads((tmp_path / "successive_fashion_mnist.json").read_text())
    (seed,) = saved["seeds"]
    by_rank = {int(r): v for r, v in seed["successive"]["by_rank"].items()}
    assert sorted(by_rank) == [1, 2, 3, 4]
    # the noise-rank rule by hand: the last rank that beat the best so far by more than 1 %
    best = 1
    for rank in (2, 3, 4):
        if by_rank[rank]["val_loss"] < 0.99 * by_rank[best]["val_loss"]:
            best = rank
    assert seed["successive"]["noise_rank"] == best
    assert by_rank[4]["val_loss"] < by_rank[1]["val_loss"]
    # at rank 4 each layer trains its active u, v, its bias and the 4 scales (frozen pairs'
    # scales stay trainable): fc1 784 + 1024 + 1024 + 4, fc2 1024 + 1024 + 1024 + 4, head
    # 1024 + 10 + 10 + 4
    assert seed["successive"]["trainable_at_max_rank"] == 2836 + 3076 + 1048
    assert seed["dense"]["final_test_accuracy"] > 0.7
    for name in ("loss_curve", "norms", "by_rank"):
        assert (tmp_path / f"fashion_mnist_successive_{name}.png").stat().st_size > 10_000
