"""ZeroAdamW: exactly torch.optim.AdamW in one process; 2 gloo processes (ZeRO stage 1 and 2) train a tiny
Llama like 1 process with the same global batch; checkpoints re-shard between 2 ranks and 1.

The 2-process runs happen once per module (the `runs` fixture), in processes started with
torch.multiprocessing; they write their results to files the tests then compare.
"""
import re
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors import safe_open
from safetensors.torch import save_file

from helpers import build_llama, llama_config
from zero import ZeroAdamW


def no_norms_or_biases(name: str) -> bool:  # the weight-decay policy train.py gives the optimizer
    return not name.endswith(("norm.weight", ".bias"))


HP = dict(betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)  # as torch.optim.AdamW takes them
ZERO_HP = dict(HP, decays=no_norms_or_biases)
LRS = [1e-3, 3e-3, 2e-3, 2e-3, 1e-3]  # learning rate of each step
SEQ, MICRO = 32, 2  # tokens per sequence, sequences per micro-batch
RANKS, ACC = 2, 2  # a step's global batch: RANKS x ACC micro-batches (1 process: RANKS x ACC accumulation steps)
SAVE_AT, STEPS = 3, 5  # checkpoint after SAVE_AT steps, then continue to STEPS
SMALL_BUCKETS = 2**14  # bytes: the tiny model spans ~10 buckets, and shards cut through parameters


def tiny_llama(tie: bool, seed: int = 0, vocab: int = 128, biases: bool = False):
    return build_llama(llama_config(vocab=vocab, tied=tie, biases=biases, theta=10000.0, scaling="none"), SEQ, seed=seed)


def take_step(opt: ZeroAdamW, lr: float, max_grad_norm: float) -> float:
    """A whole optimizer step as train.py takes it: reduce, then clip, update and publish."""
    norm = opt.reduce()
    opt.update(lr, max_grad_norm, norm)
    return norm.item()


