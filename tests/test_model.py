"""The model against transformers' LlamaForCausalLM (the golden reference), float32, 1e-5."""
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from helpers import build_llama, llama_config
from model import BaseModelConfig, Llama, RotaryConfig, TransformerConfig, count_parameters, flops_per_token
from model import rotary_frequencies


def build(layers=2, hidden=64, heads=4, kv=2, head_dim=16, ffn=96, vocab=101, tied=False, scaling="llama3", context=32,
          seq=64):
    config = llama_config(layers, hidden, heads, kv, head_dim, ffn, vocab, tied, scaling=scaling, context=context)
    model = build_llama(config, seq)
    rope = {"rope_type": "default", "rope_theta": 500000.0}
    if scaling == "llama3":
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": context}
    reference = LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv, head_dim=head_dim, rms_norm_eps=1e-5, rope_parameters=rope, max_position_embeddings=seq,
        tie_word_embeddings=tied, attention_bias=False, mlp_bias=False,
    )).eval()
    hf_names = {(k if k.startswith("lm_head") else "model." + k): v for k, v in model.state_dict().items()}
    if tied:
        hf_names["lm_head.weight"] = model.embed_tokens.weight
    reference.load_state_dict(hf_names, strict=True)
    return model, reference


@pytest.mark.parametrize("shape", [
    dict(),  # GQA: 4 query heads over 2 key/value heads, llama3 scaling active (context 32 < 64 tokens)
    dict(heads=4, kv=4, tied=True),  # plain multi-head attention, tied head
    dict(heads=6, kv=1, hidden=48, head_dim=8, layers=3, scaling="none"),  # multi-query, no scaling
    dict(heads=8, kv=2, hidden=64, head_dim=32, ffn=40, vocab=37),  # head_dim * heads != hidden
])
def test_logits_and_loss_match_transformers(shape):
    torch.manual_seed(0)
    model, reference = build(**shape)
    tokens = torch.randint(0, model.config.vocab_size, (3, 64))
    labels = torch.randint(0, model.config.vocab_size, (3, 64))
    ours, theirs = model(tokens), reference(tokens).logits
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    loss = model(tokens, labels)
    expected = torch.nn.functional.cross_entropy(theirs.flatten(0, 1), labels.flatten())
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)


def test_attention_within_documents_is_each_document_alone_and_transformers_packed():
    """With `documents`, a packed sample's logits are those of each of its documents run alone, and transformers'
    given the block-diagonal causal mask and positions that restart per document (ours don't restart: rotary's
    scores depend on distances alone). A one-document sample is the plain causal model."""
    torch.manual_seed(3)
    model, reference = build()
    lengths = [[20, 1, 30, 13], [64]]
    tokens = torch.randint(0, 101, (2, 64))
    documents = torch.tensor([[i for i, n in enumerate(row) for _ in range(n)] for row in lengths])
    positions = torch.tensor([[j for n in row for j in range(n)] for row in lengths])
    ours = model(tokens, documents=documents)
    starts = [0, 20, 21, 51]
    alone = torch.cat([model(tokens[:1, a:a + n]) for a, n in zip(starts, lengths[0])], 1)
    torch.testing.assert_close(ours[:1], alone, atol=1e-5, rtol=1e-5)
    assert torch.equal(ours[1:], model(tokens[1:]))
    mask = (documents[:, None, :, None] == documents[:, None, None, :]).tril()
    theirs = reference(tokens, attention_mask=mask, position_ids=positions).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert (ours[:1] - model(tokens[:1])).abs().max() > 0.1  # across documents, it would differ


def test_gradients_match_transformers():
    torch.manual_seed(1)
    model, reference = build()
    tokens = torch.randint(0, 101, (2, 48))
    model(tokens[:, :-1], tokens[:, 1:]).backward()
    logits = reference(tokens[:, :-1]).logits
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
    theirs = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        other = theirs[name if name.startswith("lm_head") else "model." + name]
        torch.testing.assert_close(p.grad, other.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_llama3_frequencies_follow_the_formula():
    t = TransformerConfig(hidden_size=4096, num_attention_heads=32, kv_channels=128, rotary_embedding_scale=-math.log(500000.0),
                          rotary=RotaryConfig("llama3"))
    freqs = rotary_frequencies(t)
    base = 500000.0 ** (-torch.arange(0, 128, 2, dtype=torch.float64) / 128)
    wavelength = 2 * math.pi / base
    for f, b, w in zip(freqs.tolist(), base.tolist(), wavelength.tolist()):
        if w < 8192 / 4:
            assert f == pytest.approx(b, rel=1e-12)
        elif w > 8192 / 1:
            assert f == pytest.approx(b / 8, rel=1e-12)
        else:
            smooth = (8192 / w - 1) / (4 - 1)
            assert f == pytest.approx((1 - smooth) * b / 8 + smooth * b, rel=1e-12)
    assert (freqs < 0.9 * base).any() and torch.isclose(freqs, base, rtol=1e-12).any()  # both regimes occur


def test_init_follows_the_config():
    torch.manual_seed(0)
    model, _ = build(layers=4, hidden=256, heads=4, kv=2, head_dim=64, ffn=512, vocab=1000)
    std = 256**-0.5
    assert model.layers[0].input_layernorm.weight.eq(1).all()
    assert model.embed_tokens.weight.std().item() == pytest.approx(std, rel=0.02)
    assert model.layers[0].self_attn.q_proj.weight.std().item() == pytest.approx(std, rel=0.03)
    assert model.layers[0].mlp.down_proj.weight.std().item() == pytest.approx(std / math.sqrt(8), rel=0.03)
    assert model.layers[0].self_attn.o_proj.weight.std().item() == pytest.approx(std / math.sqrt(8), rel=0.03)


def test_llama_8b_parameter_count_and_flops_on_meta():
    config = llama_config(layers=32, hidden=4096, heads=32, kv=8, head_dim=128, ffn=14336, vocab=128256)
    with torch.device("meta"):
        model = Llama(config, 4096, torch.bfloat16)
    assert count_parameters(model) == 8_030_261_248
    assert count_parameters(model) - model.embed_tokens.weight.numel() == 7_504_924_672
    # 6 N + 12 L H Q T with N = 7,504,924,672 at T = 4096: 51.47 GFLOP a token, 100% MFU = 19,214 tokens/s on 989e12.
    assert flops_per_token(model, 4096) == 6 * 7_504_924_672 + 12 * 32 * 32 * 128 * 4096
    assert round(989e12 / flops_per_token(model, 4096)) == 19_214


def test_default_config_is_a_valid_llama():
    config = BaseModelConfig()
    assert config.errors() == []
    with torch.device("meta"):
        Llama(config, 128)  # builds
