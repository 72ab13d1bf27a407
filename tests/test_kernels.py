"""The Triton kernels against their pure-torch twins in model.py, forward and every gradient.

The reference is the twin run on float64 copies of the inputs (the twins compute in float64 then).
Errors are norm-relative: |out - ref| / |ref|. On the CPU the kernels run under Triton's
interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so the shapes are tiny and odd; the tests
marked `gpu` run the same checks in bf16 at sizes the model uses.
"""
import math

import pytest
import torch

import kernels
import model
from helpers import build_llama, llama_config

# Norm-relative error allowed for each dtype: a few units of its rounding (2^-24, 2^-11, 2^-8).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
CPU_DTYPES = [torch.float32, torch.float16]
GPU = "cuda" if torch.cuda.is_available() else "cpu"


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def leaf(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype).detach().requires_grad_()


def check(outs, refs, dtype):
    for name, out, ref in zip(("output", "grad 1", "grad 2"), outs, refs):
        assert torch.isfinite(out).all(), name
        err = rel_error(out, ref)
        assert err < TOLERANCE[dtype], f"{name}: relative error {err:.2e} > {TOLERANCE[dtype]:.0e} ({dtype})"


# ---------------------------------------------------------------------------------------------
# RMSNorm


def run_rms_norm(shape, dtype, device):
    x = torch.randn(shape, device=device)
    w = 1 + 0.2 * torch.randn(shape[-1], device=device)
    dy = torch.randn(shape, device=device)
    outs, refs = [], []
    for fn, dt, into in ((kernels.rms_norm, dtype, outs), (model.rms_norm_torch, torch.float64, refs)):
        xl, wl = leaf(x, dt), leaf(w, dt)
        y = fn(xl, wl, 1e-5)
        y.backward(dy.to(dt))
        into += [y, xl.grad, wl.grad]
    check(outs, refs, dtype)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("shape", [(5, 123), (2, 3, 64), (1, 1000), (37, 100)])
def test_rms_norm(shape, dtype):
    run_rms_norm(shape, dtype, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(4, 2048, 4096), (3000, 1000), (7, 8192)])
def test_rms_norm_gpu(shape, dtype):
    run_rms_norm(shape, dtype, "cuda")


# ---------------------------------------------------------------------------------------------
# Rotary


