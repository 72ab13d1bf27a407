"""The Llama-3.1 decoder, as plain PyTorch.

    tokens -> embed_tokens -> L x [ x + attn(rms_norm(x)) ; x + mlp(rms_norm(x)) ] -> norm -> lm_head -> loss

Parameter names follow Hugging Face's `LlamaForCausalLM` without its `model.` prefix, so export is a
rename. The ops that decide speed and memory on a GPU (RMSNorm, alone or feeding projections, rotary,
SwiGLU with the down projection, the cross-entropy over a 128k vocabulary) are the pure-torch functions
`*_torch` below; `kernels.py` holds Triton versions of them that the tests compare against these twins.
The model knows nothing of distribution or optimizers: `train.py` and `zero.py` apply those.
"""
import importlib.util
import math
import os
import sys
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

try:
    import kernels  # needs Triton; without it the model runs on the pure-torch twins below
    if not hasattr(kernels, "IGNORE_INDEX"):  # Hugging Face's `kernels` was imported before this folder on sys.path
        spec = importlib.util.spec_from_file_location("llama_kernels", os.path.dirname(__file__) + "/kernels.py")
        kernels = sys.modules["llama_kernels"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(kernels)
except ImportError:
    kernels = None

# ---------------------------------------------------------------------------------------------
# Configuration: the YAML's `model.base_model` section (Fast-LLM's keys and defaults)


@dataclass
class NormalizationConfig:
    type: str = "rms_norm"  # Fast-LLM's key; Llama's RMSNorm is the only value (Fast-LLM's default: layer_norm)
    epsilon: float = 1e-5  # added to the mean square before the reciprocal square root


@dataclass
class RotaryConfig:
    scaling_type: str = "none"  # `none`, or `llama3` for Llama 3.1's long-context frequency scaling
    scale_factor: float = 8.0  # low frequencies are divided by this
    low_frequency_factor: float = 1.0  # wavelengths above original_context_length / this are scaled
    high_frequency_factor: float = 4.0  # wavelengths below original_context_length / this are kept
    original_context_length: int = 8192  # tokens the unscaled model was trained on


@dataclass
class TransformerConfig:
    num_layers: int = 12  # decoder blocks
    hidden_size: int = 1024  # model width
    num_attention_heads: int = 8  # query heads
    head_groups: int = 1  # key/value heads (grouped-query attention)
    kv_channels: int | None = None  # head dimension; default hidden_size / num_attention_heads
    ffn_hidden_size: int | None = None  # MLP width; default 4 x hidden_size
    activation_type: str | None = None  # silu, gelu, relu, squared_relu; default silu
    add_linear_biases: bool = True  # biases on the attention and MLP projections (Llama: false)
    normalization: NormalizationConfig = field(default_factory=NormalizationConfig)
    rotary_embedding_scale: float = -math.log(10000)  # -ln(theta): theta = exp(-this)
    # Fast-LLM keys that a Llama allows one value of. They default to it (Fast-LLM's own defaults
    # describe a GPT-2-like model, which this project doesn't build); any other value is an error.
    gated: bool = True  # SwiGLU-style gated MLP
    use_rotary_embeddings: bool = True  # rotary position embeddings
    rotary: RotaryConfig = field(default_factory=RotaryConfig)
    init_method_std: float | None = None  # std of the weight init; default hidden_size ** -0.5

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def ffn_size(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size

    @property
    def activation(self) -> str:
        return self.activation_type or "silu"

    @property
    def std(self) -> float:
        return self.init_method_std if self.init_method_std is not None else self.hidden_size**-0.5

    def activation_bytes(self, itemsize: int) -> int:
        """Bytes per token that a block keeps for its backward, run with the kernels and not recomputed (measured
        by tests/test_memory.py): in the training dtype its input and the residual stream after attention, q, k, v
        after rotary, the attention output, gate and up; in float32 each norm's rstd and attention's log-sum-exp
        per head. A recomputed block keeps its input alone."""
        q, kv = self.num_attention_heads * self.head_dim, self.head_groups * self.head_dim
        return itemsize * 2 * (self.hidden_size + q + kv + self.ffn_size) + 4 * (2 + self.num_attention_heads)


@dataclass
class BaseModelConfig:
    cross_entropy_impl: str = "auto"  # torch (full logits), fused (Triton, chunked), auto (fused on GPU)
    tie_word_embeddings: bool = True  # share the input embedding and the output head (Llama 3.1: false)
    vocab_size: int = 49152  # tokens in the vocabulary
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    use_position_embeddings: bool | None = None  # Fast-LLM's key; Llama has no learned positions: only false
    recompute_layers: int | None = None  # (ours) blocks recomputed in backward; None: as few as fit (train.py)

    def errors(self) -> list[str]:
        """What is wrong with these values, or what Llama (this model, a Hugging Face Llama) can't be."""
        t, r, m, k = self.transformer, self.transformer.rotary, "model.base_model", "model.base_model.transformer"
        checks = [
            (self.cross_entropy_impl not in ("auto", "torch", "fused"),
             f"{m}.cross_entropy_impl `{self.cross_entropy_impl}` must be auto, torch or fused"),
            (self.vocab_size < 1, f"{m}.vocab_size must be at least 1"),
            (self.use_position_embeddings is True,
             f"{m}.use_position_embeddings: Llama has no learned positions; set false"),
            (self.recompute_layers is not None and not 0 <= self.recompute_layers <= t.num_layers,
             f"{m}.recompute_layers must lie in 0..{t.num_layers} (transformer.num_layers), or null: as few as fit"),
            (t.num_layers < 1 or t.hidden_size < 1, f"{k}.num_layers and hidden_size must be at least 1"),
            (t.num_attention_heads < 1 or t.head_groups < 1 or t.num_attention_heads % t.head_groups,
             f"{k}.num_attention_heads ({t.num_attention_heads}) must be a positive multiple of head_groups "
             f"({t.head_groups})"),
            (t.kv_channels is None and t.hidden_size % max(t.num_attention_heads, 1),
             f"{k}.kv_channels is required when hidden_size is not a multiple of num_attention_heads"),
            (t.head_dim % 2 or t.head_dim < 2,
             f"{k} head dimension {t.head_dim} (kv_channels) must be even for rotary"),
            (t.ffn_size < 1, f"{k}.ffn_hidden_size must be at least 1"),
            (not t.gated, f"{k}.gated: Llama's MLP is gated (SwiGLU); set true"),
            (t.activation not in ACTIVATIONS,
             f"{k}.activation_type `{t.activation}` must be silu, gelu, relu or squared_relu"),
            (t.normalization.type != "rms_norm",
             f"{k}.normalization.type `{t.normalization.type}`: Llama uses rms_norm; set it"),
            (t.normalization.epsilon <= 0, f"{k}.normalization.epsilon must be positive"),
            (not t.use_rotary_embeddings, f"{k}.use_rotary_embeddings: Llama uses rotary embeddings; set true"),
            (r.scaling_type not in ("none", "llama3"),
             f"{k}.rotary.scaling_type `{r.scaling_type}` must be none or llama3"),
            (r.scaling_type == "llama3" and not (0 < r.low_frequency_factor < r.high_frequency_factor
                                                 and r.scale_factor > 0 and r.original_context_length > 0),
             f"{k}.rotary: llama3 scaling needs 0 < low_frequency_factor < high_frequency_factor, and positive "
             "scale_factor and original_context_length"),
            (t.init_method_std is not None and t.init_method_std <= 0, f"{k}.init_method_std must be positive"),
        ]
        return [message for failed, message in checks if failed]


# ---------------------------------------------------------------------------------------------
# The ops that decide speed: pure-torch twins of the Triton kernels, and the dispatch between them


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = x / sqrt(mean(x^2) + eps) * weight, the statistics in float32, one rounding at the end."""
    x32 = x.to(torch.promote_types(x.dtype, torch.float32))
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.to(x32.dtype)).to(x.dtype)


def rotary_torch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + D/2) of x (batch, tokens, heads, D) by the angles whose
    cos/sin (tokens, D/2, float32) are given: the half-split convention of Hugging Face's rotate_half."""
    x1, x2 = x.to(torch.promote_types(x.dtype, torch.float32)).chunk(2, dim=-1)
    cos, sin = cos[:, None, :].to(x1.dtype), sin[:, None, :].to(x1.dtype)  # broadcast over heads
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def linear(x, weight, bias, float8: bool) -> torch.Tensor:
    """F.linear, or with float8 kernels.Float8Linear: its matmuls in float8 (on the CPU, casts emulated by torch)."""
    return (kernels.Float8Linear.apply if float8 else F.linear)(x, weight, bias)


def norm_linear_torch(x, norm_weight, eps: float, weights, biases, float8=False) -> list[torch.Tensor]:
    """[linear(rms_norm(x), weights[i], biases[i])]: one norm feeding several projections (q, k, v; gate, up)."""
    y = rms_norm_torch(x, norm_weight, eps)
    return [linear(y, w, b, float8) for w, b in zip(weights, biases)]


def swiglu_linear_torch(gate, up, weight, bias=None, act=F.silu, float8=False) -> torch.Tensor:
    """linear(act(gate) * up): the MLP after its gate and up projections, the product in float32, rounded once."""
    g = gate.to(torch.promote_types(gate.dtype, torch.float32))
    return linear((act(g) * up.to(g.dtype)).to(gate.dtype), weight, bias, float8)


def cross_entropy_torch(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits = hidden @ weight.T (tokens x vocab, in float32) against labels;
    labels of -100 are ignored. Holds the full logits: the fused kernel avoids exactly that."""
    logits = (hidden @ weight.t()).to(torch.promote_types(hidden.dtype, torch.float32))
    return F.cross_entropy(logits, labels, ignore_index=-100)


# Dispatch: each op runs its Triton kernel on CUDA tensors and its twin elsewhere. LLAMA_KERNELS=0 (read once)
# forces the twins everywhere, to tell a kernel bug from a model bug.
FORCE_TWINS = os.environ.get("LLAMA_KERNELS") == "0"


def _kernels_on(x: torch.Tensor) -> bool:
    return x.is_cuda and kernels is not None and not FORCE_TWINS


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return (kernels.rms_norm if _kernels_on(x) else rms_norm_torch)(x, weight, eps)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return (kernels.rotary if _kernels_on(x) else rotary_torch)(x, cos, sin)


def norm_linear(x: torch.Tensor, norm: "RMSNorm", linears: list[nn.Linear], float8: bool) -> list[torch.Tensor]:
    fn = kernels.norm_linear if _kernels_on(x) else norm_linear_torch
    return fn(x, norm.weight, norm.eps, [m.weight for m in linears], [m.bias for m in linears], float8)


def swiglu_linear(gate: torch.Tensor, up: torch.Tensor, down: nn.Linear, activation: str, float8: bool):
    if activation == "silu" and _kernels_on(gate):  # the kernel is SiLU's; other activations run the twin
        return kernels.swiglu_linear(gate, up, down.weight, down.bias, float8)
    return swiglu_linear_torch(gate, up, down.weight, down.bias, ACTIVATIONS[activation], float8)


def cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, impl: str) -> torch.Tensor:
    """impl: `torch` the twin (full float32 logits), `fused` the chunked kernel, `auto` fused on a GPU."""
    fused = impl == "fused" and not FORCE_TWINS
    if fused and (problem := fused_cross_entropy_problem(hidden.device)):
        raise RuntimeError(problem)
    if fused or impl == "auto" and _kernels_on(hidden):
        return kernels.cross_entropy(hidden, weight, labels)
    return cross_entropy_torch(hidden, weight, labels)


def attention(q, k, v, documents: torch.Tensor | None) -> torch.Tensor:
    """Causal attention of q (batch, heads, T, D) over k, v (batch, kv_heads, T, D); with `documents` (batch, T),
    each token's document in its sample, a token attends only to earlier tokens of its own document."""
    if documents is not None and _kernels_on(q):
        return kernels.document_attention(q, k, v, documents)
    mask = None if documents is None else (documents[:, None, :, None] == documents[:, None, None, :]).tril()
    gqa = k.shape[1] != q.shape[1]  # each key/value head serves heads / kv_heads query heads, without copies
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)


def fused_cross_entropy_problem(device: torch.device) -> str | None:
    """Why `cross_entropy_impl: fused` can't run on `device`, or None. Compiled Triton needs a CUDA GPU;
    on the CPU the kernel runs only under Triton's interpreter (TRITON_INTERPRET=1, as the tests set)."""
    if kernels is None or device.type != "cuda" and not kernels.INTERPRETED:
        why = "Triton is not installed" if kernels is None else f"it needs a CUDA GPU and this run is on {device.type}"
        return (f"model.base_model.cross_entropy_impl is `fused`, a Triton kernel, but {why}: use auto (the kernel on "
                "a GPU, plain PyTorch elsewhere) or torch")
    return None


def rotary_frequencies(config: TransformerConfig) -> torch.Tensor:
    """Angular frequency of each channel pair (head_dim / 2, float64), with Llama 3.1's scaling."""
    dim, theta = config.head_dim, math.exp(-config.rotary_embedding_scale)
    freqs = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    r = config.rotary
    if r.scaling_type == "llama3":
        # Long wavelengths are slowed down by scale_factor, short ones kept, a smooth blend between.
        wavelength = 2 * math.pi / freqs
        smooth = ((r.original_context_length / wavelength - r.low_frequency_factor)
                  / (r.high_frequency_factor - r.low_frequency_factor))
        blended = (1 - smooth) * freqs / r.scale_factor + smooth * freqs
        low = wavelength > r.original_context_length / r.low_frequency_factor
        high = wavelength < r.original_context_length / r.high_frequency_factor
        freqs = torch.where(high, freqs, torch.where(low, freqs / r.scale_factor, blended))
    return freqs


# ---------------------------------------------------------------------------------------------
# Modules


ACTIVATIONS = {"silu": F.silu, "gelu": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu,
               "squared_relu": lambda x: F.relu(x).square()}


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.empty(size, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, config: TransformerConfig, dtype: torch.dtype, float8: bool):
        super().__init__()
        h, d, bias, self.float8 = config.hidden_size, config.head_dim, config.add_linear_biases, float8
        self.heads, self.kv_heads, self.head_dim = config.num_attention_heads, config.head_groups, d
        self.q_proj = nn.Linear(h, self.heads * d, bias=bias, dtype=dtype)
        self.k_proj = nn.Linear(h, self.kv_heads * d, bias=bias, dtype=dtype)
        self.v_proj = nn.Linear(h, self.kv_heads * d, bias=bias, dtype=dtype)
        self.o_proj = nn.Linear(self.heads * d, h, bias=bias, dtype=dtype)

    def forward(self, x: torch.Tensor, norm: RMSNorm, cos: torch.Tensor, sin: torch.Tensor, documents) -> torch.Tensor:
        """attention(norm(x)), the norm fused into the q, k, v projections."""
        b, t, _ = x.shape
        q, k, v = norm_linear(x, norm, [self.q_proj, self.k_proj, self.v_proj], self.float8)
        q = rotary(q.view(b, t, self.heads, self.head_dim), cos, sin)
        k = rotary(k.view(b, t, self.kv_heads, self.head_dim), cos, sin)
        v = v.view(b, t, self.kv_heads, self.head_dim)
        y = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), documents)  # (batch, heads, T, D)
        return linear(y.transpose(1, 2).reshape(b, t, -1), self.o_proj.weight, self.o_proj.bias, self.float8)