def micro_batch(step: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The index-th micro-batch of step `step`'s global batch (rank r of 2 reads r*ACC .. r*ACC+ACC-1)."""
    tokens = torch.randint(0, 128, (MICRO, SEQ + 1), generator=torch.Generator().manual_seed(1000 * step + index))
    return tokens[:, :-1], tokens[:, 1:]


def train(model, opt, steps, rank: int = 0, world: int = 1) -> dict:
    """Steps as train.py does them: each micro-batch loss divided by (accumulation steps x world size)."""
    acc = RANKS * ACC // world
    losses, norms = [], []
    for step in steps:
        opt.zero_grad()
        total = torch.zeros(())
        for m in range(acc):
            loss = model(*micro_batch(step, rank * acc + m))
            (loss / (acc * world)).backward()
            total += loss.detach()
        if world > 1:
            dist.all_reduce(total)
        losses.append(total.item() / (acc * world))
        norms.append(take_step(opt, LRS[step], 1.0))
    return dict(losses=losses, norms=norms, weights=weights(model))


def weights(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_close_weights(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=lambda m: f"{k}: {m}")


class Shard:
    """What load_sharded_state needs of a safetensors `safe_open` handle, over a dict."""

    def __init__(self, tensors: dict):
        self.tensors = tensors

    def keys(self):
        return list(self.tensors)

    def get_tensor(self, key):
        return self.tensors[key]


def open_shards(paths) -> list:
    return [safe_open(str(p), "pt") for p in paths]


# ---------------------------------------------------------------------------------------------
# One process


@pytest.mark.parametrize("stage", [1, 2])
def test_world_size_1_is_torch_adamw(stage):
    model, ref = tiny_llama(tie=False, biases=True), tiny_llama(tie=False, biases=True)
    opt = ZeroAdamW(model, zero_stage=stage, bucket_bytes=SMALL_BUCKETS, **ZERO_HP)
    names = [n for n, _ in ref.named_parameters()]
    assert any(n.endswith(".bias") for n in names) and any(n.endswith("norm.weight") for n in names)
    decay = [p for n, p in ref.named_parameters() if not n.endswith(("norm.weight", ".bias"))]
    no_decay = [p for n, p in ref.named_parameters() if n.endswith(("norm.weight", ".bias"))]
    ref_opt = torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=LRS[0], **HP)
    clips = [1.0, 0.05, 0.0, 1.0, 0.5]  # step 1 clips hard, step 2 does not clip at all
    for step, (lr, clip) in enumerate(zip(LRS, clips)):
        opt.zero_grad()
        ref_opt.zero_grad()
        for m in range(2):
            (model(*micro_batch(step, m)) / 2).backward()
            (ref(*micro_batch(step, m)) / 2).backward()
        assert all(p.grad is None for p in model.parameters())  # gradients live in the optimizer's buffers
        norm = take_step(opt, lr, clip)
        ref_norm = torch.nn.utils.get_total_norm([p.grad for p in ref.parameters()])
        assert norm == pytest.approx(ref_norm.item(), rel=1e-6)  # summed in another order: the last bit may differ
        if step == 1:
            assert norm > 10 * clip  # the clipping is really active
        # Clipped by the same norm, the update is AdamW's bit for bit. (Clipped by torch's own norm, a last-bit
        # difference in the coefficient grows through a gradient element that nearly cancels: 2e-6 by step 3.)
        if clip > 0:
            torch.nn.utils.clip_grads_with_norm_(ref.parameters(), clip, torch.tensor(norm))
        for group in ref_opt.param_groups:
            group["lr"] = lr
        ref_opt.step()
        assert_close_weights(weights(model), weights(ref), atol=0)
    assert opt.step_count == ref_opt.state[decay[0]]["step"].item() == len(LRS)


def test_bf16_training_keeps_float32_masters():
    model, ref = (torch.nn.Linear(1, 64, bias=False, dtype=torch.bfloat16) for _ in range(2))
    for m in (model, ref):
        m.weight.data.fill_(1.0)
    kw = dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    opt, ref_opt = ZeroAdamW(model, **kw), torch.optim.AdamW(ref.parameters(), lr=1e-4, **kw)
    for _ in range(50):  # gradient 1 everywhere: each AdamW step moves a weight by about lr = 1e-4
        opt.zero_grad()
        ref_opt.zero_grad()
        model.weight.sum().backward()
        ref.weight.sum().backward()
        take_step(opt, 1e-4, 0.0)
        ref_opt.step()
    master = opt.sharded_state()["master/weight"]
    assert master.dtype == torch.float32 and model.weight.dtype == torch.bfloat16
    torch.testing.assert_close(master, torch.full((64,), 1 - 50e-4), rtol=0, atol=1e-6)
    assert torch.equal(model.weight.flatten(), master.to(torch.bfloat16))  # 0.995 -> bf16 0.99609375
    assert torch.all(ref.weight == 1.0)  # bf16-only AdamW: every 1e-4 update rounds away at 1.0


def test_load_rejects_another_models_state():
    state = ZeroAdamW(tiny_llama(tie=True), **ZERO_HP).sharded_state()
    name = "layers.1.mlp.up_proj.weight"
    missing = {k: v for k, v in state.items() if not k.endswith("/" + name)}
    with pytest.raises(ValueError, match=re.escape(f"no state for tensor '{name}'")):
        ZeroAdamW(tiny_llama(tie=True), **ZERO_HP).load_sharded_state([Shard(missing)])
    no_moment = {k: v for k, v in state.items() if k != f"exp_avg_sq/{name}"}
    with pytest.raises(ValueError, match=re.escape(f"'exp_avg_sq/{name}' is missing")):
        ZeroAdamW(tiny_llama(tie=True), **ZERO_HP).load_sharded_state([Shard(no_moment)])
    with pytest.raises(ValueError, match=re.escape("'embed_tokens.weight' has 8192 elements, the model's has 16384")):
        ZeroAdamW(tiny_llama(tie=True, vocab=256), **ZERO_HP).load_sharded_state([Shard(state)])
    with pytest.raises(ValueError, match=re.escape("no state for tensor 'lm_head.weight'")):
        ZeroAdamW(tiny_llama(tie=False), **ZERO_HP).load_sharded_state([Shard(state)])


# ---------------------------------------------------------------------------------------------
# Two gloo processes against one


def worker(rank: int, folder: str) -> None:
    torch.set_num_threads(1)  # two processes on a small machine
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=RANKS,
                            timeout=timedelta(seconds=120))
    out = {}
    for stage in (1, 2):
        for tie in (True, False):
            model = tiny_llama(tie)
            opt = ZeroAdamW(model, zero_stage=stage, bucket_bytes=SMALL_BUCKETS, **ZERO_HP)
            # Sample the float32 staging memory after every gradient hook (these run after the optimizer's).
            peak, launched = [0], [0]

            def sample(_, opt=opt, peak=peak, launched=launched):
                peak[0] = max(peak[0], opt.buffer_numel()["staging"])
                launched[0] = max(launched[0], opt.launched)  # stage 2: buckets launched so far in this backward

            for p in model.parameters():
                p.register_post_accumulate_grad_hook(sample)
            first = train(model, opt, range(SAVE_AT), rank, RANKS)
            save_file(opt.sharded_state(), f"{folder}/s{stage}-{tie}-rank{rank}.safetensors")
            saved = weights(model)
            rest = train(model, opt, range(SAVE_AT, STEPS), rank, RANKS)
            out[stage, tie] = dict(
                losses=first["losses"] + rest["losses"], norms=first["norms"] + rest["norms"],
                weights=rest["weights"], saved=saved, continued=rest["losses"], peak_staging=peak[0],
                buffers=opt.buffer_numel(), buckets=len(opt.buckets), launched_in_backward=launched[0],
                grads_left=sum(p.grad is not None for p in model.parameters()))
    for tie in (True, False):
        # 2 ranks -> 2 ranks, into a model initialized differently: the load must set the weights.
        model = tiny_llama(tie, seed=1)
        opt = ZeroAdamW(model, zero_stage=2, bucket_bytes=SMALL_BUCKETS, **ZERO_HP)
        opt.load_sharded_state(open_shards(f"{folder}/s2-{tie}-rank{r}.safetensors" for r in range(RANKS)))
        out["resume", tie] = dict(loaded=weights(model), **train(model, opt, range(SAVE_AT, STEPS), rank, RANKS))
        # 1 rank -> 2 ranks
        model = tiny_llama(tie, seed=1)
        opt = ZeroAdamW(model, zero_stage=1, **ZERO_HP)  # default bucket size: one bucket
        opt.load_sharded_state(open_shards([f"{folder}/ref-{tie}.safetensors"]))
        out["from1", tie] = dict(loaded=weights(model), **train(model, opt, range(SAVE_AT, STEPS), rank, RANKS))
    for stage in (1, 2):
        model = partly_used()
        out["partly", stage] = train_partly_used(model, ZeroAdamW(model, zero_stage=stage, bucket_bytes=1024, **ZERO_HP),
                                                 rank, RANKS)
    torch.save(out, f"{folder}/result{rank}.pt")
    dist.destroy_process_group()


