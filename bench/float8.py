"""Issue 14 on one GPU: float8 matmuls (model.distributed.float8_matmuls) against bf16, in the same call.

    python bench/float8.py converge DATA_JSON [STEPS]  a 61M Llama on the demo data, STEPS (400) steps by train.py's
                                                       Trainer: bf16, float8 (e5m2 gradients), float8 with e4m3
                                                       gradients, all from the same init and batches; then bf16 from
                                                       another seed (init and data order): run-to-run noise
    python bench/float8.py profile                     one block at the seed's shapes, forward + backward, by kernel:
                                                       bf16, then float8 (issue 21)
    python bench/float8.py speed                       the 1-GPU proxy (8B shapes, 4 layers, 16 x 4096 tokens a step,
                                                       micro-batch 4, no recomputation), bf16 and float8, by the step
                                                       of bench/activations.py (train.py's: ZeroAdamW, world size 1);
                                                       one block's time and memory; the cast kernel; the matmul rates

`bash bench/gpu.sh issue14 DATA_JSON` runs both with the GPU tests (BENCHMARKS.md).
"""
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from triton.testing import do_bench

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import activations  # noqa: E402
import kernels  # noqa: E402
import schema  # noqa: E402
import train  # noqa: E402
from model import Llama, count_parameters, flops_per_token  # noqa: E402

PEAK = 989e12  # H100 SXM dense bf16: MFU counts float8 work as bf16 work ("bf16-equivalent")


# ---------------------------------------------------------------------------------------------
# converge: validation loss after the same steps on the same batches


MODEL_61M = ["model.base_model.transformer.hidden_size=768", "model.base_model.transformer.num_attention_heads=12",
             "model.base_model.transformer.head_groups=4", "model.base_model.transformer.kv_channels=64",
             "model.base_model.transformer.ffn_hidden_size=2304", "model.base_model.transformer.num_layers=8"]