class MLP(nn.Module):
    def __init__(self, config: TransformerConfig, dtype: torch.dtype, float8: bool):
        super().__init__()
        h, f, bias = config.hidden_size, config.ffn_size, config.add_linear_biases
        self.activation, self.float8 = config.activation, float8
        self.gate_proj = nn.Linear(h, f, bias=bias, dtype=dtype)
        self.up_proj = nn.Linear(h, f, bias=bias, dtype=dtype)
        self.down_proj = nn.Linear(f, h, bias=bias, dtype=dtype)

    def forward(self, x: torch.Tensor, norm: RMSNorm) -> torch.Tensor:
        """down(act(gate(norm(x))) * up(norm(x))), the norm fused into gate and up."""
        gate, up = norm_linear(x, norm, [self.gate_proj, self.up_proj], self.float8)
        return swiglu_linear(gate, up, self.down_proj, self.activation, self.float8)


class Block(nn.Module):
    def __init__(self, config: TransformerConfig, dtype: torch.dtype, float8: bool):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.normalization.epsilon, dtype)
        self.self_attn = Attention(config, dtype, float8)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.normalization.epsilon, dtype)
        self.mlp = MLP(config, dtype, float8)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, documents=None) -> torch.Tensor:
        x = x + self.self_attn(x, self.input_layernorm, cos, sin, documents)
        return x + self.mlp(x, self.post_attention_layernorm)


