"""Issue 18: attention within documents, against attention across them, at the seed's shapes (4 x 4096 tokens,
32 query heads over 8 key/value heads of 128, bf16, forward and backward, median of 20), beside transformers'
Llama layer given the same block-diagonal causal mask (its SDPA). Documents: log-normal lengths, median ~600
tokens, a web corpus's (the seed's data is not here); the block mask's construction is timed too.

    python bench/documents.py block      # one of our blocks, each way; transformers' decoder layer, each way
    python bench/documents.py data DIR   # writes a dataset of such documents into DIR (for the proxy by train.py)
"""
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import kernels  # noqa: E402
import model  # noqa: E402


def lengths(total: int, rng) -> list[int]:
    out = []
    while total > 0:
        n = min(total, max(1, int(rng.lognormal(6.4, 1.0))))
        out.append(n)
        total -= n
    return out


def timed(fn, n=20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def block():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    B, T = 4, 4096
    rng = np.random.default_rng(0)
    docs = torch.tensor([[i for i, n in enumerate(lengths(T, rng)) for _ in range(n)] for _ in range(B)], device="cuda")
    print(f"{B} x {T} tokens, {int(docs[:, -1].sum()) + B} documents, mean {B * T / (int(docs[:, -1].sum()) + B):.0f} "
          f"tokens")
    cfg = model.TransformerConfig(num_layers=32, hidden_size=4096, num_attention_heads=32, head_groups=8,
                                  kv_channels=128, ffn_hidden_size=14336, add_linear_biases=False,
                                  rotary_embedding_scale=-13.122363377404328)
    torch.manual_seed(0)
    ours = model.Block(cfg, torch.bfloat16, False).cuda()
    for p in ours.parameters():
        torch.nn.init.normal_(p, std=0.02) if p.dim() > 1 else torch.nn.init.ones_(p)
    freqs = model.rotary_frequencies(cfg)
    angles = torch.outer(torch.arange(T, dtype=torch.float64), freqs)
    cos, sin = angles.cos().float().cuda(), angles.sin().float().cuda()
    x = torch.randn(B, T, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(x)
    rows = []
    for name, documents in (("across documents (causal SDPA)", None), ("within documents (flex attention)", docs)):
        def step():
            ours(x, cos, sin, documents).backward(dy)
        rows.append((f"ours, {name}", timed(step)))
    same = lambda b, h, i, j: (docs[b, i] == docs[b, j]) & (j <= i)  # noqa: E731  (kernels.document_attention's)
    rows.append(("ours, its block mask built (once a forward, shared by the layers)",
                 timed(lambda: kernels.create_block_mask(same, B, None, T, T, device="cuda"))))
    hf_cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                         head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0, attn_implementation="sdpa")
    theirs = LlamaDecoderLayer(hf_cfg, 0).cuda().to(torch.bfloat16)
    rope = LlamaRotaryEmbedding(hf_cfg).cuda()
    positions = torch.arange(T, device="cuda").expand(B, T)
    embeddings = rope(x, positions)
    causal = torch.ones(T, T, dtype=torch.bool, device="cuda").tril().expand(B, 1, T, T)
    within = (docs[:, None, :, None] == docs[:, None, None, :]).tril()
    for name, mask in (("across documents (causal mask)", causal), ("within documents (the same mask as ours)", within)):
        def step():
            out = theirs(x, attention_mask=mask, position_ids=positions, position_embeddings=embeddings)
            (out[0] if isinstance(out, tuple) else out).backward(dy)
        rows.append((f"transformers {__import__('transformers').__version__} LlamaDecoderLayer, SDPA, {name}",
                     timed(step)))
    print("| one 8B block, forward + backward | ms |\n|---|---|")
    for name, ms in rows:
        print(f"| {name} | {ms:.2f} |")


def data(folder: str):
    from prepare import write_dataset

    rng, out = np.random.default_rng(1), Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    sizes = lengths(40_000_000, rng)
    write_dataset(out / "docs", (rng.integers(0, 128_000, n) for n in sizes), np.int32)
    (out / "d.json").write_text('{"datasets": [{"prefix": "docs", "weight": 1}]}')
    print(f"{len(sizes)} documents, {sum(sizes)} tokens in {out}")


if __name__ == "__main__":
    block() if sys.argv[1] == "block" else data(sys.argv[2])
