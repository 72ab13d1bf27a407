"""Hugging Face Llama interop, checked against transformers on the CPU: export, import, round trip,
tokenizer + generate, the Llama-3.1-8B config, and bad input (docs/formats.md section 3, issue 4)."""
import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import export
from checkpoint import safetensors_chunks, write_file
from export import ExportError, base_model_dict_from_hf, export_llama, load_llama_weights, model_config_from_dict
from helpers import LLAMA_31_8B, build_llama, llama_config
from model import BaseModelConfig, Llama, NormalizationConfig, count_parameters

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parent.parent
SEQ = 48  # longer than original_context_length below, so the llama3 scaling decides the logits


def tiny_config(tied=False, head_dim=32, biases=False, activation="silu", vocab=128) -> BaseModelConfig:
    # head_dim 32 with theta 500000 and original context 32: one frequency kept, one blended, the rest scaled.
    return llama_config(head_dim=head_dim, ffn=96, vocab=vocab, tied=tied, biases=biases, activation=activation,
                        impl="auto")


@torch.no_grad()
def perturb(model: torch.nn.Module, seed: int) -> None:
    """Move every tensor off its init (norms off 1, biases off 0) so a swapped tensor would show."""
    torch.manual_seed(seed)
    for p in model.parameters():
        p.add_(torch.randn(p.shape).to(p.dtype) * 0.1)


def our_model(config: BaseModelConfig, dtype=torch.float32, seed=0) -> Llama:
    model = build_llama(config, SEQ, dtype, seed=seed)
    perturb(model, seed)
    return model


def imported(path) -> Llama:
    """What train.py does with `pretrained`: config.json -> config, build on meta, load the weights."""
    config = model_config_from_dict(base_model_dict_from_hf(path))
    dtype = next(iter(load_file(next(Path(path).glob("*.safetensors"))).values())).dtype
    with torch.device("meta"):
        model = Llama(config, SEQ, dtype)
    model.init_weights("cpu")
    load_llama_weights(model, path)
    return model


def hf_llama(path, tied=False, biases=False, dtype=torch.float32, max_shard_size="50GB"):
    """A Llama made and saved by transformers alone (its own config, init and writer)."""
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-5, tie_word_embeddings=tied, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32},
        max_position_embeddings=SEQ, attention_bias=biases, mlp_bias=biases)
    torch.manual_seed(1)
    model = transformers.LlamaForCausalLM(config).to(dtype)
    perturb(model, 1)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    return model.eval()


def logits(model, tokens):
    with torch.no_grad():
        out = model(tokens)
    return (out.logits if hasattr(out, "logits") else out).float()


def tokens(vocab=128):
    return torch.randint(0, vocab, (2, SEQ), generator=torch.Generator().manual_seed(2))


def files_in(path: Path) -> set[str]:
    return {p.name for p in path.iterdir()} if path.exists() else set()


# ---------------------------------------------------------------------------------------------
# Export -> transformers


@pytest.mark.parametrize("case", ["untied", "tied", "sharded", "biases_gelu_hd16", "squared_relu"])
def test_export_loads_in_transformers_with_same_logits(tmp_path, case):
    activation = {"biases_gelu_hd16": "gelu", "squared_relu": "squared_relu"}.get(case, "silu")
    config = tiny_config(tied=case == "tied", biases="biases" in case, activation=activation,
                         head_dim=16 if "hd16" in case else 32)
    model = our_model(config)
    shard = 20_000 if case == "sharded" else 5 * 2**30
    out = export_llama(model.state_dict(), config, tmp_path / "hf", max_position_embeddings=SEQ, max_shard_bytes=shard)

    hf, info = transformers.LlamaForCausalLM.from_pretrained(out, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}, info
    torch.testing.assert_close(logits(hf, tokens()), logits(model, tokens()), atol=1e-5, rtol=0)

    written = json.loads((out / "config.json").read_text())
    assert written["rope_scaling"]["original_max_position_embeddings"] == 32 and written["rope_theta"] == 500000.0
    assert written["tie_word_embeddings"] == (case == "tied") and written["torch_dtype"] == "float32"
    assert (hf.lm_head.weight is hf.model.embed_tokens.weight) == (case == "tied")
    # Reading the config.json back gives the model we started from.
    assert model_config_from_dict(base_model_dict_from_hf(out)) == dataclasses.replace(config, use_position_embeddings=False)
    if case == "sharded":
        index = json.loads((out / "model.safetensors.index.json").read_text())
        shards = sorted(p.name for p in out.glob("model-*.safetensors"))
        assert len(shards) > 2 and shards[-1] == f"model-{len(shards):05d}-of-{len(shards):05d}.safetensors"
        assert sorted(set(index["weight_map"].values())) == shards and not (out / "model.safetensors").exists()
        assert len(index["weight_map"]) == len(model.state_dict())
        assert index["metadata"]["total_size"] == sum(t.nbytes for t in model.state_dict().values())
    else:
        assert files_in(out) == {"config.json", "generation_config.json", "model.safetensors"}
    assert files_in(tmp_path) == {"hf"}  # no temporary folder left beside it


