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

Stage 2 overlaps communication with backward: as each parameter's gradient is accumulated, a hook
copies it into its bucket's float32 staging buffer and frees `param.grad`; once a bucket is complete
its reduce-scatter is launched asynchronously while backward goes on with the layers before it.
Buckets hold parameters in reverse order, the order backward produces them, and are launched
strictly in bucket order. At the end of each backward the buckets not yet launched are launched
too, a parameter that got no gradient counting as zero, and all reductions are awaited: so every
rank issues every bucket's reduce-scatter once per backward, in the same order, even where ranks
differ in which parameters got gradients (each backward must reach at least one parameter).

At world size 1 there are no collectives and the update is exactly torch.optim.AdamW after
torch.nn.utils.clip_grad_norm_, with weight decay on every parameter except norm weights and biases.
Gradient scaling is the caller's: gradients are summed over micro-batches and ranks.
"""
import torch
import torch.distributed as dist

# torch 2.13 renamed the single-tensor collectives; torch 2.11 has only the old names. Both forms
# work on NCCL and on gloo (gloo emulates reduce-scatter with an all-reduce: fine for CPU tests).
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

ALIGN = 64  # elements; every parameter and every shard starts at a multiple of this (aligned loads in kernels)
MAX_IN_FLIGHT = 2  # stage 2: reduce-scatters in flight; bounds the float32 staging memory


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class _Bucket:
    """Parameters `entries` = [(name, param, offset)] moved into one flat buffer, and this rank's shard."""

    def __init__(self, entries: list, world: int, rank: int, stage: int):
        first = entries[0][1]
        _, last, last_offset = entries[-1]
        numel = _round_up(last_offset + last.numel(), ALIGN * world)  # padded: W equal, aligned shards
        self.entries, self.numel = entries, numel
        self.data = torch.zeros(numel, dtype=first.dtype, device=first.device)
        for _, p, offset in entries:
            self.data[offset : offset + p.numel()].copy_(p.data.flatten())
            p.data = self.data[offset : offset + p.numel()].view_as(p)  # the model's weights are now views
        size = numel // world
        self.start = rank * size
        self.shard = self.data[self.start : self.start + size]  # this rank's slice of the weights
        self.master = self.shard.to(torch.float32, copy=True)  # float32 master weights
        self.exp_avg = torch.zeros_like(self.master)
        self.exp_avg_sq = torch.zeros_like(self.master)
        self.grad = torch.zeros_like(self.master)  # summed over micro-batches and ranks
        # Stage 1 (world > 1) sums every micro-batch's gradients into a full float32 copy of the bucket;
        # at world size 1 the shard is the whole bucket and gradients are summed straight into it.
        self.full_grad = torch.zeros(numel, device=first.device) if stage == 1 and world > 1 else None
        self.staging = None  # stage 2: float32 gradients of the current micro-batch, while needed
        self.ready = 0  # stage 2: parameters whose gradient arrived in the current backward
        # What this rank owns of each parameter: (name, shard begin, shard end, begin in the flat parameter).
        self.owned = []
        for name, p, offset in entries:
            lo, hi = max(offset, self.start), min(offset + p.numel(), self.start + size)
            if lo < hi:
                self.owned.append((name, lo - self.start, hi - self.start, lo - offset))


