"""Time the Triton kernels against their eager twins and torch.compile of the twins, on a GPU.

    python bench/kernels.py --out bench-kernels.md

Shapes are docs/performance.md's: cross-entropy 16,384 tokens x 4096 x 128,256; RMSNorm 16,384 x 4096;
rotary q (4, 4096, 32, 128) and k (4, 4096, 8, 128); all bf16. Each row is forward+backward, the
median of many runs (triton.testing.do_bench) on random data, and for the small ops also replayed
in a CUDA graph (GPU time without launch gaps). Memory is the peak above what was allocated
before the step (the inputs), in GiB, the returned gradients included, and what is left of it
without them. Rates: for the memory-bound ops, the fewest bytes (each input read once, each output
written once, forward and backward) over the graph time; for the cross-entropy, its three matrix
products (6 N H V flops) over the time.
The ceilings (a device-to-device copy, an 8192^3 bf16 matmul) are measured in the same run.
"""
import argparse
import math
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import kernels  # noqa: E402
import model  # noqa: E402

GIB = 2**30  # memory in GiB, as docs/performance.md's table


def median_ms(fn, rep_ms=1000) -> float:
    return do_bench(fn, warmup=200, rep=rep_ms, return_mode="median")


def graph_ms(step) -> float:
    """The step captured in a CUDA graph and replayed: GPU time without the launch gaps that
    small ops leave when timed alone (in a model, the CPU runs ahead and hides them)."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        return median_ms(graph.replay)
    except Exception as e:  # a capture that fails is reported, not fatal
        print(f"  CUDA graph capture failed: {e}", flush=True)
        return float("nan")


def peak_extra_gib(step, params) -> float:
    """Peak memory of one step above what was allocated before it (gradients cleared first)."""
    for p in params:
        p.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    for p in params:
        p.grad = None
    return extra / GIB


def ceilings():
    src = torch.randn(2**29, device="cuda", dtype=torch.bfloat16)  # 1 GiB
    dst = torch.empty_like(src)
    copy_tbs = 2 * src.numel() * 2 / median_ms(lambda: dst.copy_(src)) / 1e9
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    matmul_tflops = 2 * 8192**3 / median_ms(lambda: a @ b) / 1e9
    return copy_tbs, matmul_tflops


def time_variants(variants, params, make_step, unit_amount, unit, rep_ms=1000, graph=True):
    """Rows (name, ms, graph ms, GiB, GiB beyond the gradients, rate, unit) for each (name, fn);
    the step runs fn forward and backward. unit_amount: bytes or flops of one step."""
    rows = []
    grads = sum(p.numel() * p.element_size() for p in params) / GIB
    for name, fn in variants:
        step = make_step(fn)
        step()  # compile, warm the allocator
        ms = median_ms(step, rep_ms)
        gib = peak_extra_gib(step, params)
        gms = graph_ms(step) if graph else float("nan")
        best = gms if gms == gms else ms  # the graph's time where there is one (gms == gms: not nan)
        rate = unit_amount / best / (1e6 if unit == "GB/s" else 1e9)
        rows.append((name, ms, gms, gib, gib - grads, rate, unit))
        print(f"  {name}: {ms:.3f} ms, graph {gms:.3f} ms, {gib:.2f} GiB", flush=True)
    return rows


def bench_rms_norm():
    n, h = 16384, 4096
    x = torch.randn(n, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (1 + 0.1 * torch.randn(h, device="cuda")).bfloat16().requires_grad_()
    dy = torch.randn_like(x)

    def make_step(fn):
        def step():
            x.grad = w.grad = None
            fn(x, w, 1e-5).backward(dy)
        return step

    variants = [("triton", kernels.rms_norm), ("eager", model.rms_norm_torch),
                ("torch.compile", torch.compile(model.rms_norm_torch))]
    bytes_moved = 5 * x.numel() * 2  # forward: x in, y out; backward: x, dy in, dx out
    return time_variants(variants, [x, w], make_step, bytes_moved, "GB/s")


def bench_rotary():
    b, t, heads, kv_heads, d = 4, 4096, 32, 8, 128
    q = torch.randn(b, t, heads, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(b, t, kv_heads, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    angles = torch.outer(torch.arange(t, device="cuda", dtype=torch.float64), torch.rand(d // 2, device="cuda", dtype=torch.float64))
    cos, sin = angles.cos().float(), angles.sin().float()
    dq, dk = torch.randn_like(q), torch.randn_like(k)

    def make_step(fn):
        def step():
            q.grad = k.grad = None
            torch.autograd.backward([fn(q, cos, sin), fn(k, cos, sin)], [dq, dk])
        return step

    variants = [("triton", kernels.rotary), ("eager", model.rotary_torch),
                ("torch.compile", torch.compile(model.rotary_torch))]
    bytes_moved = 4 * (q.numel() + k.numel()) * 2  # in and out, forward and backward
    return time_variants(variants, [q, k], make_step, bytes_moved, "GB/s")


def bench_cross_entropy():
    n, h, v = 16384, 4096, 128256
    hidden = torch.randn(n, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(v, h, device="cuda") / math.sqrt(h)).bfloat16().requires_grad_()
    labels = torch.randint(0, v, (n,), device="cuda")
    labels[::7] = kernels.IGNORE_INDEX

    def make_step(fn):
        def step():
            hidden.grad = weight.grad = None
            fn(hidden, weight, labels).backward()
        return step

    def three_matmuls(hidden, weight, labels):
        # The floor: logits, then grad_h and grad_W from a gradient the size of the logits.
        class Floor(torch.autograd.Function):
            @staticmethod
            def forward(ctx, hidden, weight):
                ctx.z = hidden @ weight.t()
                return ctx.z[0, 0].float()

            @staticmethod
            def backward(ctx, g):
                return ctx.z @ weight, ctx.z.t() @ hidden
        return Floor.apply(hidden, weight)

    variants = [("triton fused (default: 2048-token chunks)", kernels.cross_entropy)]
    for chunk in (512, 1024, 4096):
        variants.append((f"triton fused, {chunk}-token chunks", lambda a, b, c, chunk=chunk: kernels.cross_entropy(a, b, c, chunk)))
    variants.append(("triton fused, loss x 0.5 (backward scales the gradients)", lambda a, b, c: 0.5 * kernels.cross_entropy(a, b, c)))
    variants += [("eager", model.cross_entropy_torch), ("torch.compile", torch.compile(model.cross_entropy_torch)),
                 ("floor: the 3 matmuls alone", three_matmuls)]
    return time_variants(variants, [hidden, weight], make_step, 6 * n * h * v, "TFLOP/s", rep_ms=3000, graph=False)


def tuning():
    """Diagnostics for the next change: the cross-entropy kernel alone on one 2048-token chunk of
    logits, by block size and warps; the chunk's matrix products; the scaling in backward."""
    lines = []
    v = 128256
    z = torch.randn(2048, v, device="cuda").bfloat16()
    labels = torch.randint(0, v, (2048,), device="cuda")
    losses, scale = torch.empty(2048, device="cuda"), torch.tensor(1 / 2048, device="cuda")
    for block, warps in ((2048, 4), (4096, 8), (8192, 8), (8192, 16)):
        ms = median_ms(lambda: kernels._cross_entropy_rows(z, labels, losses, scale, block, warps))
        lines.append(f"CE kernel, 2048 x {v} chunk, BLOCK {block}, {warps} warps: "
                     f"{ms:.3f} ms per chunk, {ms * 8:.2f} ms for 16384 tokens, "
                     f"{2 * z.numel() * 2 / ms / 1e6:.0f} GB/s (counting 1 read + 1 write)")
    del z
    h, w = torch.randn(16384, 4096, device="cuda").bfloat16(), torch.randn(v, 4096, device="cuda").bfloat16()
    grad_w, g = torch.empty_like(w), torch.tensor(1.0, device="cuda")
    for c in (2048, 4096):
        z, gh = torch.randn(c, v, device="cuda").bfloat16(), torch.empty(c, 4096, device="cuda").bfloat16()
        parts = {"logits": lambda: torch.matmul(h[:c], w.t(), out=z), "grad_h": lambda: torch.matmul(z, w, out=gh),
                 "grad_W first": lambda: torch.matmul(z.t(), h[:c], out=grad_w), "grad_W addmm_": lambda: grad_w.addmm_(z.t(), h[:c])}
        times = {name: median_ms(fn) for name, fn in parts.items()}
        chunks = 16384 // c
        total = chunks * (times["logits"] + times["grad_h"]) + times["grad_W first"] + (chunks - 1) * times["grad_W addmm_"]
        lines.append(f"{c}-token chunk: " + ", ".join(f"{k} {t:.3f} ms" for k, t in times.items())
                     + f"; the matmuls of {chunks} chunks: {total:.2f} ms")
        del z
    lines.append(f"grad scaling by a 0-dim tensor (grad_W and h mul_): {median_ms(lambda: (grad_w.mul_(g), h.mul_(g))):.3f} ms; "
                 f"by a Python float: {median_ms(lambda: (grad_w.mul_(1.0), h.mul_(1.0))):.3f} ms")
    print("\n".join(lines), flush=True)
    return lines