# ---------------------------------------------------------------------------------------------
# transformers -> import, round trip


@pytest.mark.parametrize("tied,shard", [(False, "50GB"), (True, "20KB")])
def test_model_saved_by_transformers_imports_with_same_logits(tmp_path, tied, shard):
    hf = hf_llama(tmp_path, tied=tied, max_shard_size=shard)
    assert (tmp_path / "model.safetensors.index.json").exists() == (shard == "20KB")
    model = imported(tmp_path)
    assert model.config.tie_word_embeddings == tied
    torch.testing.assert_close(logits(model, tokens()), logits(hf, tokens()), atol=1e-5, rtol=0)
    # Continuing pretraining starts at the loss transformers computes on the same batch.
    x = tokens()
    with torch.no_grad():
        hf_loss = hf(x[:, :-1], labels=x[:, :-1]).loss  # transformers shifts the labels itself
        ours = model(x[:, :-2], x[:, 1:-1])
    torch.testing.assert_close(ours, hf_loss, atol=1e-5, rtol=0)


def test_transformers_4_and_5_config_styles_read_the_same(tmp_path):
    hf_llama(tmp_path)
    v5 = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" in v5 and "rope_scaling" not in v5  # what transformers 5 writes
    from_v5 = base_model_dict_from_hf(tmp_path)
    v4 = {k: v for k, v in v5.items() if k != "rope_parameters"}
    v4["rope_theta"] = v5["rope_parameters"]["rope_theta"]
    v4["rope_scaling"] = {k: v for k, v in v5["rope_parameters"].items() if k != "rope_theta"}
    (tmp_path / "config.json").write_text(json.dumps(v4))
    assert base_model_dict_from_hf(tmp_path) == from_v5
    assert from_v5["transformer"]["rotary"] == {"scaling_type": "llama3", "scale_factor": 8.0, "low_frequency_factor": 1.0,
                                                 "high_frequency_factor": 4.0, "original_context_length": 32}
    assert from_v5["transformer"]["rotary_embedding_scale"] == -math.log(500000.0)
    # No scaling at all: the default rope with the old key and no rope_scaling.
    (tmp_path / "config.json").write_text(json.dumps(dict(v4, rope_scaling=None)))
    assert base_model_dict_from_hf(tmp_path)["transformer"]["rotary"] == {"scaling_type": "none"}


