"""A tiny GPT-2 from its config (no download) for the Conv1D tests: 2 blocks, n_embd 32."""

import torch

BLOCK = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
CONV1D_NAMES = [f"transformer.h.{i}.{suffix}" for i in range(2) for suffix in BLOCK]
# (in, out) = (nx, nf) of each block's Conv1D weights
SHAPES = {"attn.c_attn": (32, 96), "attn.c_proj": (32, 32), "mlp.c_fc": (32, 128)}
SHAPES["mlp.c_proj"] = (128, 32)


def gpt2(dtype=torch.float64, seed=0):
    """GPT2LMHeadModel(n_layer=2, n_embd=32, n_head=4, vocab 100) in eval mode (no dropout)."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=64, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config).to(dtype).eval()


def tokens(seed=1, batch=3, length=12):
    return torch.randint(0, 100, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def conv1d_names(model):
    from transformers.pytorch_utils import Conv1D

    return [name for name, module in model.named_modules() if isinstance(module, Conv1D)]