def cross_entropy_accuracy():
    """grad_W's error against float64 when accumulated in bf16 over chunks, beside eager's."""
    n, h, v = 16384, 4096, 32768
    hidden = torch.randn(n, h, device="cuda")
    weight = torch.randn(v, h, device="cuda") * 2 / math.sqrt(h)
    labels = torch.randint(0, v, (n,), device="cuda")

    def grads(fn, dtype):
        hl, wl = (t.to(dtype).requires_grad_() for t in (hidden, weight))
        loss = fn(hl, wl, labels)
        loss.backward()
        return loss.detach().double(), hl.grad.double(), wl.grad.double()

    ref = grads(model.cross_entropy_torch, torch.float64)
    rows = []
    cases = [("eager bf16 (one rounding)", model.cross_entropy_torch)]
    cases += [(f"fused bf16, {c}-token chunks ({n // c} roundings)", lambda a, b, y, c=c: kernels.cross_entropy(a, b, y, c))
              for c in (16384, 2048, 512)]
    for name, fn in cases:
        out = grads(fn, torch.bfloat16)
        errs = [((o - r).norm() / r.norm()).item() for o, r in zip(out, ref)]
        rows.append((name, *errs))
        print(f"  {name}: {errs}", flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="write the tables here (markdown)")
    args = parser.parse_args()
    torch.manual_seed(0)
    copy_tbs, matmul_tflops = ceilings()
    lines = [f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}",
             f"ceilings: device-to-device copy {copy_tbs:.2f} TB/s (read + write); 8192^3 bf16 matmul {matmul_tflops:.0f} TFLOP/s",
             "", "| op | implementation | ms (median) | ms, CUDA graph | peak extra GiB | beyond the gradients | rate | of ceiling |",
             "|---|---|---|---|---|---|---|---|"]
    for op, fn in (("RMSNorm 16384x4096", bench_rms_norm), ("rotary q+k", bench_rotary),
                   ("cross-entropy 16384x4096x128256", bench_cross_entropy)):
        print(op, flush=True)
        for name, ms, gms, gib, beyond, rate, unit in fn():
            ceiling = copy_tbs * 1e3 if unit == "GB/s" else matmul_tflops
            lines.append(f"| {op} | {name} | {ms:.3f} | {gms:.3f} | {gib:.2f} | {beyond:.2f} | {rate:.0f} {unit} | {rate / ceiling:.0%} |")
        torch.cuda.empty_cache()
    print("cross-entropy accuracy", flush=True)
    lines += ["", "cross-entropy gradients in bf16, 16384 x 4096 x 32768, error |x - ref| / |ref| against float64:",
              "", "| implementation | loss | grad hidden | grad weight |", "|---|---|---|---|"]
    lines += [f"| {name} | {a:.1e} | {b:.1e} | {c:.1e} |" for name, a, b, c in cross_entropy_accuracy()]
    lines += ["", "Diagnostics:", ""] + [f"- {line}" for line in tuning()]
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
