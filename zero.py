"""ZeRO-1/2: AdamW whose state (and at stage 2 the gradients) is sharded over the data-parallel ranks.

Every parameter lives in a flat bucket of the training dtype, a full copy on every rank. Each of the
W ranks owns one contiguous 1/W of every bucket, and keeps for it the float32 master weights, the
AdamW moments and a float32 gradient shard. One optimizer step, for one bucket:

      bucket, training dtype, same on all ranks     [ rank 0's | rank 1's | ... | rank W-1's ]
                 |  forward + backward, every micro-batch
                 v
      float32 gradients of the bucket, per rank     [   g0     |    g1    | ... |    gW-1    ]
                 |  reduce-scatter (SUM over ranks)   stage 1: once per step, from a full float32 copy
                 v                                    stage 2: per bucket as backward produces it
      owner's float32 gradient shard                [ sum g0 ]  on rank 0, [ sum g1 ] on rank 1, ...
                 |  global norm (all-reduce of the squares), clip,
                 |  AdamW on the owner's float32 master shard
                 v
      master shard cast to the training dtype  -->  the owner's slice of the bucket
                 |  all-gather
                 v
      bucket, training dtype, same on all ranks     = the weights of the next forward

Stage 2 overlaps communication with backward: a hook copies each parameter's accumulated gradient
into its bucket's float32 staging buffer and frees `param.grad`; a complete bucket's reduce-scatter
is launched asynchronously while backward goes on. Buckets hold parameters in backward order and are
launched strictly in bucket order; at the end of each backward the rest are launched (a missing
gradient counts as zero) and all are awaited. So every rank issues every bucket's reduce-scatter
once per backward in the same order, even where ranks differ in which parameters got gradients.

At world size 1 there are no collectives and the update is exactly torch.optim.AdamW after
torch.nn.utils.clip_grad_norm_, with weight decay on the parameters the caller's `decays(name)` picks.
The arithmetic is one pure function, `adamw_step`; the class around it only moves data.
Gradient scaling is the caller's: gradients are summed over micro-batches and ranks.
"""
from typing import Callable, NamedTuple

import torch
import torch.distributed as dist

# torch 2.13 renamed the single-tensor collectives; torch 2.11 has only the old names. Both forms
# work on NCCL and on gloo (gloo emulates reduce-scatter with an all-reduce: fine for CPU tests).
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

ALIGN = 64  # elements; every parameter and every shard starts at a multiple of this (aligned loads in kernels)
MAX_IN_FLIGHT = 2  # stage 2: reduce-scatters in flight; bounds the float32 staging memory
BUCKET_BYTES = 2**27  # per bucket (or a larger parameter): full-bandwidth collectives, yet early reduce-scatters


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@torch.no_grad()
def adamw_step(master, grad, exp_avg, exp_avg_sq, *, step: int, lr: float, betas: tuple[float, float],
               eps: float, weight_decay: float, decay_ranges: list[tuple[int, int]]) -> None:
    """One AdamW update of the float32 tensors `master`, `exp_avg`, `exp_avg_sq` in place, from `grad`;
    `step` counts from 1. Decoupled weight decay shrinks only master[lo:hi] for (lo, hi) in
    `decay_ranges`. The same operations, in the same order, as torch.optim.AdamW's single-tensor path."""
    beta1, beta2 = betas
    for lo, hi in decay_ranges:
        master[lo:hi].mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = (exp_avg_sq.sqrt() / (1 - beta2**step) ** 0.5).add_(eps)
    master.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1**step))


# A parameter placed in a bucket at `offset`; the part of one in this rank's shard: shard[lo:hi] is the
# flattened parameter's [begin : begin + hi - lo].
_Entry = NamedTuple("_Entry", [("name", str), ("param", torch.Tensor), ("offset", int)])
_Owned = NamedTuple("_Owned", [("name", str), ("lo", int), ("hi", int), ("begin", int)])


