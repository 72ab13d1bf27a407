"""What the test modules share: the one builder of small Llamas, and Llama-3.1-8B's config.json."""
import math

import torch

from model import BaseModelConfig, Llama, NormalizationConfig, RotaryConfig, TransformerConfig


def llama_config(layers=2, hidden=64, heads=4, kv=2, head_dim=None, ffn=None, vocab=128, tied=False, biases=False,
                 activation="silu", impl="torch", theta=500000.0, scaling="llama3", context=32) -> BaseModelConfig:
    """A Llama 3.1 in miniature. With the default `context` of 32 tokens, shorter than the sequences the
    tests use, the llama3 rotary scaling changes the logits. head_dim and ffn: None for the defaults."""
    return BaseModelConfig(cross_entropy_impl=impl, tie_word_embeddings=tied, vocab_size=vocab,
                           transformer=TransformerConfig(
                               num_layers=layers, hidden_size=hidden, num_attention_heads=heads, head_groups=kv,
                               kv_channels=head_dim, ffn_hidden_size=ffn, activation_type=activation,
                               add_linear_biases=biases, normalization=NormalizationConfig("rms_norm", 1e-5),
                               rotary_embedding_scale=-math.log(theta),
                               rotary=RotaryConfig(scaling, original_context_length=context)))


def build_llama(config: BaseModelConfig, sequence_length: int, dtype=torch.float32, device="cpu", seed=None,
                float8=False) -> Llama:
    """Built on meta and initialized as train.py does it, from `seed` when one is given."""
    if seed is not None:
        torch.manual_seed(seed)
    with torch.device("meta"):
        model = Llama(config, sequence_length, dtype, float8)
    return model.init_weights(device)


LLAMA_31_8B = {  # its Hugging Face config.json, as published (docs/formats.md section 3)
    "architectures": ["LlamaForCausalLM"], "model_type": "llama",
    "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
    "hidden_act": "silu", "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    "max_position_embeddings": 131072, "tie_word_embeddings": False,
    "attention_bias": False, "mlp_bias": False, "bos_token_id": 128000, "eos_token_id": 128001,
    "torch_dtype": "bfloat16"}
