"""Triton kernels for the ops that decide speed and memory on a GPU.

Each op is a Triton kernel, the launcher that calls it and a `torch.autograd.Function`; its pure-torch twin lives
in `model.py` (each op names its own) and `tests/test_kernels.py` checks the two against each other, forward
and gradients. `model.py` decides where the kernels run (CUDA tensors; the twins elsewhere).

Without a GPU the kernels run under Triton's interpreter if TRITON_INTERPRET=1 is set before this module is imported
(the tests do so). Conventions in every kernel:
  - operands are loaded, converted to float32, computed on, and rounded once on store (this also sidesteps the
    interpreter, which gets bf16 arithmetic wrong);
  - a row's offset is row * row_length in int64: rows x row length can pass 2^31.
"""
import importlib.metadata
import importlib.util
import os
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention.flex_attention import create_block_mask, flex_attention
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # the kernels were defined for the CPU interpreter
IGNORE_INDEX = -100  # labels equal to this add nothing to the loss (F.cross_entropy's default)

def _num_warps(block: int) -> int:
    """Warps for a program that handles `block` elements at once: 16 to 32 elements per thread."""
    return 4 if block <= 2048 else 8 if block <= 8192 else 16


# ---------------------------------------------------------------------------------------------
# RMSNorm: y = x * rstd * w with rstd = 1 / sqrt(mean(x^2) + eps), over the last dimension H


@triton.jit
def _rms_norm_forward_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, H, eps, BLOCK: tl.constexpr):
    """One program per row. rstd (float32) is stored for the backward."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    x = tl.load(x_ptr + row * H + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / H + eps)  # float32
    tl.store(rstd_ptr + row, rstd)
    tl.store(y_ptr + row * H + cols, (x * rstd * w).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_backward_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_ptr, N, H, ROWS, BLOCK: tl.constexpr):
    """Program p takes rows p * ROWS ... (p + 1) * ROWS - 1. With xh = x * rstd, g = dy * w (float32):
        dx = rstd * (g - xh * mean(g * xh))            (d/dx of x * rstd, rstd depending on x)
        dw[p, :] = sum over its rows of dy * xh        (float32 partial sums; the launcher adds
                                                        them up: no atomics, deterministic)"""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    w = tl.load(w_ptr + cols, mask=cols < H, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(0, ROWS):
        row = pid.to(tl.int64) * ROWS + i
        mask = (cols < H) & (row < N)
        x = tl.load(x_ptr + row * H + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + row * H + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row, mask=row < N, other=0.0)
        xh = x * rstd
        g = dy * w
        dx = rstd * (g - xh * (tl.sum(g * xh, axis=0) / H))
        tl.store(dx_ptr + row * H + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw += dy * xh
    tl.store(dw_ptr + pid.to(tl.int64) * H + cols, dw, mask=cols < H)


def _rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x (rows, H) contiguous -> (y, rstd): y in x's dtype, rstd float32 per row."""
    (N, H), y = x.shape, torch.empty_like(x)
    rstd = torch.empty(N, dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(H)
    _rms_norm_forward_kernel[(N,)](x, weight, y, rstd, H, eps, BLOCK=block, num_warps=_num_warps(block))
    return y, rstd


def _rms_norm_backward(dy, x, weight, rstd) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dweight) from dy and what the forward kept: x (rows, H), its rstd."""
    dy = dy.reshape(x.shape).contiguous()
    (N, H), dx = x.shape, torch.empty_like(x)
    # 2 programs per multiprocessor measured best; under the interpreter few programs, so the tests run the row loops
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 3
    rows = triton.cdiv(N, 2 * sms)  # per program
    programs = triton.cdiv(N, rows)
    dw = torch.empty(programs, H, dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(H)
    _rms_norm_backward_kernel[(programs,)](dy, x, weight, rstd, dx, dw, N, H, rows, BLOCK=block,
                                           num_warps=_num_warps(block))
    return dx, dw.sum(0).to(weight.dtype)


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        y, rstd = _rms_norm_forward(x2, weight, eps)
        ctx.save_for_backward(x2, weight, rstd)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = _rms_norm_backward(dy, x, weight, rstd)
        return dx.view(dy.shape), dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension of x (any leading shape); the twin is `model.rms_norm_torch`."""
    return RMSNormFunction.apply(x, weight, eps)