class Llama(nn.Module):
    """Build on the meta device (`with torch.device("meta"): Llama(...)`), then `init_weights(device)`."""

    def __init__(self, config: BaseModelConfig, max_sequence_length: int, dtype=torch.float32, float8: bool = False):
        super().__init__()
        self.config, self.max_sequence_length, t = config, max_sequence_length, config.transformer
        self.recompute_layers = 0  # the first this many blocks recompute in backward: set by train.py alone
        self.embed_tokens = nn.Embedding(config.vocab_size, t.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList(Block(t, dtype, float8) for _ in range(t.num_layers))
        self.norm = RMSNorm(t.hidden_size, t.normalization.epsilon, dtype)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(t.hidden_size, config.vocab_size, bias=False, dtype=dtype)
        for name in ("cos", "sin"):  # rotary tables: derived from the config, not in the state dict; see init_rotary
            self.register_buffer(name, torch.empty(max_sequence_length, t.head_dim // 2), persistent=False)

    @property
    def head_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight

    @torch.no_grad()
    def init_weights(self, device: torch.device | str | None = None) -> "Llama":
        """Materialize on `device` (if the model is on meta) and initialize every tensor: norms to 1, biases to
        0, the attention output and the MLP down projection from N(0, std / sqrt(2 L)) (each block adds two such
        terms to the residual stream), every other weight, embedding and head included, from N(0, std). Draws are
        float32, then cast."""
        if device is not None:
            self.to_empty(device=device)
        t = self.config.transformer
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                residual = name.endswith(("o_proj.weight", "down_proj.weight"))
                std = t.std / math.sqrt(2 * t.num_layers) if residual else t.std
                p.copy_(torch.empty(p.shape, device=p.device).normal_(0.0, std))
        self.init_rotary()
        return self

    @torch.no_grad()
    def init_rotary(self) -> None:
        """Fill the float32 cos/sin tables (positions x head_dim/2); call after moving off meta."""
        positions = torch.arange(self.max_sequence_length, dtype=torch.float64)
        angles = torch.outer(positions, rotary_frequencies(self.config.transformer))
        self.cos, self.sin = angles.cos().float().to(self.cos.device), angles.sin().float().to(self.sin.device)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None, documents=None) -> torch.Tensor:
        """tokens (batch, T) -> float32 logits (batch, T, vocab), or with labels the mean loss. `documents`
        (batch, T), each token's document in its sample: attention stays within documents (None: across them)."""
        t = tokens.shape[1]
        cos, sin = self.cos[:t], self.sin[:t]
        x = self.embed_tokens(tokens)
        for i, layer in enumerate(self.layers):
            if i < self.recompute_layers and torch.is_grad_enabled():
                # Keep only the block's input; its activations are recomputed in backward.
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, documents, use_reentrant=False)
            else:
                x = layer(x, cos, sin, documents)
        x = self.norm(x)
        if labels is None:
            return (x @ self.head_weight.t()).float()
        return cross_entropy(x.flatten(0, 1), self.head_weight, labels.flatten(), self.config.cross_entropy_impl)


def count_parameters(model: nn.Module) -> int:  # unique ones: a tied head counts once
    return sum(p.numel() for p in model.parameters())


def flops_per_token(model: Llama, sequence_length: int) -> int:
    """Training FLOPs per token, as torchtitan and Megatron count them (docs/performance.md): 6 N for the
    forward and backward matmuls, N the parameters without the input embedding (a tied one counts once,
    as the head), plus 12 L H Q T for attention's scores and weighted values (no causal discount)."""
    t = model.config.transformer
    n = count_parameters(model) - (0 if model.config.tie_word_embeddings else model.embed_tokens.weight.numel())
    return 6 * n + 12 * t.num_layers * t.num_attention_heads * t.head_dim * sequence_length