class _Bucket:
    """Parameters `entries` moved into one flat buffer, and this rank's shard of it."""

    def __init__(self, entries: list[_Entry], world: int, rank: int, stage: int, decays: Callable[[str], bool]):
        first, last = entries[0].param, entries[-1]
        numel = _round_up(last.offset + last.param.numel(), ALIGN * world)  # padded: W equal, aligned shards
        self.entries, self.numel = entries, numel
        self.data = torch.zeros(numel, dtype=first.dtype, device=first.device)
        for _, p, offset in entries:
            self.data[offset : offset + p.numel()].copy_(p.data.flatten())
            p.data = self.data[offset : offset + p.numel()].view_as(p)  # the model's weights are now views
        size = numel // world
        self.start = rank * size  # this rank's shard is data[start : start + size]
        self.shard = self.data[self.start : self.start + size]  # this rank's slice of the weights
        self.master = self.shard.to(torch.float32, copy=True)  # float32 master weights
        self.exp_avg, self.exp_avg_sq = torch.zeros_like(self.master), torch.zeros_like(self.master)
        self.grad = torch.zeros_like(self.master)  # summed over micro-batches and ranks
        # Stage 1 (world > 1) sums every micro-batch's gradients into a full float32 copy of the bucket;
        # at world size 1 the shard is the whole bucket and gradients are summed straight into it.
        self.full_grad = torch.zeros(numel, device=first.device) if stage == 1 and world > 1 else None
        self.staging = None  # stage 2: float32 gradients of the current micro-batch, while needed
        self.ready = 0  # stage 2: parameters whose gradient arrived in the current backward
        self.owned: list[_Owned] = []
        for name, p, offset in entries:
            lo, hi = max(offset, self.start), min(offset + p.numel(), self.start + size)
            if lo < hi:
                self.owned.append(_Owned(name, lo - self.start, hi - self.start, lo - offset))
        # The ranges of the shard that get weight decay, adjacent ones merged (fewer kernel launches).
        self.decay_ranges: list[tuple[int, int]] = []
        for name, lo, hi, _ in self.owned:
            if decays(name) and self.decay_ranges and self.decay_ranges[-1][1] == lo:
                self.decay_ranges[-1] = (self.decay_ranges[-1][0], hi)
            elif decays(name):
                self.decay_ranges.append((lo, hi))


