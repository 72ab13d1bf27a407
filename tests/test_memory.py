"""What a block keeps for its backward, counted with saved_tensors_hooks, and the recomputation choice
that train.py makes from it (`TransformerConfig.activation_bytes`)."""
import math
from pathlib import Path

import pytest
import torch
import torch.utils.checkpoint

import model
import schema
import train
from helpers import build_llama, llama_config

ROOT = Path(__file__).resolve().parent.parent


def saved_storages(fn, net: torch.nn.Module) -> dict[int, int]:
    """Run fn() and return {storage address: bytes} of every tensor autograd saved for backward, each
    storage once, leaving out the parameters and buffers (weights and rotary tables are not activations)."""
    own = {t.untyped_storage().data_ptr() for t in [*net.parameters(), *net.buffers()]}
    saved = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return saved


SHAPES = [
    dict(),  # grouped-query attention: 4 query heads over 2 key/value heads
    dict(heads=8, kv=2, head_dim=32, ffn=40),  # heads x head_dim (256) != hidden (64)
    dict(heads=4, kv=4, biases=True),  # plain multi-head attention, projections with biases
]


def block_and_input(shape: dict, device: str, dtype: torch.dtype, batch: int = 2, tokens: int = 16, hidden: int = 64,
                    float8: bool = False):
    config = llama_config(layers=1, hidden=hidden, **{"heads": 4, "kv": 2, **shape})
    net = build_llama(config, tokens, dtype, device, seed=0, float8=float8)
    x = torch.randn(batch, tokens, hidden, device=device, dtype=dtype)
    return net, x


def block_bytes_per_token(net, x, recompute: bool = False) -> float:
    block, t = net.layers[0], x.shape[1]
    run = (lambda: torch.utils.checkpoint.checkpoint(block, x, net.cos[:t], net.sin[:t], use_reentrant=False)) \
        if recompute else (lambda: block(x, net.cos[:t], net.sin[:t]))
    return sum(saved_storages(run, net).values()) / (x.shape[0] * t)


@pytest.mark.parametrize("float8", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_block_keeps_only_what_its_backward_needs(shape, float8, monkeypatch):
    """With the kernels (under Triton's interpreter on the CPU), a block saves its input and the residual
    stream after attention, q, k, v after rotary, the attention output, gate and up, each once, and the
    float32 statistics: exactly `activation_bytes` per token. The normalized inputs of the projections and
    SwiGLU's product are recomputed in backward, not kept; float8 keeps nothing more (it casts again)."""
    monkeypatch.setattr(model, "_kernels_on", lambda x: True)
    net, x = block_and_input(shape, "cpu", torch.bfloat16, float8=float8)
    x.requires_grad_()
    assert block_bytes_per_token(net, x) == net.config.transformer.activation_bytes(2)
    # A recomputed block keeps its input alone.
    assert block_bytes_per_token(net, x, recompute=True) == x.shape[-1] * 2


@pytest.mark.parametrize("shape", SHAPES)
def test_block_with_kernels_matches_twins(shape, monkeypatch):
    """The fused block (norm into projections, SwiGLU into the down projection) computes what the twins
    compute, output and every gradient, in float32 on the CPU."""
    results = []
    for kernels_on in (True, False):
        monkeypatch.setattr(model, "_kernels_on", lambda x, on=kernels_on: on)
        net, x = block_and_input(shape, "cpu", torch.float32)
        x = (3 * x).requires_grad_()  # norms whose statistics matter
        y = net.layers[0](x, net.cos[:16], net.sin[:16])
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(2)))
        results.append([y, x.grad] + [p.grad for p in net.layers[0].parameters()])
    for ours, twins in zip(*results):
        torch.testing.assert_close(ours, twins, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("float8", [False, True])
def test_block_keeps_only_what_its_backward_needs_gpu(float8):
    """The same count on the GPU at 8B-like head shapes, with the attention kernels SDPA picks there
    (their saved random-number state adds a few bytes per call, not per token)."""
    net, x = block_and_input(dict(heads=8, kv=2, head_dim=128, ffn=3584), "cuda", torch.bfloat16,
                             batch=2, tokens=2048, hidden=1024, float8=float8)
    x.requires_grad_()
    per_token = net.config.transformer.activation_bytes(2)
    extra = (block_bytes_per_token(net, x) - per_token) * x.shape[0] * x.shape[1]
    assert 0 <= extra <= 256, extra


# ---------------------------------------------------------------------------------------------
# train.py's choice


def seed_config(**overrides) -> schema.Config:
    args = [f"{k}={v}" for k, v in overrides.items()]
    return schema.load_config(str(ROOT / "config" / "llama3_8b.yaml"), args)


def choose(config, free_gb: float, total_gb: float = 85.5, monkeypatch=None, world: int = 1) -> int:
    """train.recompute_layers as if on a GPU with `free_gb` free of `total_gb`, nothing cached."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (int(free_gb * 1e9), int(total_gb * 1e9)))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 0)
    monkeypatch.setattr(train.dist, "is_initialized", lambda: world > 1)
    monkeypatch.setattr(train.dist, "get_world_size", lambda: world)
    return train.recompute_layers(config, torch.device("cuda"))


def test_recompute_choice_follows_the_activation_bytes(monkeypatch):
    """At the seed's shapes a kept block holds 1.55 GB (4 x 4096 tokens x 94,344 bytes), a recomputed one
    its 0.13 GB input. Each 1.41 GB more frees one more block from recomputation; the last block is never
    recomputed (it would be rebuilt at the peak)."""
    config = seed_config()
    t = config.model.base_model.transformer
    assert t.activation_bytes(2) == 94_344
    kept, recomputed = 16384 * 94_344, 16384 * 4096 * 2
    at_8_ranks = choose(config, 85.5 - 32.1 - 0.6, monkeypatch=monkeypatch, world=8)
    assert at_8_ranks <= 8
    one_more = choose(config, 85.5 - 32.1 - 0.6 - (kept - recomputed) / 1e9, monkeypatch=monkeypatch, world=8)
    assert one_more == at_8_ranks + 1
    assert choose(config, 1000, total_gb=1100, monkeypatch=monkeypatch) == 0
    assert choose(seed_config(**{"model.base_model.recompute_layers": 3}), 60, monkeypatch=monkeypatch) == 3


def test_run_that_cannot_fit_stops_and_names_a_micro_batch(monkeypatch):
    config = seed_config(**{"model.base_model.transformer.num_layers": 4})
    with pytest.raises(schema.ConfigError, match=r"micro_batch_size 4 does not fit in GPU memory, even with every "
                                                r"block recomputed.* batch.micro_batch_size [123] would fit"):
        choose(config, 5.0, total_gb=45.0, monkeypatch=monkeypatch)
    with pytest.raises(schema.ConfigError, match="not even micro_batch_size 1 fits"):
        choose(config, 1.0, total_gb=45.0, monkeypatch=monkeypatch)
    # The check holds for a configured number too: the run would run out of memory either way.
    with pytest.raises(schema.ConfigError, match="does not fit"):
        choose(seed_config(**{"model.base_model.recompute_layers": 32}), 3.0, monkeypatch=monkeypatch)
