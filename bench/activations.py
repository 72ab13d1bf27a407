"""Issue 13 on one GPU: what a block keeps, ours against transformers on the 1-GPU proxy, the seed on 80 GB.

    python bench/activations.py memory         one block at the 8B shapes, 4 x 4096 tokens, bf16: what it keeps
                                               (allocator and saved_tensors_hooks), its backward's extra, its time;
                                               the same for the block as it was before issue 13, in the same run
    python bench/activations.py speed [MB ...] the 1-GPU proxy (8B shapes, 4 layers, batch 16 x 4096, no
                                               recomputation), one training step as train.py takes it (ZeroAdamW at
                                               world size 1): ours at micro-batch 4, transformers eager at 4,
                                               transformers + torch.compile at each MB (default 4)
    python bench/activations.py cap            the seed's memory per rank at 8 ranks on an 80 GB card, and the cap
                                               that gives the proxy the same memory per block (last line, bytes)

`bash bench/gpu.sh issue13` runs all three with the GPU tests and the train.py runs (BENCHMARKS.md).
"""
import gc
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import kernels  # noqa: E402
import schema  # noqa: E402
import train  # noqa: E402
from model import Llama, count_parameters  # noqa: E402
from zero import ZeroAdamW  # noqa: E402

SEED = str(ROOT / "config" / "llama3_8b.yaml")
H100_80GB = 81559 * 2**20  # nvidia-smi's memory.total of an H100 80GB HBM3 (bench/as_80gb.py)


def seed_model_config(layers: int):
    return schema.load_config(SEED, [f"model.base_model.transformer.num_layers={layers}"]).model.base_model


def build_ours(layers: int) -> Llama:
    torch.manual_seed(0)
    with torch.device("meta"):
        net = Llama(seed_model_config(layers), 4096, torch.bfloat16)
    return net.init_weights("cuda")


def cuda_ms(fn, warmup: int = 3, reps: int = 10) -> float:
    """Median of `reps` timed calls (CUDA events) after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def free_memory():
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


# ---------------------------------------------------------------------------------------------
# memory: one block


def block_before_issue_13(block, x, cos, sin):
    """The block as model.py had it before: each RMSNorm kept its output beside its input, the three
    projections apart, SiLU(gate) * up in eager PyTorch (SiLU's input, its output, up and the product kept)."""
    a, m, (b, t, _) = block.self_attn, block.mlp, x.shape
    h = kernels.rms_norm(x, block.input_layernorm.weight, block.input_layernorm.eps)
    q = kernels.rotary(a.q_proj(h).view(b, t, a.heads, a.head_dim), cos, sin)
    k = kernels.rotary(a.k_proj(h).view(b, t, a.kv_heads, a.head_dim), cos, sin)
    v = a.v_proj(h).view(b, t, a.kv_heads, a.head_dim)
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                       enable_gqa=True)
    x = x + a.o_proj(y.transpose(1, 2).reshape(b, t, a.heads * a.head_dim))
    h = kernels.rms_norm(x, block.post_attention_layernorm.weight, block.post_attention_layernorm.eps)
    return x + m.down_proj(F.silu(m.gate_proj(h)) * m.up_proj(h))