class NormLinearFunction(torch.autograd.Function):
    """outputs[i] = rms_norm(x) @ weights[i].T (+ biases[i]): one RMSNorm feeding several projections
    (q, k, v; or gate, up). Keeps x and rstd, not the normalized x: the backward recomputes it for the weight
    gradients (the same kernel on the same x, so bit for bit the forward's) instead of holding H values a token."""

    @staticmethod
    def forward(ctx, x, norm_weight, eps, float8, *linears):  # linears: weight_0, bias_0 (or None), weight_1, ...
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        xn, rstd = _rms_norm_forward(x2, norm_weight, eps)
        weights, biases = linears[0::2], linears[1::2]
        ctx.save_for_backward(x2, norm_weight, rstd, *weights)
        ctx.eps, ctx.shape, ctx.has_bias, ctx.float8 = eps, x.shape, [b is not None for b in biases], float8
        return tuple(y.view(*x.shape[:-1], -1) for y in _project(xn, weights, biases, float8))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *douts):
        x, norm_weight, rstd, *weights = ctx.saved_tensors
        dxn, grads = _project_backward([d.reshape(x.shape[0], -1) for d in douts], weights, ctx.has_bias, ctx.float8,
                                       lambda _: _rms_norm_forward(x, norm_weight, ctx.eps)[0])  # xn, recomputed
        dx, dw = _rms_norm_backward(dxn, x, norm_weight, rstd)
        return dx.view(ctx.shape), dw, None, None, *grads


def norm_linear(x, norm_weight, eps: float, weights, biases, float8: bool = False) -> tuple[torch.Tensor, ...]:
    """rms_norm(x) fed to each projection (weights[i], biases[i] or None), x (..., H), the matmuls in float8 if
    `float8`; the twin is `model.norm_linear_torch`."""
    return NormLinearFunction.apply(x, norm_weight, eps, float8, *[t for pair in zip(weights, biases) for t in pair])


# ---------------------------------------------------------------------------------------------
# Rotary: rotate the channel pairs (x[i], x[i + D/2]) of each head by the token's angles