def test_export_after_import_is_bit_for_bit(tmp_path):
    hf_llama(tmp_path / "hf", biases=True, dtype=torch.bfloat16, max_shard_size="20KB")
    model = imported(tmp_path / "hf")
    assert model.embed_tokens.weight.dtype == torch.bfloat16 and model.config.transformer.add_linear_biases
    out = export_llama(model.state_dict(), model.config, tmp_path / "out", max_position_embeddings=SEQ)
    theirs = {k: v for f in (tmp_path / "hf").glob("*.safetensors") for k, v in load_file(f).items()}
    ours = load_file(out / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        assert ours[name].dtype == tensor.dtype and torch.equal(ours[name], tensor), name
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


# ---------------------------------------------------------------------------------------------
# Llama-3.1-8B: the published config.json gives the seed recipe's model


@pytest.mark.parametrize("style", ["transformers4", "transformers5"])
def test_llama_3_1_8b_config_gives_the_seed_recipe_model(tmp_path, style):
    hf = dict(LLAMA_31_8B)
    if style == "transformers5":
        hf["rope_parameters"] = dict(hf.pop("rope_scaling"), rope_theta=hf.pop("rope_theta"))
    (tmp_path / "config.json").write_text(json.dumps(hf))
    config = model_config_from_dict(base_model_dict_from_hf(tmp_path))
    with torch.device("meta"):
        assert count_parameters(Llama(config, 4096, torch.bfloat16)) == 8_030_261_248

    seed = yaml.safe_load((ROOT / "config" / "llama3_8b.yaml").read_text())["model"]["base_model"]
    from_yaml = model_config_from_dict(seed)
    ours, theirs = dataclasses.asdict(config), dataclasses.asdict(from_yaml)
    assert ours.pop("cross_entropy_impl") == "auto" and theirs.pop("cross_entropy_impl") == "fused"  # not in config.json
    assert ours == theirs
    # ...and exporting that model's config gives back the published values.
    written = export.hf_config(from_yaml, 131072, torch.bfloat16)
    assert {k: written[k] for k in LLAMA_31_8B if k not in ("bos_token_id", "eos_token_id")} == \
        {k: v for k, v in LLAMA_31_8B.items() if k not in ("bos_token_id", "eos_token_id")}


# ---------------------------------------------------------------------------------------------
# A demo-like model with its tokenizer: AutoTokenizer + AutoModelForCausalLM + generate

TEXT = ("the quick brown fox jumps over the lazy dog. the dog sleeps in the sun and the fox runs "
        "into the woods. a bird sings in the tree while the fox and the dog rest. ") * 4


def train_tokenizer(path: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[export.BOS, export.EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([TEXT], trainer)
    tokenizer.save(str(path))
    return path


def test_exported_demo_model_with_tokenizer_generates_text(tmp_path):
    tokenizer_file = train_tokenizer(tmp_path / "tokenizer.json")
    from tokenizers import Tokenizer
    ids = torch.tensor([Tokenizer.from_file(str(tokenizer_file)).encode(TEXT).ids])
    config = tiny_config(vocab=320)
    model = our_model(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(40):  # memorize the text a little, so greedy decoding continues it
        i = torch.randint(0, ids.shape[1] - SEQ - 1, (4,))
        batch = torch.stack([ids[0, j:j + SEQ + 1] for j in i])
        optimizer.zero_grad()
        model(batch[:, :-1], batch[:, 1:]).backward()
        optimizer.step()
    out = export_llama(model.state_dict(), config, tmp_path / "hf", max_position_embeddings=SEQ, tokenizer_path=tokenizer_file)

    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert (tokenizer.bos_token, tokenizer.eos_token, hf.generation_config.eos_token_id) == (export.BOS, export.EOS, 1)
    prompt = tokenizer("the quick brown fox", return_tensors="pt")
    generated = hf.generate(**prompt, max_new_tokens=12, do_sample=False, pad_token_id=1)
    text = tokenizer.decode(generated[0], skip_special_tokens=True)
    assert isinstance(text, str) and text.startswith("the quick brown fox") and len(text) > len("the quick brown fox") + 5
    # Our model decodes greedily to the same tokens.
    ours = prompt["input_ids"]
    for _ in range(generated.shape[1] - ours.shape[1]):
        ours = torch.cat([ours, logits(model, ours)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(ours, generated)


# ---------------------------------------------------------------------------------------------
# Bad input: clear errors, nothing written


def test_import_refuses_folders_that_are_not_llama(tmp_path):
    with pytest.raises(ExportError, match="no such folder"):
        base_model_dict_from_hf(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="no config.json"):
        base_model_dict_from_hf(tmp_path / "empty")
    (tmp_path / "config.json").write_text('{"model_type": "llama",\n "hidden_size": }')
    with pytest.raises(ExportError, match=r"config.json: not valid JSON.*line 2"):
        base_model_dict_from_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dict(LLAMA_31_8B, model_type="mistral", architectures=["MistralForCausalLM"])))
    with pytest.raises(ExportError, match="not a Llama model.*mistral"):
        base_model_dict_from_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dict(LLAMA_31_8B, rope_scaling={"rope_type": "yarn", "factor": 4.0})))
    with pytest.raises(ExportError, match="rope type 'yarn'"):
        base_model_dict_from_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_31_8B))
    model = our_model(tiny_config())
    with pytest.raises(ExportError, match="no weights"):
        load_llama_weights(model, tmp_path)