def partly_used() -> torch.nn.Module:
    """Two layers; the second one is skipped in some micro-batches, so it gets no gradient there."""
    torch.manual_seed(0)
    return torch.nn.ModuleDict({"a": torch.nn.Linear(16, 16), "b": torch.nn.Linear(16, 16)})


def train_partly_used(model, opt, rank: int = 0, world: int = 1) -> dict:
    """Global micro-batch 2 (rank 1's first, at world size 2) skips layer b: on that micro-batch rank 1
    produces no gradient for b while rank 0 does."""
    acc = RANKS * ACC // world
    for step in range(2):
        opt.zero_grad()
        for m in range(acc):
            index = rank * acc + m
            x = torch.randn(4, 16, generator=torch.Generator().manual_seed(100 * step + index))
            y = model["a"](x) if index == 2 else model["b"](model["a"](x))
            (y.square().mean() / (acc * world)).backward()
        take_step(opt, 1e-2, 1.0)
    return dict(buckets=len(opt.buckets), weights=weights(model))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process (reference, with a checkpoint after SAVE_AT steps), then the 2-process runs."""
    folder = tmp_path_factory.mktemp("zero")
    ref = {}
    for tie in (True, False):
        model = tiny_llama(tie)
        opt = ZeroAdamW(model, bucket_bytes=SMALL_BUCKETS, **ZERO_HP)
        first = train(model, opt, range(SAVE_AT))
        save_file(opt.sharded_state(), folder / f"ref-{tie}.safetensors")
        saved = weights(model)
        rest = train(model, opt, range(SAVE_AT, STEPS))
        ref[tie] = dict(losses=first["losses"] + rest["losses"], norms=first["norms"] + rest["norms"],
                        weights=rest["weights"], saved=saved, continued=rest["losses"])
    model = partly_used()
    ref["partly"] = train_partly_used(model, ZeroAdamW(model, bucket_bytes=1024, **ZERO_HP))
    mp.spawn(worker, args=(str(folder),), nprocs=RANKS)
    ranks = [torch.load(folder / f"result{r}.pt") for r in range(RANKS)]
    return folder, ref, ranks


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("stage", [1, 2])
def test_two_ranks_match_one_process(runs, stage, tie):
    _, ref, ranks = runs
    run = ranks[0][stage, tie]
    assert run["buckets"] > 5 and run["grads_left"] == 0
    assert run["losses"] == pytest.approx(ref[tie]["losses"], abs=1e-5, rel=0)
    assert run["norms"] == pytest.approx(ref[tie]["norms"], abs=1e-5, rel=1e-5)
    moved = max((w - ref[tie]["saved"][k]).abs().max().item() for k, w in ref[tie]["weights"].items())
    assert moved > 100 * 1e-5  # the last steps changed the weights far beyond the tolerance
    assert_close_weights(run["weights"], ref[tie]["weights"], atol=1e-5)
    for k, w in run["weights"].items():  # the all-gather leaves every rank with identical weights
        assert torch.equal(w, ranks[1][stage, tie]["weights"][k]), k


def test_stage_2_holds_no_full_gradient_buffer(runs):
    _, _, ranks = runs
    for tie in (True, False):
        for rank in ranks:
            s1, s2 = rank[1, tie], rank[2, tie]
            numel = s1["buffers"]["weights"]
            assert s1["buffers"]["full_grad"] == numel and s1["peak_staging"] == 0  # stage 1: a full float32 copy
            assert s2["buffers"]["full_grad"] == 0  # stage 2: only the shard, plus staging for buckets in flight
            assert s2["buffers"]["shard"] * RANKS == numel and s2["buffers"]["staging"] == 0  # freed after backward
            assert 0 < s2["peak_staging"] <= numel // 2, (s2["peak_staging"], numel)


def test_stage_2_reduces_during_backward(runs):
    _, _, ranks = runs
    for tie in (True, False):
        for rank in ranks:
            # Every bucket's reduce-scatter was launched by a gradient hook, none waited for the end of backward.
            assert rank[2, tie]["launched_in_backward"] == rank[2, tie]["buckets"]


@pytest.mark.parametrize("stage", [1, 2])
def test_parameters_without_gradient_do_not_hang(runs, stage):
    _, ref, ranks = runs
    assert ranks[0]["partly", stage]["buckets"] == 4  # a and b are in different buckets
    for rank in ranks:
        assert_close_weights(rank["partly", stage]["weights"], ref["partly"]["weights"], atol=1e-6)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_resume_on_same_world_size_is_exact(runs, tie):
    folder, ref, ranks = runs
    for rank in ranks:  # 2 ranks -> 2 ranks
        resumed, original = rank["resume", tie], rank[2, tie]
        assert resumed["losses"] == original["continued"]
        for k, w in original["weights"].items():
            assert torch.equal(resumed["loaded"][k], original["saved"][k]), k
            assert torch.equal(resumed["weights"][k], w), k
    model = tiny_llama(tie, seed=1)  # 1 rank -> 1 rank (bit-exact needs the same buckets: same norm summation)
    opt = ZeroAdamW(model, zero_stage=2, bucket_bytes=SMALL_BUCKETS, **ZERO_HP)
    opt.load_sharded_state(open_shards([folder / f"ref-{tie}.safetensors"]))
    assert opt.step_count == SAVE_AT
    resumed = train(model, opt, range(SAVE_AT, STEPS))
    assert resumed["losses"] == ref[tie]["continued"]
    for k, w in ref[tie]["weights"].items():
        assert torch.equal(resumed["weights"][k], w), k


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_reshard_two_ranks_to_one_and_back(runs, tie):
    folder, ref, ranks = runs
    for stage in (1, 2):  # 2 ranks -> 1 rank
        model = tiny_llama(tie, seed=1)
        opt = ZeroAdamW(model, **ZERO_HP)
        opt.load_sharded_state(open_shards(folder / f"s{stage}-{tie}-rank{r}.safetensors" for r in range(RANKS)))
        original = ranks[0][stage, tie]
        for k, w in original["saved"].items():  # exactly where the 2-rank run was
            assert torch.equal(weights(model)[k], w), k
        resumed = train(model, opt, range(SAVE_AT, STEPS))
        assert resumed["losses"] == pytest.approx(original["continued"], abs=1e-5, rel=0)
        assert_close_weights(resumed["weights"], original["weights"], atol=1e-5)
    for rank in ranks:  # 1 rank -> 2 ranks
        resumed = rank["from1", tie]
        for k, w in ref[tie]["saved"].items():
            assert torch.equal(resumed["loaded"][k], w), k
        assert resumed["losses"] == pytest.approx(ref[tie]["continued"], abs=1e-5, rel=0)
        assert_close_weights(resumed["weights"], ref[tie]["weights"], atol=1e-5)
    # Only one rank's file of a 2-rank checkpoint: the rest of each tensor is missing.
    opt = ZeroAdamW(tiny_llama(tie), **ZERO_HP)
    with pytest.raises(ValueError, match="no state for tensor|covers .* elements"):
        opt.load_sharded_state(open_shards([folder / f"s2-{tie}-rank0.safetensors"]))