def converge(data: str, steps: int = 400):
    base = MODEL_61M + [
        f"data.path={data}", f"training.train_iters={steps}", "training.logs.interval=50",
        "training.validation.interval=100", "training.validation.iterations=16", "training.checkpoint.interval=null",
        "training.export.interval=null", "training.test_iters=0", "batch.micro_batch_size=16",
        "batch.sequence_length=256", "batch.batch_size=16", "optimizer.learning_rate.base=1e-3",
        "optimizer.learning_rate.minimum=1e-4", "optimizer.learning_rate.warmup_iterations=40",
        "model.distributed.training_dtype=bf16"]
    runs = [("bf16", False, None, 1234), ("float8, e5m2 gradients", True, torch.float8_e5m2, 1234),
            ("float8, e4m3 gradients", True, torch.float8_e4m3fn, 1234), ("bf16, seed 2", False, None, 2)]
    root, device, checks = Path(tempfile.mkdtemp()), torch.device("cuda" if torch.cuda.is_available() else "cpu"), []
    card = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    with torch.device("meta"):
        n = count_parameters(Llama(schema.load_config(str(ROOT / "config" / "tiny.yaml"), base).model.base_model, 256))
    print(f"## Convergence: {n:,} parameters, demo data, {steps} steps of 16 x 256 tokens, bf16 weights ({card})\n")
    print("| run | " + " | ".join(f"val loss at {s}" for s in range(100, steps + 1, 100)) + " | train loss, last 50 "
          "steps | final val - bf16's | tokens/s, last 50 steps | wall |")
    print("|---|" + "---|" * (steps // 100 + 4), flush=True)
    for name, float8, grad, seed in runs:
        kernels.GRAD_FLOAT8 = grad or torch.float8_e5m2
        exp = root / name.replace(" ", "_").replace(",", "")
        config = schema.load_config(str(ROOT / "config" / "tiny.yaml"), base + [f"run.experiment_dir={exp}",
                                   f"model.distributed.float8_matmuls={float8}", f"model.distributed.seed={seed}"])
        t0 = time.perf_counter()
        trainer = train.Trainer(config, 0, 1, device)
        with contextlib.redirect_stdout(sys.stderr):  # its log lines apart from the table
            trainer.train()
        lines = [json.loads(line) for line in (exp / "metrics.jsonl").read_text().splitlines()]
        val = [m["val_loss"] for m in lines if "val_loss" in m]
        last = [m for m in lines if "tokens_per_s" in m][-1]
        checks.append(val[-1])
        print(f"| {name} | " + " | ".join(f"{v:.4f}" for v in val) + f" | {last['loss']:.4f} | "
              f"{val[-1] - checks[0]:+.4f} | {last['tokens_per_s']:,.0f} | {time.perf_counter() - t0:.0f} s |",
              flush=True)
        del trainer
        if device.type == "cuda":
            torch.cuda.empty_cache()
    kernels.GRAD_FLOAT8 = torch.float8_e5m2


# ---------------------------------------------------------------------------------------------
# speed: the proxy, one block, the cast, the matmuls


def build(layers: int, float8: bool) -> Llama:
    torch.manual_seed(0)
    with torch.device("meta"):
        net = Llama(activations.seed_model_config(layers), 4096, torch.bfloat16, float8)
    return net.init_weights("cuda")


def proxy():
    print(f"## The 1-GPU proxy: 8B shapes, 4 layers, 16 x 4096 tokens a step in micro-batches of 4, "
          f"ZeroAdamW stage 2 ({torch.cuda.get_device_name()}, torch {torch.__version__})\n")
    print("| matmuls | tokens/s (whole step) | MFU, bf16-equivalent (989 TFLOP/s) | fwd+bwd per micro-batch | "
          "optimizer per step | peak memory |")
    print("|---|---|---|---|---|---|")
    results = {}
    for float8 in (False, True):
        activations.free_memory()
        base = torch.cuda.memory_allocated()  # a model built earlier in this process may still be held (ZeRO's hooks)
        net = build(4, float8)
        whole, fwd_bwd, optimizer, peak = activations.train_step_times(net, activations.ours_loss, 4, profile=float8)
        peak -= base
        tokens_per_s = 16 * 4096 / whole
        results[float8] = tokens_per_s
        mfu = tokens_per_s * flops_per_token(net, 4096) / PEAK
        print(f"| {'float8' if float8 else 'bf16'} | {tokens_per_s:,.0f} | {mfu:.1%} | {fwd_bwd * 1000:.1f} ms | "
              f"{optimizer * 1000:.1f} ms | {peak / 1e9:.1f} GB |", flush=True)
        del net
    print(f"\nfloat8 / bf16: {results[True] / results[False]:.3f}")


def one_block(float8: bool):
    """A 1-layer model at the 8B shapes, an input of 4 x 4096 tokens for its block and a gradient for the block's
    output (random, on the GPU), in memory freed of what came before."""
    activations.free_memory()
    net = build(1, float8)
    x = torch.randn(4, 4096, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    return net, x, torch.randn_like(x)


def block():
    """One block at the 8B shapes, 4 x 4096 tokens: forward, forward + backward, what it keeps, backward's peak."""
    t, tokens = activations.seed_model_config(1).transformer, 4 * 4096
    estimate = tokens * 2 * (t.ffn_size + 2 * t.hidden_size) + 6 * t.ffn_size * t.hidden_size  # train.py's
    float8_extra = tokens * (4 * t.ffn_size + t.hidden_size) + t.ffn_size * t.hidden_size
    print(f"\n## One block, 8B shapes, 4 x 4096 tokens\n\ntrain.py's workspace for one block's backward: "
          f"{estimate / 1e9:.3f} GB in bf16, + {float8_extra / 1e9:.3f} GB in float8\n")
    print("| matmuls | forward ms | forward + backward ms | kept (allocator) | backward's extra peak |")
    print("|---|---|---|---|---|")
    for float8 in (False, True):
        net, x, dy = one_block(float8)
        b, cos, sin = net.layers[0], net.cos, net.sin
        base = torch.cuda.memory_allocated()
        y = b(x, cos, sin)
        kept = torch.cuda.memory_allocated() - base - y.numel() * 2
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        y.backward(dy)
        extra = torch.cuda.max_memory_allocated() - before
        del y
        fwd = activations.cuda_ms(lambda: b(x, cos, sin))
        both = activations.cuda_ms(lambda: b(x, cos, sin).backward(dy))
        print(f"| {'float8' if float8 else 'bf16'} | {fwd:.2f} | {both:.2f} | {kept / 1e9:.3f} GB | "
              f"{extra / 1e9:.3f} GB |", flush=True)
        del net, x, dy


def parts():
    """The cast against the bytes it must move, and the matmuls of the MLP's shapes, bf16 against float8."""
    x = torch.randn(16384, 14336, device="cuda", dtype=torch.bfloat16)
    n = x.numel()
    print(f"\n## The cast of a 16384 x 14336 bf16 tensor (amax pass + cast kernel), medians of do_bench\n")
    amax_ms = do_bench(lambda: torch.linalg.vector_norm(x, float("inf")), return_mode="median")
    print(f"- amax alone (torch.linalg.vector_norm, inf): {amax_ms:.3f} ms, {2 * n / amax_ms / 1e6:.0f} GB/s")
    for layouts in ("N", "T", "NT"):
        ms = do_bench(lambda: kernels._float8(x, kernels.E4M3, layouts), return_mode="median")
        moved = 2 * n + 2 * n + len(layouts) * n  # amax reads x, the cast reads it again and writes each layout
        print(f"- layouts {layouts}: {ms:.3f} ms, {moved / ms / 1e6:.0f} GB/s counting {moved / 1e9:.2f} GB")
    print("\n## Matmuls at the MLP's shapes (M tokens = 16384, H = 4096, F = 14336), TFLOP/s\n")
    print("| matmul | bf16 | float8, fast accumulation | float8 |")
    print("|---|---|---|---|")
    M, H, F = 16384, 4096, 14336
    for name, (m, k, n_) in {"gate forward (M x H) @ (H x F)": (M, H, F), "down forward (M x F) @ (F x H)": (M, F, H),
                             "gate weight gradient (F x M) @ (M x H)": (F, M, H)}.items():
        a, b = torch.randn(m, k, device="cuda", dtype=torch.bfloat16), torch.randn(n_, k, device="cuda",
                                                                                  dtype=torch.bfloat16)
        a8, b8 = kernels._float8(a, kernels.E4M3)[0], kernels._float8(b, kernels.E4M3)[0]
        rates = [2 * m * k * n_ / do_bench(fn, return_mode="median") / 1e9 for fn in (
            lambda: a @ b.t(), lambda: kernels._mm8(a8, b8, torch.bfloat16, True),
            lambda: kernels._mm8(a8, b8, torch.bfloat16, False))]
        print(f"| {name} | " + " | ".join(f"{r:.0f}" for r in rates) + " |", flush=True)
        del a, b, a8, b8


def profile_block(iterations: int = 5):
    """Issue 21's first step: one block at the seed's shapes (4 x 4096 tokens), forward and backward, by kernel,
    bf16 then float8, GPU time averaged over `iterations` (after 3 to warm up)."""
    for float8 in (False, True):
        net, x, dy = one_block(float8)
        b, cos, sin = net.layers[0], net.cos, net.sin
        for _ in range(3):
            b(x, cos, sin).backward(dy)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(iterations):
                b(x, cos, sin).backward(dy)
            torch.cuda.synchronize()
        events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
        total = sum(e.self_device_time_total for e in events) / iterations / 1000
        print(f"\n## One block, {'float8' if float8 else 'bf16'}, forward + backward: {total:.2f} ms of GPU time "
              f"({torch.cuda.get_device_name()})\n\n| kernel | calls a pass | ms a pass | share |\n|---|---|---|---|")
        for e in sorted(events, key=lambda e: -e.self_device_time_total)[:30]:
            ms = e.self_device_time_total / iterations / 1000
            print(f"| `{e.key[:100]}` | {e.count / iterations:g} | {ms:.3f} | {ms / total:.1%} |")
        del net, x, dy


def speed():
    proxy()
    block()
    parts()
    for table in activations.PROFILES:
        print(f"\nOne float8 step of the proxy by kernel (GPU time):\n\n{table}")


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else ""
    if what == "converge" and len(sys.argv) > 2:
        converge(sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 400)
    elif what == "speed":
        speed()
    elif what == "profile":
        profile_block()
    else:
        print(__doc__)
        sys.exit(2)