class ZeroAdamW:
    def __init__(self, model: torch.nn.Module, *, lr: float, betas: tuple[float, float], eps: float,
                 weight_decay: float, zero_stage: int = 1, group=None, bucket_bytes: int = 2**27):
        """Moves every parameter of `model` into flat buckets of its dtype (`param.data` becomes a view:
        don't move the model afterwards). `group`: the data-parallel ranks (default: the default process
        group if initialized, else world size 1). `bucket_bytes` (training dtype; a larger parameter gets
        a bucket of its own): big enough for full-bandwidth collectives, small enough that the first
        reduce-scatter starts early in backward and the float32 staging buffers stay small.
        No weight decay on parameters whose name ends with 'norm.weight' or '.bias'."""
        if zero_stage not in (1, 2):
            raise ValueError(f"zero_stage must be 1 or 2, got {zero_stage}")
        self.lr, self.betas, self.eps, self.weight_decay, self.stage = lr, betas, eps, weight_decay, zero_stage
        self.group = group
        distributed = dist.is_available() and dist.is_initialized()
        self.world = dist.get_world_size(group) if distributed else 1
        self.rank = dist.get_rank(group) if distributed else 0
        self.step_count = 0
        self.params = dict(model.named_parameters())  # a tied weight appears once, under its first name
        self.buckets, entries, offset = [], [], 0
        for name, p in reversed(self.params.items()):  # reverse registration order ~ backward order
            if entries and (offset + p.numel() > bucket_bytes // p.element_size()
                            or (p.dtype, p.device) != (entries[0][1].dtype, entries[0][1].device)):
                self.buckets.append(_Bucket(entries, self.world, self.rank, zero_stage))
                entries, offset = [], 0
            entries.append((name, p, offset))
            offset = _round_up(offset + p.numel(), ALIGN)
        if entries:
            self.buckets.append(_Bucket(entries, self.world, self.rank, zero_stage))
        for b in self.buckets:
            # Decoupled weight decay applies to these ranges of the shard (merged when adjacent).
            b.decay = []
            for name, lo, hi, _ in b.owned:
                if name.endswith(("norm.weight", ".bias")) or weight_decay == 0:
                    continue
                if b.decay and b.decay[-1][1] == lo:
                    b.decay[-1] = (b.decay[-1][0], hi)
                else:
                    b.decay.append((lo, hi))
            for _, p, offset in b.entries:
                # Fires once per backward, after all uses of the parameter (a tied embedding/head
                # included) have been summed into param.grad.
                p.register_post_accumulate_grad_hook(
                    lambda param, b=b, offset=offset: self._on_grad(b, offset, param))
        self._pending = []  # stage 2: (work, bucket) reduce-scatters in flight, oldest first
        self._next = 0  # stage 2: the next bucket to launch in this backward
        self._in_backward = False

    # -----------------------------------------------------------------------------------------
    # Gradients: hooks during backward

    @torch.no_grad()
    def _on_grad(self, b: _Bucket, offset: int, param: torch.Tensor) -> None:
        grad = param.grad.flatten()
        param.grad = None  # from here on the gradient lives only in float32 buffers
        if self.world == 1 or self.stage == 1:
            target = b.full_grad if b.full_grad is not None else b.grad
            target[offset : offset + grad.numel()].add_(grad)
            return
        if not self._in_backward:
            self._in_backward = True
            torch.autograd.Variable._execution_engine.queue_callback(self._end_backward)
        if b.staging is None:
            b.staging = torch.zeros(b.numel, device=b.data.device)  # padding and missing gradients stay 0
        b.staging[offset : offset + grad.numel()].copy_(grad)
        b.ready += 1
        self._launch_buckets(only_complete=True)

    def _launch_buckets(self, only_complete: bool) -> None:
        """Launch buckets in order: every rank must issue the same reduce-scatters in the same order."""
        while self._next < len(self.buckets):
            b = self.buckets[self._next]
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
            self._next += 1

    def _wait(self, keep: int) -> None:
        """Wait for the oldest reduce-scatters until at most `keep` are in flight; free their staging."""
        while len(self._pending) > keep:
            work, b = self._pending.pop(0)
            work.wait()
            b.staging = None

    def _end_backward(self) -> None:
        self._launch_buckets(only_complete=False)
        self._wait(0)
        self._next, self._in_backward = 0, False

    # -----------------------------------------------------------------------------------------
    # The step

    @torch.no_grad()
    def zero_grad(self) -> None:
        """Start a step's accumulation: call once before its first micro-batch."""
        for b in self.buckets:
            b.grad.zero_()
            if b.full_grad is not None:
                b.full_grad.zero_()

    @torch.no_grad()
    def step(self, lr: float, max_grad_norm: float) -> float:
        """Reduce, clip to `max_grad_norm` (<= 0: no clipping), AdamW with `lr`, all-gather the weights.
        Returns the global gradient norm before clipping."""
        self._wait(0)
        if self.stage == 1 and self.world > 1:
            works = [_reduce_scatter(b.grad, b.full_grad, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
                     for b in self.buckets]
            for work in works:
                work.wait()
        # Global L2 norm: squares summed over this rank's shards (padding is zero), then over ranks.
        square = torch.stack([torch.linalg.vector_norm(b.grad) for b in self.buckets]).square().sum()
        if self.world > 1:
            dist.all_reduce(square, group=self.group)
        norm = square.sqrt()
        if max_grad_norm > 0:
            # As torch.nn.utils.clip_grad_norm_: a tensor coefficient, so no host synchronization here.
            coef = (max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
            for b in self.buckets:
                b.grad.mul_(coef)
        # AdamW, the same operations as torch.optim.AdamW's single-tensor path, on float32 shards.
        self.lr, self.step_count = lr, self.step_count + 1
        beta1, beta2 = self.betas
        step_size = lr / (1 - beta1**self.step_count)
        bias_correction2_sqrt = (1 - beta2**self.step_count) ** 0.5
        for b in self.buckets:
            for lo, hi in b.decay:
                b.master[lo:hi].mul_(1 - lr * self.weight_decay)
            b.exp_avg.lerp_(b.grad, 1 - beta1)
            b.exp_avg_sq.mul_(beta2).addcmul_(b.grad, b.grad, value=1 - beta2)
            denom = (b.exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(self.eps)
            b.master.addcdiv_(b.exp_avg, denom, value=-step_size)
        self._publish_weights()
        return norm.item()

    def _publish_weights(self) -> None:
        """Each rank casts its master shard into its slice of the buckets; the all-gather fills the rest."""
        for b in self.buckets:
            b.shard.copy_(b.master)
        if self.world > 1:
            works = [_all_gather(b.data, b.shard, group=self.group, async_op=True) for b in self.buckets]
            for work in works:
                work.wait()

    # -----------------------------------------------------------------------------------------
    # Checkpoints: each rank saves its own part; any number of ranks can load them

    KINDS = ("master", "exp_avg", "exp_avg_sq")

    def sharded_state(self) -> dict[str, torch.Tensor]:
        """This rank's part of the optimizer as plain named tensors (safetensors-ready): `step`, and for
        every parameter NAME this rank owns a part of, `master/NAME`, `exp_avg/NAME`, `exp_avg_sq/NAME`
        (float32, the owned slice of the flattened parameter) and `range/NAME` = [begin, end, numel]
        (int64: where the slice lies in the flattened parameter, and that parameter's size)."""
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
        pieces, steps = {}, set()  # name -> [(shard, begin, end)]
        for shard in shards:
            keys = set(shard.keys())
            for key in shard.keys():
                if key == "step":
                    steps.add(int(shard.get_tensor(key)))
                if not key.startswith("range/"):
                    continue
                name = key[len("range/"):]
                if name not in self.params:
                    raise ValueError(f"optimizer checkpoint has tensor '{name}', which the model does not have")
                begin, end, numel = shard.get_tensor(key).tolist()
                if numel != self.params[name].numel():
                    raise ValueError(f"optimizer checkpoint: tensor '{name}' has {numel} elements, the model's "
                                     f"has {self.params[name].numel()} (a checkpoint of another model?)")
                for kind in self.KINDS:
                    if f"{kind}/{name}" not in keys:
                        raise ValueError(f"optimizer checkpoint: '{kind}/{name}' is missing")
                pieces.setdefault(name, []).append((shard, begin, end))
        if len(steps) != 1:
            raise ValueError(f"optimizer checkpoint: expected one step count over its shards, found {sorted(steps)}")
        for name in self.params:
            if name not in pieces:
                raise ValueError(f"optimizer checkpoint has no state for tensor '{name}'")
        for b in self.buckets:
            for name, lo, hi, begin in b.owned:
                end, covered = begin + hi - lo, 0
                for shard, s, e in pieces[name]:
                    a, z = max(begin, s), min(end, e)  # overlap, in the flattened parameter
                    if a >= z:
                        continue
                    for kind in self.KINDS:
                        saved = shard.get_tensor(f"{kind}/{name}")
                        getattr(b, kind)[lo + a - begin : lo + z - begin].copy_(saved[a - s : z - s])
                    covered += z - a
                if covered != end - begin:
                    raise ValueError(f"optimizer checkpoint covers {covered} of the {end - begin} elements "
                                     f"[{begin}, {end}) of tensor '{name}' this rank needs (incomplete shards?)")
        self.step_count = steps.pop()
        self.zero_grad()
        self._publish_weights()