def run_rotary(batch, tokens, heads, head_dim, dtype, device, transposed=False):
    # transposed: x is a (batch, heads, tokens, D) tensor seen as (batch, tokens, heads, D)
    x = torch.randn(batch, tokens, heads, head_dim, device=device)
    angles = torch.rand(tokens, head_dim // 2, device=device, dtype=torch.float64) * 100
    cos, sin = angles.cos(), angles.sin()
    dy = torch.randn_like(x)
    outs, refs = [], []
    for fn, dt, into in ((kernels.rotary, dtype, outs), (model.rotary_torch, torch.float64, refs)):
        table_dtype = torch.float64 if dt == torch.float64 else torch.float32
        xl = leaf(x.transpose(1, 2).contiguous() if transposed else x, dt)
        y = fn(xl.transpose(1, 2) if transposed else xl, cos.to(table_dtype), sin.to(table_dtype))
        y.backward(dy.to(dt))
        into += [y, xl.grad.transpose(1, 2) if transposed else xl.grad]
    check(outs, refs, dtype)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("heads,head_dim", [(3, 16), (1, 16), (2, 32), (5, 6)])
def test_rotary(heads, head_dim, dtype):
    run_rotary(2, 7, heads, head_dim, dtype, "cpu")


def test_rotary_strided_input():
    run_rotary(2, 7, 3, 16, torch.float32, "cpu", transposed=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("heads,head_dim", [(32, 128), (8, 128), (12, 64)])
def test_rotary_gpu(heads, head_dim, dtype):
    run_rotary(2, 1024, heads, head_dim, dtype, "cuda")


# ---------------------------------------------------------------------------------------------
# Attention within documents (flex attention on a GPU; the twin is SDPA with the boolean mask)


@pytest.mark.gpu
@pytest.mark.parametrize("heads,kv_heads", [(32, 8), (4, 4)])
def test_document_attention_gpu(heads, kv_heads, monkeypatch):
    torch.manual_seed(0)
    lengths = [[700, 1, 300, 23], [1024], [1, 1, 1022]]  # one-token documents, a whole-sample one
    documents = torch.tensor([[i for i, n in enumerate(row) for _ in range(n)] for row in lengths], device="cuda")
    q, k, v = (torch.randn(3, h, 1024, 128, device="cuda") for h in (heads, kv_heads, kv_heads))
    dy = torch.randn(3, heads, 1024, 128, device="cuda")
    results = []
    for dtype, twin in ((torch.bfloat16, False), (torch.float64, True)):
        monkeypatch.setattr(model, "FORCE_TWINS", twin)
        leaves = [leaf(t, dtype) for t in (q, k, v)]
        y = model.attention(*leaves, documents)
        y.backward(dy.to(dtype))
        results.append([y] + [t.grad for t in leaves])
    for name, out, ref in zip(("output", "dq", "dk", "dv"), *results):
        assert rel_error(out, ref) < TOLERANCE[torch.bfloat16], name


# ---------------------------------------------------------------------------------------------
# RMSNorm feeding projections; SwiGLU with the down projection


def run_fused(kernel, twin, inputs, dtype, ref_dtype=torch.float64, tolerance=None):
    """kernel(*inputs) against twin(*inputs in ref_dtype): outputs, then the gradient of every floating input.
    The kernels may write over what they were given (SwiGLU's backward does), so each gets fresh copies."""
    outs, refs = [], []
    for fn, dt, into in ((kernel, dtype, outs), (twin, ref_dtype, refs)):
        leaves = [leaf(t, dt) if torch.is_tensor(t) else t for t in inputs]
        ys = fn(*[t * 1 if torch.is_tensor(t) else t for t in leaves])  # non-leaf copies go in
        ys = [ys] if torch.is_tensor(ys) else list(ys)
        torch.autograd.backward(ys, [torch.ones_like(y) * (i + 1) + torch.linspace(-1, 1, y.numel()).to(y).view_as(y)
                                     for i, y in enumerate(ys)])
        into += ys + [t.grad for t in leaves if torch.is_tensor(t)]
    assert len(outs) == len(refs)
    for i, (out, ref) in enumerate(zip(outs, refs)):
        assert torch.isfinite(out).all(), i
        err, tol = rel_error(out, ref), tolerance or TOLERANCE[dtype]
        assert err < tol, f"{i}: relative error {err:.2e} > {tol:.0e} ({dtype})"


def run_norm_linear(shape, outs, bias, dtype, device, float8=False, **check):
    H = shape[-1]
    weights = [torch.randn(n, H, device=device) / math.sqrt(H) for n in outs]
    biases = [torch.randn(n, device=device) if bias else None for n in outs]
    inputs = [torch.randn(shape, device=device), 1 + 0.2 * torch.randn(H, device=device), *weights, *biases]
    k = len(outs)

    def call(fn):
        return lambda x, w, *wb: fn(x, w, 1e-5, list(wb[:k]), list(wb[k:]), float8)
    run_fused(call(kernels.norm_linear), call(model.norm_linear_torch), inputs, dtype, **check)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("shape,outs,bias", [((2, 5, 48), (48, 16, 16), False), ((7, 33), (20, 20), True),
                                              ((1, 3, 100), (7,), False)])
def test_norm_linear(shape, outs, bias, dtype):
    run_norm_linear(shape, outs, bias, dtype, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape,outs,bias", [((2, 2048, 4096), (4096, 1024, 1024), False),
                                              ((3000, 1000), (600, 600), True)])
def test_norm_linear_gpu(shape, outs, bias, dtype):
    run_norm_linear(shape, outs, bias, dtype, "cuda")


def run_swiglu_linear(shape, out, bias, dtype, device, float8=False, **check):
    F_ = shape[-1]
    inputs = [3 * torch.randn(shape, device=device), torch.randn(shape, device=device),
              torch.randn(out, F_, device=device) / math.sqrt(F_), torch.randn(out, device=device) if bias else None]
    run_fused(lambda g, u, w, b: kernels.swiglu_linear(g, u, w, b, float8),
              lambda g, u, w, b: model.swiglu_linear_torch(g, u, w, b, float8=float8), inputs, dtype, **check)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("shape,out,bias", [((2, 5, 96), 48, False), ((3, 1000), 7, True), ((1, 1, 4099), 16, False)])
def test_swiglu_linear(shape, out, bias, dtype):
    run_swiglu_linear(shape, out, bias, dtype, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape,out,bias", [((2, 2048, 14336), 4096, False), ((3000, 1000), 600, True)])
def test_swiglu_linear_gpu(shape, out, bias, dtype):
    run_swiglu_linear(shape, out, bias, dtype, "cuda")


# ---------------------------------------------------------------------------------------------
# Float8 matmuls: the cast against its twin bit for bit, float8's error against exact arithmetic, the fused
# functions in float8 against the twins in float8 (the same casts: agreement to float32's rounding on the CPU)

FLOAT8_ERROR = {"output": 0.04, "gradients": 0.08}  # measured 0.026-0.028 and 0.059 (e5m2 gradients): 2^-4, 2^-3


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("shape", [(37, 50), (64, 128), (1, 300)])
def test_float8_cast_matches_its_twin(shape, dtype, x_dtype, device="cpu"):
    x = 3 * torch.randn(shape, device=device, dtype=x_dtype)
    x[0, 0] = 100  # the amax: it lands on the format's max exactly
    (y, inv), (yt, inv_t) = kernels._float8(x, dtype, "NT")
    (y_ref, inv_ref), (yt_ref, _) = kernels._float8_torch(x, dtype, "NT")
    bits = lambda t: t.view(torch.uint8)  # noqa: E731 (comparisons of float8 tensors as bytes: all builds have them)
    assert torch.equal(bits(y), bits(y_ref)) and torch.equal(bits(yt), bits(yt_ref))
    assert torch.equal(bits(yt.t()), bits(y))
    assert torch.equal(inv, inv_ref) and torch.equal(inv_t, inv) and y[0, 0].float() == torch.finfo(dtype).max
    assert not kernels._float8(torch.zeros_like(x), dtype)[0][0].float().any()  # no 0 / 0


@pytest.mark.gpu
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_float8_cast_matches_its_twin_gpu(dtype, x_dtype):
    test_float8_cast_matches_its_twin((4096, 14336), dtype, x_dtype, "cuda")
    test_float8_cast_matches_its_twin((1000, 4000), dtype, x_dtype, "cuda")


def run_float8_linear(M, K, N, dtype, device):
    """kernels.Float8Linear (on the CPU: the casts as torch ops) against exact arithmetic: what float8 costs."""
    x, w = torch.randn(M, K, device=device), torch.randn(N, K, device=device) / math.sqrt(K)
    b, dy = torch.randn(N, device=device), torch.randn(M, N, device=device)
    outs, refs = [], []
    for fn, dt, into in ((kernels.Float8Linear.apply, dtype, outs), (torch.nn.functional.linear, torch.float64, refs)):
        xl, wl, bl = leaf(x, dt), leaf(w, dt), leaf(b, dt)
        y = fn(xl, wl, bl)
        y.backward(dy.to(dt))
        into += [y, xl.grad, wl.grad, bl.grad]
    errors = [rel_error(out, ref) for out, ref in zip(outs, refs)]
    assert errors[0] < FLOAT8_ERROR["output"] and max(errors[1:3]) < FLOAT8_ERROR["gradients"], errors
    assert errors[3] < TOLERANCE[dtype], errors  # the bias's gradient sums the exact output gradient


@pytest.mark.parametrize("M,K,N", [(64, 96, 48), (257, 512, 384)])
def test_float8_linear_error(M, K, N):
    run_float8_linear(M, K, N, torch.float32, "cpu")


@pytest.mark.gpu
def test_float8_linear_error_gpu():
    run_float8_linear(4096, 4096, 1024, torch.bfloat16, "cuda")
    run_float8_linear(16384, 14336, 4096, torch.bfloat16, "cuda")


@pytest.mark.parametrize("bias", [False, True])
def test_norm_and_swiglu_linear_float8(bias):
    """The fused functions cast once what the twins cast per projection: the same values, float32's rounding apart."""
    run_norm_linear((2, 5, 48), (48, 16, 16), bias, torch.float32, "cpu", True, ref_dtype=torch.float32)
    run_swiglu_linear((2, 5, 96), 48, bias, torch.float32, "cpu", True, ref_dtype=torch.float32)


@pytest.mark.gpu
def test_norm_and_swiglu_linear_float8_gpu():
    """In bf16 against the float8 twins in bf16: the twins' norm and product round differently in bf16, which moves
    a few values to the neighbouring float8 value, so the bound is looser than bf16's own."""
    run_norm_linear((2, 2048, 4096), (4096, 1024, 1024), False, torch.bfloat16, "cuda", True,
                    ref_dtype=torch.bfloat16, tolerance=3e-2)
    run_swiglu_linear((2, 2048, 14336), 4096, False, torch.bfloat16, "cuda", True, ref_dtype=torch.bfloat16,
                      tolerance=3e-2)


# ---------------------------------------------------------------------------------------------
# Fused linear cross-entropy


def run_cross_entropy(n, hidden, vocab, dtype, device, chunk_tokens=None, ignore=0.25):
    h = torch.randn(n, hidden, device=device)
    w = torch.randn(vocab, hidden, device=device) * 2 / math.sqrt(hidden)  # logits of std ~2
    labels = torch.randint(0, vocab, (n,), device=device)
    labels[torch.rand(n, device=device) < ignore] = kernels.IGNORE_INDEX
    outs, refs = [], []
    fused = lambda hl, wl, y: kernels.cross_entropy(hl, wl, y, chunk_tokens)  # noqa: E731
    for fn, dt, into in ((fused, dtype, outs), (model.cross_entropy_torch, torch.float64, refs)):
        hl, wl = leaf(h, dt), leaf(w, dt)
        loss = fn(hl, wl, labels)
        assert loss.dtype == (torch.float64 if dt == torch.float64 else torch.float32)
        (3 * loss).backward()  # a gradient other than 1 checks the scaling in backward
        into += [loss, hl.grad, wl.grad]
    check(outs, refs, dtype)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("n,vocab,chunk", [(5, 123, None), (37, 257, 16), (19, 4219, 8)])
def test_cross_entropy(n, vocab, chunk, dtype):
    run_cross_entropy(n, 48, vocab, dtype, "cpu", chunk)


def test_cross_entropy_all_ignored():
    """No label counts: the loss is nan (0 / 0), as F.cross_entropy's, and the gradients are 0."""
    h, w = torch.randn(6, 16, requires_grad=True), torch.randn(50, 16, requires_grad=True)
    loss = kernels.cross_entropy(h, w, torch.full((6,), kernels.IGNORE_INDEX))
    loss.backward()
    assert loss.isnan() and model.cross_entropy_torch(h, w, torch.full((6,), -100)).isnan()
    assert (h.grad == 0).all() and (w.grad == 0).all()


def test_cross_entropy_without_grad():
    h, w, labels = torch.randn(9, 16), torch.randn(50, 16), torch.randint(0, 50, (9,))
    with torch.no_grad():
        loss = kernels.cross_entropy(h, w, labels)
    assert loss.grad_fn is None
    assert rel_error(loss, model.cross_entropy_torch(h.double(), w.double(), labels)) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n,hidden,vocab,chunk", [(4096, 1024, 32000, 512), (1000, 512, 50257, None)])
def test_cross_entropy_gpu(n, hidden, vocab, chunk, dtype):
    run_cross_entropy(n, hidden, vocab, dtype, "cuda", chunk)


def peak_extra_bytes(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


@pytest.mark.gpu
def test_cross_entropy_memory_gpu():
    """At 8192 tokens x 2048 x 65,536 in bf16 the eager loss holds several N x V float32 buffers
    (about 2 GB each); the fused one a 512 MB chunk of logits beside the two gradients."""
    n, hidden, vocab = 8192, 2048, 65536
    h = torch.randn(n, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(vocab, hidden, device="cuda") / math.sqrt(hidden)).bfloat16().requires_grad_()
    labels = torch.randint(0, vocab, (n,), device="cuda")
    grads = h.numel() * 2 + w.numel() * 2

    def step(fn):
        h.grad = w.grad = None
        fn(h, w, labels).backward()

    fused = peak_extra_bytes(lambda: step(kernels.cross_entropy)) - grads
    eager = peak_extra_bytes(lambda: step(model.cross_entropy_torch)) - grads
    assert fused <= kernels.LOGITS_CHUNK_BYTES + 2**20, fused
    assert fused * 8 < eager, (fused, eager)


# ---------------------------------------------------------------------------------------------
# The model with kernels on and off


def tiny_losses(device, dtype, impl, steps=3, float8=False):
    config = llama_config(vocab=257, impl=impl, theta=10000.0, scaling="none")
    net = build_llama(config, 16, dtype, device, seed=0, float8=float8)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        tokens = torch.randint(0, 257, (2, 17), generator=gen).to(device)
        loss = net(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_model_fused_cross_entropy_cpu():
    """Under the interpreter `fused` runs the kernel on the CPU: same losses as `torch`, in float32."""
    fused, eager = tiny_losses("cpu", torch.float32, "fused"), tiny_losses("cpu", torch.float32, "torch")
    assert fused == pytest.approx(eager, rel=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("float8", [False, True])
def test_model_kernels_on_off_gpu(monkeypatch, float8):
    on = tiny_losses("cuda", torch.bfloat16, "auto", float8=float8)
    monkeypatch.setattr(model, "FORCE_TWINS", True)
    off = tiny_losses("cuda", torch.bfloat16, "auto", float8=float8)
    assert on == pytest.approx(off, rel=2e-2)


def test_model_float8_trains_like_float32():
    """The float8 model on the CPU (the twins, casts emulated): three steps' losses within 1% of float32's."""
    assert tiny_losses("cpu", torch.float32, "torch", float8=True) == pytest.approx(
        tiny_losses("cpu", torch.float32, "torch"), rel=1e-2)