@triton.jit
def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, y_ptr, T, HEADS, D, stride_b, stride_t, stride_h,
                   BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BACKWARD: tl.constexpr):
    """One program per (batch, token), all heads at once; x (batch, T, HEADS, D) with any strides but the last (1),
    y contiguous, cos/sin (T, D/2) float32. For the pair (x1, x2) at angle a:
        forward:   y1 = x1 cos a - x2 sin a,   y2 = x2 cos a + x1 sin a
        backward:  the transposed rotation, i.e. by -a: the same with sin a -> -sin a."""
    row = tl.program_id(0).to(tl.int64)  # b * T + t
    b, t = row // T, row % T
    half = D // 2
    heads = tl.arange(0, BLOCK_H)[:, None]
    i = tl.arange(0, BLOCK_HALF)[None, :]
    cos = tl.load(cos_ptr + t * half + i, mask=i < half, other=0.0)
    sin = tl.load(sin_ptr + t * half + i, mask=i < half, other=0.0)
    if BACKWARD:
        sin = -sin
    mask = (heads < HEADS) & (i < half)
    x_offs = b * stride_b + t * stride_t + heads * stride_h + i
    x1 = tl.load(x_ptr + x_offs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + x_offs + half, mask=mask, other=0.0).to(tl.float32)
    y_offs = row * HEADS * D + heads * D + i
    tl.store(y_ptr + y_offs, (x1 * cos - x2 * sin).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(y_ptr + y_offs + half, (x2 * cos + x1 * sin).to(y_ptr.dtype.element_ty), mask=mask)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    x = x if x.stride(-1) == 1 else x.contiguous()  # the kernel takes any strides but the last
    B, T, H, D = x.shape
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    block_h, block_half = triton.next_power_of_2(H), triton.next_power_of_2(D // 2)
    _rotary_kernel[(B * T,)](x, cos.contiguous(), sin.contiguous(), y, T, H, D, *x.stride()[:3], BLOCK_H=block_h,
                             BLOCK_HALF=block_half, BACKWARD=backward, num_warps=_num_warps(block_h * block_half))
    return y


class RotaryFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return _rotate(dy, cos, sin, backward=True), None, None


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (batch, tokens, heads, head_dim) rotated by cos/sin (tokens, head_dim/2, float32), the half-split convention
    of Hugging Face's rotate_half; the twin is `model.rotary_torch`."""
    return RotaryFunction.apply(x, cos, sin)


# ---------------------------------------------------------------------------------------------
# SwiGLU: the MLP's down projection of p = silu(g) * u = g * sigmoid(g) * u, g and u its gate and up

SWIGLU_BLOCK = 2048  # values per program


@triton.jit
def _swiglu_kernel(g_ptr, u_ptr, p_ptr, n, BLOCK: tl.constexpr, BACKWARD: tl.constexpr):
    """Elementwise over n values in float32 with s = sigmoid(g), each result rounded once; the backward reads dp from
    p's buffer and works in place:
        p's buffer <- p  = g s u                   (backward: recomputed for the down projection's weight gradient)
        g's buffer <- dg = dp u s (1 + g (1 - s))  (backward only; d silu(g) / dg = s + g s (1 - s))
        u's buffer <- du = dp g s                  (backward only)"""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    if BACKWARD:  # p's buffer holds dp: read before p goes over it
        dp = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(g_ptr + offs, (dp * u * s * (1 + g * (1 - s))).to(g_ptr.dtype.element_ty), mask=mask)
        tl.store(u_ptr + offs, (dp * g * s).to(u_ptr.dtype.element_ty), mask=mask)
    tl.store(p_ptr + offs, (g * s * u).to(p_ptr.dtype.element_ty), mask=mask)


def _swiglu(gate, up, p, backward: bool) -> torch.Tensor:
    """Runs the kernel over gate, up and p, contiguous and of one size (p holds dp in the backward); returns p."""
    grid = (triton.cdiv(p.numel(), SWIGLU_BLOCK),)
    _swiglu_kernel[grid](gate, up, p, p.numel(), SWIGLU_BLOCK, BACKWARD=backward, num_warps=_num_warps(SWIGLU_BLOCK))
    return p


class SwiGLULinearFunction(torch.autograd.Function):
    """down(silu(gate) * up), keeping gate and up but not their product: the backward recomputes it in the kernel that
    makes the gate and up gradients. Those are written over gate and up (nothing else holds them), so the backward
    allocates one product-sized buffer; a second backward through the graph is therefore not supported."""

    @staticmethod
    def forward(ctx, gate, up, weight, bias, float8):
        gate, up = gate.contiguous(), up.contiguous()
        p = _swiglu(gate, up, torch.empty_like(gate), backward=False)
        ctx.save_for_backward(gate, up, weight)
        ctx.has_bias, ctx.float8 = bias is not None, float8
        return _project(p.view(-1, p.shape[-1]), [weight], [bias], float8)[0].view(*p.shape[:-1], -1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        gate, up, weight = ctx.saved_tensors
        # p, the weight gradient's input, is recomputed over dp by the kernel that writes dgate, dup over gate, up
        _, (dweight, dbias) = _project_backward([dout.reshape(-1, weight.shape[0])], [weight], [ctx.has_bias],
                                                ctx.float8, lambda dp: _swiglu(gate, up, dp, backward=True))
        return gate, up, dweight, dbias, None


def swiglu_linear(gate, up, weight, bias=None, float8: bool = False) -> torch.Tensor:
    """F.linear(silu(gate) * up, weight, bias) for gate, up (..., F), the matmuls in float8 if `float8`; the twin is
    `model.swiglu_linear_torch`."""
    return SwiGLULinearFunction.apply(gate, up, weight, bias, float8)


# ---------------------------------------------------------------------------------------------
# The three matmuls of a block's projection y = x W^T + b (forward; dx = dy W; dW = dy^T x), in the training dtype
# or in float8 (model.distributed.float8_matmuls). In float8 each is a @ b^T on operands cast with one float32 scale
# per tensor from its current amax (dynamic scaling): a8 = round(a s_a), s_a = the format's max / max |a|, and
#     a @ b^T = (a8 @ b8^T) / (s_a s_b)         products exact, summed in float32 (torch._scaled_mm), rounded once
# x and W in e4m3 (3 mantissa bits, max 448), dy in GRAD_FLOAT8 (e5m2: BENCHMARKS.md). One cast writes the layouts
# the matmuls read (x for y, x^T for dW). Nothing float8 lives from forward to backward, which casts again what the
# bf16 path keeps: a block keeps the same activations. The embedding, the head and the loss stay in bf16.

E4M3, GRAD_FLOAT8 = torch.float8_e4m3fn, torch.float8_e5m2


@triton.jit
def _float8_kernel(x_ptr, amax_ptr, y_ptr, yt_ptr, inv_ptr, R, C, FMAX: tl.constexpr, PLAIN: tl.constexpr,
                   TRANSPOSED: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    """One program per BR x BC tile of x (R, C), in float32: a = max(amax, 1e-12), s = FMAX / a (IEEE division, as
    the twin's), y = x * s held within +-FMAX and rounded to the nearest float8 (ties to even); stored as y (R, C)
    and/or yt = y^T (C, R), both contiguous; program (0, 0) stores 1 / s = a / FMAX for the matmul."""
    r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)[:, None]
    c = tl.program_id(1).to(tl.int64) * BC + tl.arange(0, BC)[None, :]
    mask = (r < R) & (c < C)
    a = tl.maximum(tl.load(amax_ptr).to(tl.float32), 1e-12)
    x = tl.load(x_ptr + r * C + c, mask=mask, other=0.0).to(tl.float32)
    y = tl.clamp(x * tl.math.div_rn(FMAX, a), -FMAX, FMAX).to(y_ptr.dtype.element_ty)
    if PLAIN:
        tl.store(y_ptr + r * C + c, y, mask=mask)
    if TRANSPOSED:
        tl.store(yt_ptr + c * R + r, y, mask=mask)
    if (tl.program_id(0) == 0) & (tl.program_id(1) == 0):
        tl.store(inv_ptr, tl.math.div_rn(a, FMAX))


def _float8_torch(x: torch.Tensor, dtype: torch.dtype, layouts: str = "N"):
    """The twin of the cast, in torch ops: the same float32 arithmetic (tests check it bit for bit)."""
    a = torch.linalg.vector_norm(x, float("inf")).float().clamp(min=1e-12)
    fmax = torch.full_like(a, torch.finfo(dtype).max)  # a tensor: / by a number may multiply by its reciprocal
    y = (x.float() * (fmax / a)).clamp(-fmax, fmax).to(dtype)
    return [(y if layout == "N" else y.t().contiguous(), a / fmax) for layout in layouts]


def _float8(x: torch.Tensor, dtype: torch.dtype, layouts: str = "N") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """x (R, C) cast to float8 `dtype` with one scale: a (data, 1 / scale) pair per letter of `layouts`, N: x (R, C),
    T: x^T (C, R), both contiguous. The Triton kernel on a GPU or under the interpreter, else its twin."""
    if not (x.is_cuda or INTERPRETED):
        return _float8_torch(x, dtype, layouts)
    if x.dtype == torch.float32 and len(layouts) > 1:  # Triton 3.6 writes wrong bytes into x^T when it casts a float32
        return [pair for layout in layouts for pair in _float8(x, dtype, layout)]  # x to both at once (BENCHMARKS.md)
    x, (R, C) = x.contiguous(), x.shape
    amax = torch.linalg.vector_norm(x, float("inf"))  # max |x| in one pass, exact in x's dtype (one of its values)
    y = torch.empty((R, C) if "N" in layouts else 0, dtype=dtype, device=x.device)
    yt = torch.empty((C, R) if "T" in layouts else 0, dtype=dtype, device=x.device)
    inv = torch.empty((), dtype=torch.float32, device=x.device)
    br, bc, fmax = 64, 128, torch.finfo(dtype).max  # br x bc elements of x per program
    _float8_kernel[(triton.cdiv(R, br), triton.cdiv(C, bc))](x, amax, y, yt, inv, R, C, fmax, "N" in layouts,
                                                             "T" in layouts, br, bc, num_warps=_num_warps(br * bc))
    return [(y if layout == "N" else yt, inv) for layout in layouts]


def _mm8(a, b, out_dtype: torch.dtype, fast_accum: bool = False) -> torch.Tensor:
    """a @ b^T from two (data, 1 / scale) pairs, data (M, K) and (N, K) contiguous. fast_accum lets the tensor
    cores keep the running sums at less than float32 precision: faster, used in the forward only (as torchao)."""
    (a8, a_inv), (b8, b_inv) = a, b
    if a8.is_cuda:
        return torch._scaled_mm(a8, b8.t(), a_inv, b_inv, out_dtype=out_dtype, use_fast_accum=fast_accum)
    return ((a8.float() @ b8.float().t()) * (a_inv * b_inv)).to(out_dtype)  # the CPU: the same sums, in float32


def _project(x: torch.Tensor, weights, biases, float8: bool) -> list[torch.Tensor]:
    """[x @ w^T + b] for x (M, K) and each w (N, K), b (N,) or None: one input, several projections (cast once)."""
    if not float8:
        return [F.linear(x, w, b) for w, b in zip(weights, biases)]
    [x8] = _float8(x, E4M3)
    ys = [_mm8(x8, _float8(w, E4M3)[0], x.dtype, fast_accum=True) for w in weights]
    return [y if b is None else y.add_(b) for y, b in zip(ys, biases)]


def _project_backward(douts, weights, has_bias, float8: bool, input_from) -> tuple[torch.Tensor, list]:
    """The backward of _project from its outputs' gradients douts[i] (M, N_i): (dx, [dweight_0, dbias_0 or None, ...])
    with dx = sum_i douts[i] @ weights[i], dweight_i = douts[i]^T @ x, dbias_i = douts[i] summed over M. The functions
    keep less than x (M, K): `input_from(dx)` makes it once dx is done, and may write it over dx."""
    if float8:
        douts8 = [_float8(d, GRAD_FLOAT8, "NT") for d in douts]
        dx = _mm8(douts8[0][0], _float8(weights[0], E4M3, "T")[0], weights[0].dtype)
        for (d8, _), w in zip(douts8[1:], weights[1:]):
            dx.add_(_mm8(d8, _float8(w, E4M3, "T")[0], w.dtype))  # each term rounded once, to bf16: below float8 error
        x = input_from(dx)
        [xt8] = _float8(x, E4M3, "T")
        dweights = [_mm8(dt8, xt8, x.dtype) for _, dt8 in douts8]
    else:
        dx = douts[0] @ weights[0]
        for d, w in zip(douts[1:], weights[1:]):
            dx.addmm_(d, w)  # the sum over the projections accumulates in the matmul (float32 inside)
        x = input_from(dx)
        dweights = [d.t() @ x for d in douts]
    return dx, [g for d, dw, bias in zip(douts, dweights, has_bias) for g in (dw, d.sum(0) if bias else None)]


class Float8Linear(torch.autograd.Function):
    """F.linear(x, weight, bias), its three matmuls in float8 (`Float8Linear.apply(x, weight, bias)`): the attention's
    output projection, which no kernel fuses, and on the CPU every projection of the twins (model.py's `linear`)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        x2 = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(x2, weight)
        ctx.has_bias, ctx.shape = bias is not None, x.shape
        return _project(x2, [weight], [bias], True)[0].view(*x.shape[:-1], -1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dx, grads = _project_backward([dy.reshape(x.shape[0], -1)], [weight], [ctx.has_bias], True, lambda _: x)
        return dx.view(ctx.shape), *grads


# ---------------------------------------------------------------------------------------------
# Fused linear cross-entropy: loss = mean over labelled tokens n of lse(z_n) - z_n[label_n], z = hidden @ weight.T,
# without ever holding all N x V logits
#
# The tokens go in chunks of C; each chunk takes three matrix products (cuBLAS, in the input dtype) and one kernel:
#     z = h_c @ W.T                        (C x V, input dtype: the only large buffer, reused)
#     kernel: per row, lse (float32), the row's loss (float32), and in place of z
#             dz = (softmax(z) - onehot(label)) / n_labelled       (0 for ignored rows)
#     grad_h[c] = dz @ W                   (written straight into the output)
#     grad_W   += dz.T @ h_c               (accumulated in the weight's dtype)
# The gradients are thus finished in the forward pass; the backward only scales them by the incoming gradient.
# Accumulating grad_W in bf16 rounds it once per chunk instead of once: measured against float64 on an H100
# (BENCHMARKS.md), 8 chunks give a relative error of 4.2e-3 where eager's single rounding gives 2.4e-3, still within
# bf16's own 2^-8. A float32 accumulator would hold 4 bytes x V x H: 2.1 GB at 128,256 x 4096, twice the 1 GB budget.

LOGITS_CHUNK_BYTES = 512 * 2**20  # the C x V logits buffer: 2048 tokens at V = 128,256 in bf16


@triton.jit
def _cross_entropy_kernel(z_ptr, labels_ptr, loss_ptr, scale_ptr, V, BLOCK: tl.constexpr):
    """One program per row z (V logits). In float32:
        lse  = log sum_j exp(z_j), by an online pass over blocks: m = running max,
               s = sum exp(z_j - m), rescaled by exp(m_old - m) when the max grows
        loss = lse - z[label]     (0 if label == IGNORE_INDEX)
        dz_j = (exp(z_j - lse) - [j == label]) * scale, scale = 1 / n_labelled (0 if ignored),
               written over z in its dtype."""
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * V
    label = tl.load(labels_ptr + row)
    m = -float("inf")
    s = 0.0
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        z = tl.load(z_row + cols, mask=cols < V, other=-float("inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    ignored = label == -100  # IGNORE_INDEX
    z_label = tl.load(z_row + label, mask=label != -100, other=0.0).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(ignored, 0.0, lse - z_label))
    scale = tl.where(ignored, 0.0, tl.load(scale_ptr))
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        z = tl.load(z_row + cols, mask=cols < V, other=0.0).to(tl.float32)
        dz = (tl.exp(z - lse) - tl.where(cols == label, 1.0, 0.0)) * scale
        tl.store(z_row + cols, dz.to(z_ptr.dtype.element_ty), mask=cols < V)


def _cross_entropy_rows(z, labels, losses, scale, block=4096, num_warps=None):
    """Per row of z (rows, V): its loss into `losses`, and z overwritten by its gradient."""
    block = min(block, triton.next_power_of_2(z.shape[1]))
    num_warps = num_warps or _num_warps(block)
    _cross_entropy_kernel[(z.shape[0],)](z, labels, losses, scale, z.shape[1], BLOCK=block, num_warps=num_warps)


def _fused_cross_entropy(hidden, weight, labels, need_grad_h: bool, need_grad_w: bool, chunk_tokens: int | None):
    """(loss, grad_hidden or None, grad_weight or None); the loss is float32, nan if no label counts."""
    (N, _), V = hidden.shape, weight.shape[0]
    C = min(N, chunk_tokens or max(1, LOGITS_CHUNK_BYTES // (V * hidden.element_size())))
    scale = 1.0 / (labels != IGNORE_INDEX).sum().float()  # 1 / n_labelled, a device tensor: no host synchronization
    losses = torch.empty(N, dtype=torch.float32, device=hidden.device)
    z_buffer = torch.empty(C, V, dtype=hidden.dtype, device=hidden.device)
    grad_h = torch.empty_like(hidden) if need_grad_h else None
    grad_w = torch.empty_like(weight) if need_grad_w else None
    for start in range(0, N, C):
        end = min(start + C, N)
        h, z = hidden[start:end], z_buffer[: end - start]
        torch.matmul(h, weight.t(), out=z)
        _cross_entropy_rows(z, labels[start:end], losses[start:end], scale)
        if need_grad_h:
            torch.matmul(z, weight, out=grad_h[start:end])
        if need_grad_w and start == 0:
            torch.matmul(z.t(), h, out=grad_w)  # the first chunk writes, saving a pass of zeros
        elif need_grad_w:
            grad_w.addmm_(z.t(), h)
    return losses.sum() * scale, grad_h, grad_w


class FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_tokens):
        need_h, need_w = ctx.needs_input_grad[:2]
        loss, ctx.grad_h, ctx.grad_w = _fused_cross_entropy(hidden, weight, labels, need_h, need_w, chunk_tokens)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        # The gradients were finished in forward for a loss gradient of 1; the real one (train.py divides the loss by
        # accumulation steps x ranks) scales them in place, as a device tensor: no host synchronization. The
        # gradients are handed over, so a second backward through this graph is not supported.
        # _foreach_mul_, not mul_: mul_ by a 0-dim tensor took twice as long on an H200 (BENCHMARKS.md).
        grad_h, grad_w, ctx.grad_h, ctx.grad_w = ctx.grad_h, ctx.grad_w, None, None
        grads = [grad for grad in (grad_h, grad_w) if grad is not None]
        if grads:
            torch._foreach_mul_(grads, grad_loss.to(grads[0].dtype))
        return grad_h, grad_w, None, None


def cross_entropy(hidden, weight, labels, chunk_tokens: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of hidden (N, H) @ weight (V, H).T against labels (N,), IGNORE_INDEX skipped; float32; nan
    when every label is ignored, as F.cross_entropy. Peak extra memory: one chunk of logits (LOGITS_CHUNK_BYTES, or
    chunk_tokens x V) besides the two gradients. The twin is `model.cross_entropy_torch`."""
    if not torch.is_grad_enabled() or not (hidden.requires_grad or weight.requires_grad):
        return _fused_cross_entropy(hidden, weight, labels, False, False, chunk_tokens)[0]  # the loss alone
    return FusedLinearCrossEntropy.apply(hidden, weight, labels, chunk_tokens)


# ---------------------------------------------------------------------------------------------
# Attention within documents: flex attention (Triton code that torch.compile generates) with a block mask, which
# skips the blocks of the T x T scores that cross documents. On an H100 at 4 x 4096 tokens with the 8B's heads it
# took 3.3 ms forward and backward, against 4.2 ms for causal SDPA over whole samples and 12.7 ms for SDPA with a
# boolean mask (BENCHMARKS.md). The twin is model.attention's SDPA with that mask.

_flex_attention = torch.compile(flex_attention)  # eager flex attention is only a slow reference
_block_mask = (None, None)  # (documents, its block mask): the layers of one forward share it


def document_attention(q, k, v, documents: torch.Tensor) -> torch.Tensor:
    """Causal attention of q (batch, heads, T, D) over k, v (batch, kv_heads, T, D) within the documents given by
    `documents` (batch, T): each token's document in its sample."""
    global _block_mask
    if _block_mask[0] is not documents:
        (b, t), same = documents.shape, lambda b, h, i, j: (documents[b, i] == documents[b, j]) & (j <= i)
        _block_mask = (documents, create_block_mask(same, b, None, t, t, device=documents.device))
    return _flex_attention(q, k, v, block_mask=_block_mask[1], enable_gqa=k.shape[1] != q.shape[1])


# ---------------------------------------------------------------------------------------------
# This module's name is also Hugging Face's hub-kernels package, which transformers 5.x requires and imports when
# it loads a model; with this folder first on sys.path, `import kernels` finds this file. So this module serves
# that package too (README: kernels.py and Hugging Face's kernels): its submodules load from its folder
# (`__path__`), and the names we lack come from its __init__.py, run once on first use (PEP 562's module
# __getattr__). Training never loads it.

try:
    _HUB_INIT = Path(importlib.metadata.distribution("kernels").locate_file("kernels/__init__.py"))
except importlib.metadata.PackageNotFoundError:
    _HUB_INIT = None
if __name__ == "kernels" and _HUB_INIT is not None and _HUB_INIT.is_file():
    __path__ = [str(_HUB_INIT.parent)]
_hub = None  # that package's module, once one of its names was asked for


def __getattr__(name: str):
    global _hub
    if "__path__" not in globals() or (name.startswith("_") and name != "__version__"):
        raise AttributeError(f"module {__name__!r} ({__file__}) has no attribute {name!r}")
    if _hub is None:  # set before it runs: the package may ask for its own names while it loads
        spec = importlib.util.spec_from_file_location(__name__, _HUB_INIT, submodule_search_locations=__path__)
        _hub = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(_hub)  # its `from kernels._internals... import` find the submodules by __path__
    return getattr(_hub, name)