def saved(fn, net) -> list[tuple[tuple, torch.dtype, int]]:
    """(shape, dtype, storage bytes) of each storage autograd saved during fn(), parameters and buffers left out."""
    own = {t.untyped_storage().data_ptr() for t in [*net.parameters(), *net.buffers()]}
    found = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in own:
            found[s.data_ptr()] = (tuple(t.shape), t.dtype, s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sorted(found.values(), key=lambda item: -item[2])


def memory():
    net = build_ours(1)
    block, cos, sin = net.layers[0], net.cos, net.sin
    x = torch.randn(4, 4096, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(x)
    tokens, per_token = x.shape[0] * x.shape[1], net.config.transformer.activation_bytes(2)
    variants = [("fused (this change)", lambda: block(x, cos, sin)),
                ("recomputed (checkpoint)", lambda: torch.utils.checkpoint.checkpoint(block, x, cos, sin,
                                                                                      use_reentrant=False)),
                ("before issue 13", lambda: block_before_issue_13(block, x, cos, sin))]
    print(f"## One block, 8B shapes, 4 x 4096 tokens, bf16 ({torch.cuda.get_device_name()})\n")
    print(f"TransformerConfig.activation_bytes: {per_token:,} bytes per token = {per_token * tokens / 1e9:.3f} GB "
          f"per block at {tokens:,} tokens\n")
    print("| block | kept, allocator (input included) | kept, hooks | backward's extra peak | fwd ms | fwd+bwd ms |")
    print("|---|---|---|---|---|---|")
    for name, forward in variants:
        for p in net.parameters():
            p.grad = None
        x.grad = None
        free_memory()
        base = torch.cuda.memory_allocated()
        y = forward()
        kept = torch.cuda.memory_allocated() - base - y.numel() * y.element_size() + x.numel() * x.element_size()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        y.backward(dy)
        extra = torch.cuda.max_memory_allocated() - before
        del y
        hooks = sum(b for _, _, b in saved(forward, net))  # the input among them
        fwd = cuda_ms(forward)  # with autograd recording, as a recomputation runs

        def step():
            forward().backward(dy)
        both = cuda_ms(step)
        for p in net.parameters():
            p.grad = None
        print(f"| {name} | {kept / 1e9:.3f} GB ({kept / tokens:,.0f} B/token) | {hooks / 1e9:.3f} GB | "
              f"{extra / 1e9:.3f} GB | {fwd:.2f} | {both:.2f} |", flush=True)
    print("\nSaved by the fused block (shape, dtype, bytes):")
    for shape, dtype, nbytes in saved(lambda: block(x, cos, sin), net):
        print(f"- {shape} {str(dtype).replace('torch.', '')}: {nbytes / tokens:,.0f} B/token")
    for backend in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"):
        try:
            with torch.nn.attention.sdpa_kernel(getattr(torch.nn.attention.SDPBackend, backend)):
                b = sum(n for _, _, n in saved(lambda: block(x, cos, sin), net))
                ms = cuda_ms(lambda: block(x, cos, sin).backward(dy))
            print(f"- attention by {backend} alone: kept {b / 1e9:.3f} GB, fwd+bwd {ms:.2f} ms")
        except RuntimeError as e:
            print(f"- attention by {backend} alone: {str(e).splitlines()[0][:100]}")
        for p in net.parameters():
            p.grad = None

    # The loss's gradient scaling (kernels.py): mul_ by a 0-dim tensor, _foreach_mul_ by it, mul_ by a number.
    head, hidden = (torch.randn(n, 4096, device="cuda", dtype=torch.bfloat16) for n in (128256, 16384))
    one = torch.ones((), device="cuda", dtype=torch.bfloat16)
    rows = [("mul_ by a 0-dim tensor", lambda: [g.mul_(one) for g in (head, hidden)]),
            ("_foreach_mul_ by a 0-dim tensor", lambda: torch._foreach_mul_([head, hidden], one)),
            ("mul_ by a number", lambda: [g.mul_(1.0) for g in (head, hidden)])]
    print("\nScaling the head's and the hidden states' gradients (128,256 x 4096 and 16,384 x 4096, bf16):")
    for name, fn in rows:
        print(f"- {name}: {cuda_ms(fn, 5, 20):.3f} ms")


# ---------------------------------------------------------------------------------------------
# speed: the proxy, ours and transformers, one training step each as train.py takes it


def build_transformers(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM
    m, t = seed_model_config(layers), seed_model_config(layers).transformer
    r = t.rotary
    config = LlamaConfig(
        vocab_size=m.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.ffn_size, num_hidden_layers=layers,
        num_attention_heads=t.num_attention_heads, num_key_value_heads=t.head_groups, head_dim=t.head_dim,
        rms_norm_eps=t.normalization.epsilon, max_position_embeddings=4096, tie_word_embeddings=False,
        attention_bias=False, mlp_bias=False, use_cache=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": r.scale_factor,
                         "low_freq_factor": r.low_frequency_factor, "high_freq_factor": r.high_frequency_factor,
                         "original_max_position_embeddings": r.original_context_length})
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            net = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return net.train()


PROFILES = []  # tables printed at the end of `speed`


def train_step_times(net, loss_fn, micro_batch: int, steps: int = 5, warmup: int = 2, compile: bool = False,
                     profile: bool = False):
    """Median seconds of a whole step (16 sequences of 4096 tokens in micro-batches), of its forward+backward
    per micro-batch and of the optimizer (reduce + update); the peak memory. profile: print one more step's
    GPU time by kernel (after the table, at the end of the output)."""
    opt = ZeroAdamW(net, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, decays=train.decays, zero_stage=2)
    forward = torch.compile(net) if compile else net
    gen = torch.Generator(device="cuda").manual_seed(1)
    batches = [torch.randint(0, 128256, (micro_batch, 4097), device="cuda", generator=gen)
               for _ in range(16 // micro_batch)]
    torch.cuda.reset_peak_memory_stats()
    whole, model_part, optimizer_part = [], [], []
    for step in range(warmup + steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        events = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
        events[0].record()
        opt.zero_grad()
        for tokens in batches:
            (loss_fn(forward, tokens) / len(batches)).backward()
        events[1].record()
        opt.update(1e-4, 1.0, opt.reduce())
        events[2].record()
        torch.cuda.synchronize()
        if step >= warmup:
            whole.append(time.perf_counter() - start)
            model_part.append(events[0].elapsed_time(events[1]) / 1000 / len(batches))
            optimizer_part.append(events[1].elapsed_time(events[2]) / 1000)
    peak = torch.cuda.max_memory_allocated()
    if profile:  # one more step, its GPU time by kernel
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            opt.zero_grad()
            for tokens in batches:
                (loss_fn(forward, tokens) / len(batches)).backward()
            opt.update(1e-4, 1.0, opt.reduce())
            torch.cuda.synchronize()
        PROFILES.append(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70))
    del opt, forward
    return statistics.median(whole), statistics.median(model_part), statistics.median(optimizer_part), peak


def ours_loss(net, tokens):
    return net(tokens[:, :-1], tokens[:, 1:])


def transformers_loss(net, tokens):
    return net(input_ids=tokens[:, :-1], labels=tokens[:, :-1]).loss  # transformers shifts the labels itself


def speed(compile_micro_batches: list[int], budget_s: float = 150):
    started = time.perf_counter()
    import transformers
    print(f"## The 1-GPU proxy: 8B shapes, 4 layers, batch 16 x 4096 tokens, bf16, ZeroAdamW (stage 2, world 1)\n")
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}, transformers {transformers.__version__}\n")
    print("| model | micro-batch | tokens/s (whole step) | fwd+bwd per micro-batch | optimizer per step | "
          "peak memory | compile+warm-up |")
    print("|---|---|---|---|---|---|---|")
    runs = [("ours (model.py, kernels)", lambda: build_ours(4), ours_loss, 4, False),
            ("transformers eager (sdpa)", lambda: build_transformers(4), transformers_loss, 4, False)]
    runs += [("transformers + torch.compile", lambda: build_transformers(4), transformers_loss, mb, True)
             for mb in compile_micro_batches]
    results = {}
    for name, build, loss_fn, mb, compile in runs:
        if compile and time.perf_counter() - started > budget_s:
            print(f"| {name} | {mb} | not run: {budget_s:.0f} s of this bench had passed |||||")
            continue
        free_memory()
        t0 = time.perf_counter()
        try:
            net = build()
            whole, fwd_bwd, optimizer, peak = train_step_times(net, loss_fn, mb, compile=compile,
                                                               profile=name.startswith("ours"))
        except torch.OutOfMemoryError:
            print(f"| {name} | {mb} | out of memory |||||", flush=True)
            net = None
            continue
        finally:
            if compile:
                torch._dynamo.reset()
        setup = time.perf_counter() - t0 - 7 * whole
        tokens_per_s = 16 * 4096 / whole
        results[(name, mb)] = tokens_per_s
        print(f"| {name} | {mb} | {tokens_per_s:,.0f} | {fwd_bwd * 1000:.1f} ms | {optimizer * 1000:.1f} ms | "
              f"{peak / 1e9:.1f} GB | {setup:.0f} s |", flush=True)
        del net
    ours = results.get(("ours (model.py, kernels)", 4))
    for (name, mb), value in results.items():
        if ours and not name.startswith("ours"):
            print(f"\nours / {name} at micro-batch {mb}: {ours / value:.3f}")
    for table in PROFILES:
        print(f"\nOne step of ours by kernel (GPU time):\n\n{table}")


# ---------------------------------------------------------------------------------------------
# cap: the seed at 8 ranks on an 80 GB card, and the proxy given the same memory per block


def cap(ranks: int = 8, capacity: int = H100_80GB):
    """Memory that train.py's estimate (recompute_layers) sees, term by term, for one rank of the seed and for
    the proxy; the proxy's cap gives it 4/32 of the full rank's memory for blocks, the rest as it has it."""
    torch.ones(1, device="cuda") @ torch.ones(1, 1, device="cuda")
    free, total = torch.cuda.mem_get_info()
    context = total - free - torch.cuda.memory_reserved()  # the CUDA context, also on an 80 GB card
    full, proxy = seed_model_config(32), seed_model_config(4)
    with torch.device("meta"):
        n_full, n_proxy = (count_parameters(Llama(m, 4096)) for m in (full, proxy))
    t, tokens, head = full.transformer, 4 * 4096, full.vocab_size * full.transformer.hidden_size
    gb = lambda n: f"{n / 1e9:.2f} GB"  # noqa: E731
    # The workspace of train.py's estimate: the head's gradient, then the larger of the loss's logits chunk (with
    # the hidden states' gradient) and one block's backward, at ZeRO-2 over several ranks float32 staging of the
    # head's bucket and two default ones, and 1 GB + 2% of the card as allocator slack.
    loss = 2**29 + tokens * t.hidden_size * 2
    backward = tokens * 2 * (t.ffn_size + 2 * t.hidden_size) + 3 * 2 * t.ffn_size * t.hidden_size
    common = head * 2 + max(loss, backward)
    staging = 4 * (head + 2**27)
    slack_full = 1e9 + 0.02 * capacity
    fixed_full = 2 * n_full + 12 * n_full / ranks + 4 * n_full / ranks
    blocks_full = capacity - context - fixed_full - common - staging - slack_full
    per_block = blocks_full / t.num_layers
    fixed_proxy = 18 * n_proxy
    # cap = context + fixed_proxy + common + 1e9 + 0.02 cap + 4 per_block
    cap_bytes = (context + fixed_proxy + common + 1e9 + proxy.transformer.num_layers * per_block) / 0.98
    kept, recomputed = tokens * t.activation_bytes(2), tokens * t.hidden_size * 2
    print(f"## Memory per rank, the seed at {ranks} ranks on an 80 GB card ({capacity / 1e9:.1f} GB)\n")
    print(f"- parameters: {n_full:,}; bf16 weights {gb(2 * n_full)}; float32 master, exp_avg, exp_avg_sq at "
          f"1/{ranks}: {gb(12 * n_full / ranks)}; float32 gradient shard at 1/{ranks}: {gb(4 * n_full / ranks)}; "
          f"fixed {gb(fixed_full)}")
    print(f"- CUDA context (measured here): {gb(context)}")
    print(f"- workspace: the head's gradient {gb(head * 2)} + max(logits chunk and hidden gradient {gb(loss)}, "
          f"one block's backward {gb(backward)}) = {gb(common)}; ZeRO-2 staging {gb(staging)}; slack {gb(slack_full)}")
    print(f"- left for the {t.num_layers} blocks: {gb(blocks_full)} = {gb(per_block)} per block; a kept block "
          f"holds {gb(kept)}, a recomputed one {gb(recomputed)}")
    fit = int((blocks_full - t.num_layers * recomputed) // (kept - recomputed))
    print(f"- so {min(fit, t.num_layers)} blocks keep their activations: {max(0, t.num_layers - fit)} of "
          f"{t.num_layers} recomputed (train.py's estimate for this rank)\n")
    print(f"## The proxy ({n_proxy:,} parameters, world size 1) with the same memory per block\n")
    print(f"- fixed: bf16 weights + float32 master, exp_avg, exp_avg_sq and gradient = 18 x {n_proxy:,} = "
          f"{gb(fixed_proxy)}; context {gb(context)}; workspace {gb(common)} + slack 1 GB + 2% of the cap")
    print(f"- cap = ({gb(context)} + {gb(fixed_proxy)} + {gb(common)} + 1 GB + 4 x {gb(per_block)}) / 0.98 = "
          f"{gb(cap_bytes)}\n")
    print(int(cap_bytes))


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else ""
    if what == "memory":
        memory()
    elif what == "speed":
        speed([int(mb) for mb in sys.argv[2:]] or [4])
    elif what == "cap":
        cap()
    else:
        print(__doc__)
        sys.exit(2)