@pytest.mark.parametrize("change,message", [
    ({"num_layers": 3}, r"the weights have 2 layers, the config 3.*transformer.num_layers"),
    ({"hidden_size": 128}, r"model.embed_tokens.weight has shape \[128, 64\], the config expects \[128, 128\].*transformer.hidden_size"),
    ({"ffn_hidden_size": 80}, r"gate_proj.weight has shape \[96, 64\], the config expects \[80, 64\].*transformer.ffn_hidden_size"),
    ({"head_groups": 4}, r"k_proj.weight has shape \[64, 64\], the config expects \[128, 64\].*transformer.head_groups"),
    ({"add_linear_biases": True}, r"\.bias is missing.*transformer.add_linear_biases"),
])
def test_import_refuses_weights_that_disagree_with_the_config(tmp_path, change, message):
    hf_llama(tmp_path)
    config = model_config_from_dict(base_model_dict_from_hf(tmp_path))
    config.transformer = dataclasses.replace(config.transformer, **change)
    model = our_model(config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ExportError, match=message):
        load_llama_weights(model, tmp_path)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing written


@pytest.mark.parametrize("edit,message", [
    ("drop", r"model.layers.1.mlp.up_proj.weight is missing"),
    ("extra", r"model.layers.0.mlp.extra.weight is not part of this model"),
    ("lm_head", r"lm_head.weight is missing.*tie_word_embeddings"),
])
def test_import_refuses_missing_and_extra_tensors(tmp_path, edit, message):
    hf_llama(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    if edit == "extra":
        tensors["model.layers.0.mlp.extra.weight"] = torch.zeros(3)
    else:
        del tensors["model.layers.1.mlp.up_proj.weight" if edit == "drop" else "lm_head.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    model = our_model(model_config_from_dict(base_model_dict_from_hf(tmp_path)))
    before = model.embed_tokens.weight.clone()
    with pytest.raises(ExportError, match=message):
        load_llama_weights(model, tmp_path)
    assert torch.equal(model.embed_tokens.weight, before)
    tensors.pop("model.layers.0.mlp.extra.weight", None)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(ExportError, match="names shard model-00001-of-00002.safetensors"):
        load_llama_weights(model, tmp_path)


def test_export_refuses_bad_input_and_writes_nothing(tmp_path):
    config = tiny_config()
    state = our_model(config).state_dict()
    out = tmp_path / "out"
    with pytest.raises(ExportError, match="the state dict to export.*lm_head.weight is missing"):
        export_llama({k: v for k, v in state.items() if k != "lm_head.weight"}, config, out, max_position_embeddings=SEQ)
    with pytest.raises(ExportError, match=r"model.norm.weight has shape \[32\], the config expects \[64\]"):
        export_llama(dict(state, **{"norm.weight": torch.ones(32)}), config, out, max_position_embeddings=SEQ)
    layer_norm = dataclasses.replace(config.transformer, normalization=NormalizationConfig("layer_norm"), gated=False)
    with pytest.raises(ExportError, match=r"cannot express this model: model.base_model.transformer.gated: Llama's MLP is gated \(SwiGLU\); set true; model.base_model.transformer.normalization.type `layer_norm`: Llama uses rms_norm; set it"):
        export_llama(state, dataclasses.replace(config, transformer=layer_norm), out, max_position_embeddings=SEQ)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"a": 0, "b": 500}}}))
    with pytest.raises(ExportError, match="token ids go up to 500 but model.base_model.vocab_size is 128"):
        export_llama(state, config, out, max_position_embeddings=SEQ, tokenizer_path=tmp_path / "tokenizer.json")
    assert files_in(tmp_path) == {"tokenizer.json"}