class ZeroAdamW:
    def __init__(self, model: torch.nn.Module, *, betas: tuple[float, float], eps: float, weight_decay: float,
                 decays: Callable[[str], bool] = lambda name: True, zero_stage: int = 1, group=None,
                 bucket_bytes: int = BUCKET_BYTES):
        """Moves every parameter of `model` into flat buckets of its dtype (`param.data` becomes a view:
        don't move the model afterwards). `decays(name)`: whether that parameter gets weight decay (the
        caller's policy). `group`: the data-parallel ranks (default: the default process group if any)."""
        if zero_stage not in (1, 2):
            raise ValueError(f"zero_stage must be 1 or 2, got {zero_stage}")
        self.betas, self.eps, self.weight_decay, self.stage, self.group = betas, eps, weight_decay, zero_stage, group
        distributed = dist.is_available() and dist.is_initialized()
        self.world, self.rank = (dist.get_world_size(group), dist.get_rank(group)) if distributed else (1, 0)
        self.step_count = 0
        self.params = dict(model.named_parameters())  # a tied weight appears once, under its first name
        self.buckets, entries, offset = [], [], 0
        for name, p in reversed(self.params.items()):  # reverse registration order ~ backward order
            if entries and (offset + p.numel() > bucket_bytes // p.element_size()
                            or (p.dtype, p.device) != (entries[0].param.dtype, entries[0].param.device)):
                self.buckets.append(_Bucket(entries, self.world, self.rank, zero_stage, decays))
                entries, offset = [], 0
            entries.append(_Entry(name, p, offset))
            offset = _round_up(offset + p.numel(), ALIGN)
        if entries:
            self.buckets.append(_Bucket(entries, self.world, self.rank, zero_stage, decays))
        for b in self.buckets:
            for _, p, offset in b.entries:  # fires once per backward, all uses (a tied head too) summed
                p.register_post_accumulate_grad_hook(
                    lambda param, b=b, offset=offset: self._on_grad(b, offset, param))
        self._pending = []  # stage 2: (work, bucket) reduce-scatters in flight, oldest first
        self.launched, self._in_backward = 0, False  # stage 2: buckets launched so far in this backward

    def buffer_numel(self) -> dict[str, int]:
        """Elements held now: `weights` (training dtype); float32 `shard` (masters, moments, gradient each),
        stage 1's `full_grad` and stage 2's `staging` (buckets in flight)."""
        return dict(weights=sum(b.numel for b in self.buckets), shard=sum(b.master.numel() for b in self.buckets),
                    full_grad=sum(b.full_grad.numel() for b in self.buckets if b.full_grad is not None),
                    staging=sum(b.staging.numel() for b in self.buckets if b.staging is not None))

    # -----------------------------------------------------------------------------------------
    # Gradients: hooks during backward

    @torch.no_grad()
    def _on_grad(self, b: _Bucket, offset: int, param: torch.Tensor) -> None:
        grad = param.grad.flatten()
        param.grad = None  # from here on the gradient lives only in float32 buffers
        if self.world == 1 or self.stage == 1:  # summed here; at stage 1 reduce() reduce-scatters them
            (b.full_grad if b.full_grad is not None else b.grad)[offset : offset + grad.numel()].add_(grad)
            return
        if not self._in_backward:  # the first gradient of this backward (each must reach one parameter)
            # A private PyTorch hook (no public equivalent; DDP and FSDP use it the same way): run
            # _end_backward once the autograd engine has finished this backward pass, on its thread.
            self._in_backward = True
            torch.autograd.Variable._execution_engine.queue_callback(self._end_backward)
        if b.staging is None:
            b.staging = torch.zeros(b.numel, device=b.data.device)  # padding and missing gradients stay 0
        b.staging[offset : offset + grad.numel()].copy_(grad)
        b.ready += 1
        self._launch_buckets(only_complete=True)

    def _launch_buckets(self, only_complete: bool) -> None:
        """Launch buckets in order: every rank must issue the same reduce-scatters in the same order."""
        while self.launched < len(self.buckets):
            b = self.buckets[self.launched]
            if only_complete and b.ready < len(b.entries):
                return
            if b.staging is None:  # no parameter of this bucket got a gradient in this backward
                b.staging = torch.zeros(b.numel, device=b.data.device)
            self._wait(MAX_IN_FLIGHT - 1)
            # Add this rank's sum of the earlier micro-batches into its own slice: the reduce-scatter's
            # output is then the new total, written straight into the shard (no extra buffer).
            b.staging[b.start : b.start + b.grad.numel()].add_(b.grad)
            work = _reduce_scatter(b.grad, b.staging, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
            self._pending.append((work, b))
            b.ready = 0
            self.launched += 1

    def _wait(self, keep: int) -> None:
        """Wait for the oldest reduce-scatters until at most `keep` are in flight; free their staging."""
        while len(self._pending) > keep:
            work, b = self._pending.pop(0)
            work.wait()
            b.staging = None

    def _end_backward(self) -> None:
        self._launch_buckets(only_complete=False)
        self._wait(0)
        self.launched, self._in_backward = 0, False

    # -----------------------------------------------------------------------------------------
    # The step: reduce() gives the global gradient norm; the caller checks it, then update() clips,
    # takes the AdamW step and publishes the weights (or, for a step to skip, zero_grad() drops it).

    @torch.no_grad()
    def zero_grad(self) -> None:
        """Start a step's accumulation: call once before its first micro-batch."""
        for grad in [b.grad for b in self.buckets] + [b.full_grad for b in self.buckets if b.full_grad is not None]:
            grad.zero_()

    @torch.no_grad()
    def reduce(self) -> torch.Tensor:
        """Finish the reduce-scatters; return the global gradient L2 norm, as a device tensor (no sync)."""
        self._wait(0)
        if self.stage == 1 and self.world > 1:
            for work in [_reduce_scatter(b.grad, b.full_grad, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
                         for b in self.buckets]:  # all launched, then awaited
                work.wait()
        # Squares summed over this rank's shards (padding is zero), then over ranks.
        square = torch.stack([torch.linalg.vector_norm(b.grad) for b in self.buckets]).square().sum()
        if self.world > 1:
            dist.all_reduce(square, group=self.group)
        return square.sqrt()

    @torch.no_grad()
    def update(self, lr: float, max_grad_norm: float, norm: torch.Tensor) -> None:
        """Clip the reduced gradients to `max_grad_norm` (<= 0: no clipping) given their `norm`, take an
        AdamW step with `lr` on the float32 shards, and publish the new weights to every rank."""
        if max_grad_norm > 0:
            # As torch.nn.utils.clip_grad_norm_: a tensor coefficient, so no host synchronization here.
            coef = (max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
            for b in self.buckets:
                b.grad.mul_(coef)
        self.step_count += 1
        for b in self.buckets:
            adamw_step(b.master, b.grad, b.exp_avg, b.exp_avg_sq, step=self.step_count, lr=lr, betas=self.betas,
                       eps=self.eps, weight_decay=self.weight_decay, decay_ranges=b.decay_ranges)
        self._publish_weights()

    def _publish_weights(self) -> None:
        """Each rank casts its master shard into its slice of the buckets; the all-gather fills the rest."""
        for b in self.buckets:
            b.shard.copy_(b.master)
        if self.world > 1:
            for work in [_all_gather(b.data, b.shard, group=self.group, async_op=True) for b in self.buckets]:
                work.wait()

    # -----------------------------------------------------------------------------------------
    # Checkpoints: each rank saves its own part; any number of ranks can load them

    KINDS = ("master", "exp_avg", "exp_avg_sq")

    def sharded_state(self) -> dict[str, torch.Tensor]:
        """This rank's part as named tensors: `step`; for each parameter NAME it owns a slice of, that slice
        of `master/NAME`, `exp_avg/NAME`, `exp_avg_sq/NAME` (float32), and `range/NAME` = [begin, end,
        numel] (int64: where the slice lies in the flattened parameter, and that parameter's size)."""
        state = {"step": torch.tensor(self.step_count, dtype=torch.int64)}
        for b in self.buckets:
            for name, lo, hi, begin in b.owned:
                for kind in self.KINDS:
                    state[f"{kind}/{name}"] = getattr(b, kind)[lo:hi].clone()
                state[f"range/{name}"] = torch.tensor([begin, begin + hi - lo, self.params[name].numel()])
        return state

    @torch.no_grad()
    def load_sharded_state(self, shards: list) -> None:
        """Load the `sharded_state()` of every rank of a saved run (any number of ranks), given as objects
        with `.keys()` and `.get_tensor(key)` (safetensors `safe_open` handles). This rank reads only
        the slices that overlap what it owns; then the weights are set from the masters."""
        pieces, steps = {name: [] for name in self.params}, set()  # name -> [(shard, begin, end)]
        for shard in shards:
            keys = set(shard.keys())
            steps.update(int(shard.get_tensor(key)) for key in keys if key == "step")
            for name in (key[len("range/"):] for key in keys if key.startswith("range/")):
                if name not in self.params:
                    raise ValueError(f"optimizer checkpoint has tensor '{name}', which the model does not have")
                begin, end, numel = shard.get_tensor(f"range/{name}").tolist()
                if numel != self.params[name].numel():
                    raise ValueError(f"optimizer checkpoint: tensor '{name}' has {numel} elements, the model's "
                                     f"has {self.params[name].numel()} (a checkpoint of another model?)")
                for missing in (f"{kind}/{name}" for kind in self.KINDS if f"{kind}/{name}" not in keys):
                    raise ValueError(f"optimizer checkpoint: '{missing}' is missing")
                pieces[name].append((shard, begin, end))
        if len(steps) != 1:
            raise ValueError(f"optimizer checkpoint: expected one step count over its shards, found {sorted(steps)}")
        for name in (name for name, found in pieces.items() if not found):
            raise ValueError(f"optimizer checkpoint has no state for tensor '{name}'")
        for b in self.buckets:
            for name, lo, hi, begin in b.owned:
                end, covered = begin + hi - lo, 0
                for shard, s, e in pieces[name]:
                    a, z = max(begin, s), min(end, e)  # overlap, in the flattened parameter
                    for kind in self.KINDS if a < z else ():
                        saved = shard.get_tensor(f"{kind}/{name}")
                        getattr(b, kind)[lo + a - begin : lo + z - begin].copy_(saved[a - s : z - s])
                    covered += max(0, z - a)
                if covered != end - begin:
                    raise ValueError(f"optimizer checkpoint covers {covered} of the {end - begin} elements "
                                     f"[{begin}, {end}) of tensor '{name}' this rank needs (incomplete shards?)")
        self.step_count = steps.pop()
        self.zero_grad()
        self._publish_weights()
