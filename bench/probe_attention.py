"""Probe (issue 18): which document-masked attention torch offers here, and its speed at 4 x 4096 (8B heads)."""
import inspect
import os
import sys
import time

import torch
import torch.nn.functional as F

print("torch", torch.__version__, torch.cuda.get_device_name())
from torch.nn.attention import varlen  # noqa: E402
print("varlen_attn", inspect.signature(varlen.varlen_attn))
from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: E402

B, T, H, KV, D = 4, 4096, 32, 8, 128
g = torch.Generator().manual_seed(0)
lengths = []  # documents of a web corpus: log-normal, median ~600 tokens, cut at the sample ends
for b in range(B):
    row, left = [], T
    while left:
        n = min(left, max(1, int(torch.empty(1).log_normal_(6.4, 1.0, generator=g).item())))
        row.append(n)
        left -= n
    lengths.append(row)
print("documents per sample", [len(r) for r in lengths], "mean length", B * T / sum(map(len, lengths)))
documents = torch.tensor([[i for i, n in enumerate(r) for _ in range(n)] for r in lengths], device="cuda")
q = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
k = torch.randn(B, KV, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
v = torch.randn(B, KV, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
dy = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16)

def sdpa_causal():
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

same = (documents[:, None, :, None] == documents[:, None, None, :]).tril()
def sdpa_mask():
    return F.scaled_dot_product_attention(q, k, v, attn_mask=same, enable_gqa=True)

docs = documents
def mask_mod(b, h, qi, ki):
    return (docs[b, qi] == docs[b, ki]) & (ki <= qi)
block = create_block_mask(mask_mod, B, None, T, T, device="cuda")
flex = torch.compile(flex_attention)
def flex_doc():
    return flex(q, k, v, block_mask=block, enable_gqa=True)

starts = torch.ones(B, T, dtype=torch.bool, device="cuda")
starts[:, 1:] = documents[:, 1:] != documents[:, :-1]
cu = torch.cat([starts.flatten().nonzero().flatten(), torch.tensor([B * T], device="cuda")]).to(torch.int32)
longest = int((cu[1:] - cu[:-1]).max())
params = inspect.signature(varlen.varlen_attn).parameters
def varlen_doc():
    qf, kf, vf = (x.transpose(1, 2).reshape(B * T, x.shape[1], D) for x in (q, k, v))
    kw = {}
    if "is_causal" in params:
        kw["is_causal"] = True
    if "window_size" in params:
        kw["window_size"] = (-1, 0)
    if "enable_gqa" in params:
        kw["enable_gqa"] = True
    else:
        kf, vf = (x.repeat_interleave(H // KV, dim=1) for x in (kf, vf))
    out = varlen.varlen_attn(qf, kf, vf, cu, cu, longest, longest, **kw)
    return out.view(B, T, H, D).transpose(1, 2)

# correctness against float32 math on the masked reference
ref = F.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(4, 1), v.float().repeat_interleave(4, 1),
                                     attn_mask=same)
for name, fn in [("sdpa_mask", sdpa_mask), ("flex", flex_doc), ("varlen", varlen_doc)]:
    try:
        err = (fn().float() - ref).abs().max().item()
        print(name, "max abs err vs fp32", err)
    except Exception as e:
        print(name, "FAILED", type(e).__name__, str(e)[:300])

def bench(fn, n=20):
    for _ in range(3):
        fn().backward(dy)
    torch.cuda.synchronize()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn().backward(dy)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times)[n // 2] * 1e3

for name, fn in [("sdpa_causal (no mask)", sdpa_causal), ("sdpa_mask", sdpa_mask), ("flex", flex_doc), ("varlen", varlen_doc)]:
    try:
        print(f"{name}: {bench(fn):.2f} ms fwd+bwd (median of 20)")
    except Exception as e:
        print(name, "FAILED", type(e).__name__, str(e)[:300])