def test_crash_mid_export_leaves_no_complete_looking_folder(tmp_path, monkeypatch):
    config = tiny_config()
    state = our_model(config).state_dict()
    calls = []

    def crash(tensors, file, metadata=None):
        calls.append(file)
        if len(calls) == 2:
            raise OSError("disk full")
        save_file(tensors, file, metadata=metadata)

    monkeypatch.setattr(export, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        export_llama(state, config, tmp_path / "out", max_position_embeddings=SEQ, max_shard_bytes=20_000)
    assert files_in(tmp_path) == set()  # neither the folder nor its temporary sibling
    monkeypatch.undo()

    # An existing complete export is kept unless overwrite is asked for; a crash then keeps the old one.
    out = export_llama(state, config, tmp_path / "out", max_position_embeddings=SEQ)
    with pytest.raises(ExportError, match="already exists"):
        export_llama(state, config, out, max_position_embeddings=SEQ)
    monkeypatch.setattr(export, "save_file", crash)
    calls.clear()
    with pytest.raises(OSError, match="disk full"):
        export_llama(state, config, out, max_position_embeddings=SEQ, max_shard_bytes=20_000, overwrite=True)
    assert files_in(out) == {"config.json", "generation_config.json", "model.safetensors"} and files_in(tmp_path) == {"out"}
    monkeypatch.undo()
    export_llama(state, config, out, max_position_embeddings=SEQ, max_shard_bytes=20_000, overwrite=True)
    assert "model.safetensors.index.json" in files_in(out) and files_in(tmp_path) == {"out"}


# ---------------------------------------------------------------------------------------------
# Command line


def test_cli_exports_a_checkpoint_and_rejects_a_non_checkpoint(tmp_path):
    config = tiny_config(tied=True)
    model = our_model(config, dtype=torch.bfloat16)
    checkpoint = tmp_path / "checkpoints" / "20"
    checkpoint.mkdir(parents=True)
    files = {"model_config.json": json.dumps(dataclasses.asdict(config)), "config.yaml": "{}",
             "trainer.json": json.dumps({"step": 20, "sequence_length": SEQ}),
             "optimizer-00000-of-00001.safetensors": "(an export does not read it)"}
    manifest = {name: write_file(checkpoint / name, [text.encode()]) for name, text in files.items()}
    weights = safetensors_chunks({k: v.contiguous() for k, v in model.state_dict().items()})
    manifest["model.safetensors"] = write_file(checkpoint / "model.safetensors", weights)
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))  # as train.py writes a checkpoint
    train_tokenizer(tmp_path / "tokenizer.json")  # 300 tokens: more than this model's 128
    run = lambda *args: subprocess.run([sys.executable, str(ROOT / "export.py"), *map(str, args)],  # noqa: E731
                                       capture_output=True, text=True, cwd=tmp_path)

    result = run(checkpoint, tmp_path / "hf", "--max-shard-size", "20KB")
    assert result.returncode == 0, result.stderr
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf")
    assert hf.dtype == torch.bfloat16 and len(list((tmp_path / "hf").glob("model-*.safetensors"))) > 1
    torch.testing.assert_close(logits(hf.float(), tokens()), logits(model.float(), tokens()), atol=1e-5, rtol=0)

    result = run(tmp_path / "checkpoints", tmp_path / "other")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"export.py: error: {tmp_path / 'checkpoints'}: not a checkpoint folder")
    assert result.stderr.count("\n") == 1
    result = run(tmp_path, tmp_path / "newest")  # an experiment folder: its newest checkpoint
    assert result.returncode == 0 and f"exported {tmp_path} to {tmp_path / 'newest'}" in result.stdout
    result = run(checkpoint, tmp_path / "other", "--tokenizer", tmp_path / "tokenizer.json")
    assert result.returncode == 2 and "vocab_size is 128" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "other").exists()


def test_exported_tokenizer_encodes_as_prepare_wrapped_the_documents(tmp_path):
    """prepare's BPE starts what it encodes with BOS, as each training document starts: a prompt to the export
    gets the ids training saw; EOS ends generation, as it ended each document."""
    from data import MemmapDataset

    texts = [f"line {i} of some text about the quick brown fox" for i in range(40)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    result = subprocess.run([sys.executable, str(ROOT / "prepare.py"), "--input", str(tmp_path / "a.jsonl"),
                             "--vocab-size", "300", "--output", str(tmp_path / "data")],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    ds = MemmapDataset(tmp_path / "data" / "shard_0")
    config = tiny_config(vocab=320)
    model = our_model(config)
    out = export_llama(model.state_dict(), config, tmp_path / "hf", max_position_embeddings=SEQ,
                       tokenizer_path=tmp_path / "data" / "tokenizer.json")
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    for i in (0, 7, 39):
        document = ds.document(i).tolist()
        assert tokenizer(texts[i]).input_ids == document[:-1]  # BOS, the text; no EOS closing a prompt
        assert document[-1] == tokenizer.eos_token_id == hf.generation_config.eos_token_id
    prompt = tokenizer(texts[3], return_tensors="pt")
    generated = hf.generate(**prompt, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert generated[0, :prompt["input_ids"].shape[1]].tolist() == ds.document(3).tolist()[:-1]


def test_exported_weights_honour_the_umask(tmp_path):
    config = tiny_config()
    out = export_llama(our_model(config).state_dict(), config, tmp_path / "hf", max_position_embeddings=SEQ)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert set(modes.values()) == {0o666 & ~export.UMASK}, modes
