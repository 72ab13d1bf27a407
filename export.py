"""Hugging Face Llama interop: write our weights as a `LlamaForCausalLM` folder, read one back.

Our parameter names are Hugging Face's without the `model.` prefix (model.py), and both sides rotate
with the half-split convention, so tensors pass through unchanged: export is a rename, a config.json
translation and a crash-safe write; import is the reverse, with strict checks of names and shapes.

    python export.py CHECKPOINT_DIR OUTPUT_DIR [--tokenizer tokenizer.json] [--max-shard-size 5GB]
"""
import argparse
import dataclasses
import errno
import functools
import json
import math
import operator
import os
import re
import shutil
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from checkpoint import CheckpointError, choose_checkpoint, damage, read_state, remove
from data import DataError, tokenizer_ids
from model import BaseModelConfig, Llama


UMASK = os.umask(0o022)  # read (it can only be read by setting it), then put back at once
os.umask(UMASK)


class ExportError(Exception):
    """Bad input (a config, a folder, a file): the message says what, where, and what would fit."""


# Our activation names -> Hugging Face's `hidden_act` (model.py's gelu is the tanh approximation).
HF_ACTIVATIONS = {"silu": "silu", "gelu": "gelu_pytorch_tanh", "relu": "relu", "squared_relu": "relu2"}
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"  # Llama 3's special tokens, used when the tokenizer has them

# ---------------------------------------------------------------------------------------------
# config.json <-> model.base_model


# config.json's keys -> ours under model.base_model, for both directions (attention_bias and mlp_bias: one of ours).
HF_KEYS = {"vocab_size": "vocab_size", "tie_word_embeddings": "tie_word_embeddings",
           "hidden_size": "transformer.hidden_size", "intermediate_size": "transformer.ffn_hidden_size",
           "num_hidden_layers": "transformer.num_layers", "num_attention_heads": "transformer.num_attention_heads",
           "num_key_value_heads": "transformer.head_groups", "head_dim": "transformer.kv_channels",
           "rms_norm_eps": "transformer.normalization.epsilon", "attention_bias": "transformer.add_linear_biases",
           "mlp_bias": "transformer.add_linear_biases"}
ROPE_KEYS = {"factor": "scale_factor", "low_freq_factor": "low_frequency_factor",  # rope_scaling's, under rotary
             "high_freq_factor": "high_frequency_factor",
             "original_max_position_embeddings": "original_context_length"}


def hf_config(config: BaseModelConfig, max_position_embeddings: int, dtype: torch.dtype) -> dict:
    """The config.json of `config`, with the published Llama-3.1 keys; refuses what HF Llama can't express."""
    t, r = config.transformer, config.transformer.rotary
    problems = config.errors()  # what model.py can't build; then what transformers' LlamaConfig refuses
    if t.hidden_size % max(t.num_attention_heads, 1):  # checked by transformers even when head_dim is given
        problems.append(f"model.base_model.transformer.hidden_size {t.hidden_size} must be a multiple of "
                        "num_attention_heads for transformers")
    if problems:
        raise ExportError("Hugging Face Llama cannot express this model: " + "; ".join(problems) + ".")
    resolved = dataclasses.replace(config, transformer=dataclasses.replace(t, kv_channels=t.head_dim,
                                                                           ffn_hidden_size=t.ffn_size))
    rope_scaling = None if r.scaling_type == "none" else {
        "rope_type": "llama3", **{hf: getattr(r, ours) for hf, ours in ROPE_KEYS.items()}}
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            **{hf: operator.attrgetter(ours)(resolved) for hf, ours in HF_KEYS.items()},
            "hidden_act": HF_ACTIVATIONS[t.activation],
            # exp(ln 500000) is 499999.99999999977 in floats; 12 digits give back the round theta.
            "rope_theta": float(f"{math.exp(-t.rotary_embedding_scale):.12g}"), "rope_scaling": rope_scaling,
            "max_position_embeddings": max_position_embeddings, "initializer_range": t.std,
            "bos_token_id": None, "eos_token_id": None,  # filled in by export_llama from the tokenizer, if any
            "torch_dtype": str(dtype).removeprefix("torch.")}


def _read_json(file: Path, what: str):
    if not file.is_file():
        raise ExportError(f"{file.parent}: no {file.name} in this folder ({what}).")
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f"{file}: not valid JSON ({e}).") from None


def base_model_dict_from_hf(path) -> dict:
    """`model.base_model` keys (docs/schema.md) read from a Hugging Face Llama folder's config.json,
    written by transformers 4 (rope_theta + rope_scaling) or 5 (rope_parameters)."""
    path = Path(path)
    if not path.is_dir():
        raise ExportError(f"{path}: no such folder; pretrained.path must be a Hugging Face Llama folder.")
    file = path / "config.json"
    hf = _read_json(file, "a Hugging Face model folder has config.json beside its weights")
    if not isinstance(hf, dict) or hf.get("model_type") != "llama" or any(
            a != "LlamaForCausalLM" for a in hf.get("architectures") or []):
        kind = (hf.get("model_type"), hf.get("architectures")) if isinstance(hf, dict) else type(hf).__name__
        raise ExportError(f"{file}: not a Llama model ({kind}); pretrained.format llama reads "
                          "model_type llama, architectures [LlamaForCausalLM].")
    required = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"]
    if missing := [k for k in required if k not in hf]:
        raise ExportError(f"{file}: missing {', '.join(missing)}.")
    if bad := [f"{k} {hf[k]!r}" for k in required if type(hf[k]) is not int or not 0 < hf[k] < 2**63]:
        raise ExportError(f"{file}: {', '.join(bad)}; each must be a positive whole number.")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    activation = {v: k for k, v in HF_ACTIVATIONS.items()}.get(hf.get("hidden_act", "silu"))
    if rope_type not in ("default", "llama3") or activation is None:
        raise ExportError(f"{file}: rope type {rope_type!r}, hidden_act {hf.get('hidden_act')!r}; supported: "
                          f"rope default or llama3, hidden_act one of {list(HF_ACTIVATIONS.values())}.")
    if hf.get("attention_bias", False) != hf.get("mlp_bias", False):
        raise ExportError(f"{file}: attention_bias and mlp_bias differ; add_linear_biases sets both.")
    if rope_type == "llama3" and (missing := [k for k in ROPE_KEYS if k not in rope]):
        raise ExportError(f"{file}: llama3 rope scaling without {', '.join(missing)}.")
    heads = hf["num_attention_heads"]  # LlamaConfig's defaults for the keys it may leave out:
    hf = {"num_key_value_heads": heads, "head_dim": hf["hidden_size"] // heads, "rms_norm_eps": 1e-6,
          "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
          **{k: v for k, v in hf.items() if v is not None}}
    rotary = {"scaling_type": "none"} if rope_type == "default" else {
        "scaling_type": "llama3", **{ours: rope[theirs] for theirs, ours in ROPE_KEYS.items()}}
    ours = {"use_position_embeddings": False, "transformer": {
        "gated": True, "activation_type": activation, "use_rotary_embeddings": True,
        "normalization": {"type": "rms_norm"}, "rotary": rotary,
        "rotary_embedding_scale": -math.log(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))}}
    for theirs, key in HF_KEYS.items():  # our dotted key paths, into the nested dicts
        *parents, leaf = key.split(".")
        functools.reduce(lambda node, part: node.setdefault(part, {}), parents, ours)[leaf] = hf[theirs]
    return ours


def model_config_from_dict(d: dict, where: str = "model.base_model", cls=BaseModelConfig):
    """Rebuild a (nested) config dataclass from `dataclasses.asdict` output or a partial YAML dict."""
    if not isinstance(d, dict):
        raise ExportError(f"{where}: expected a mapping of {cls.__name__} keys, got {d!r}.")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if unknown := sorted(set(d) - set(fields)):
        raise ExportError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(fields)}.")
    return cls(**{k: model_config_from_dict(v, f"{where}.{k}", fields[k].type)
                  if dataclasses.is_dataclass(fields[k].type) else v for k, v in d.items()})


# ---------------------------------------------------------------------------------------------
# Checking tensors against a config

# The config keys behind each dimension of a tensor, by module name (a bias shares its weight's first).
H, F, Q, KV = ("transformer.hidden_size", "transformer.ffn_hidden_size",
               "transformer.num_attention_heads or kv_channels", "transformer.head_groups or kv_channels")
DIM_KEYS = {"embed_tokens": ("vocab_size", H), "lm_head": ("vocab_size", H), "q_proj": (Q, H), "k_proj": (KV, H),
            "v_proj": (KV, H), "o_proj": (H, Q), "gate_proj": (F, H), "up_proj": (F, H), "down_proj": (H, F),
            "norm": (H,)}


def hf_name(name: str) -> str:
    return name if name == "lm_head.weight" else "model." + name


def check_tensors(expected: dict[str, tuple], found: dict[str, tuple], where: str) -> None:
    """Names and shapes must match exactly; the error names the config key that probably disagrees."""
    def fail(problem, key):
        hint = f"the config key that probably disagrees: model.base_model.{key}" if key else "is the file complete?"
        raise ExportError(f"{where}: {problem}; {hint}.")
    layers = lambda names: len({m[1] for n in names if (m := re.match(r"layers\.(\d+)\.", n))})  # noqa: E731
    if layers(found) != layers(expected):
        fail(f"the weights have {layers(found)} layers, the config {layers(expected)}", "transformer.num_layers")
    for name in sorted(expected.keys() - found.keys()) + sorted(found.keys() - expected.keys()):
        problem = "is missing" if name in expected else "is not part of this model"
        key = ("tie_word_embeddings" if name.startswith("lm_head") else
               "transformer.add_linear_biases" if name.endswith(".bias") else None)
        fail(f"tensor {hf_name(name)} {problem}", key)
    for name, shape in expected.items():
        if found[name] != shape:
            dim = next(i for i in range(len(shape)) if len(found[name]) != len(shape) or found[name][i] != shape[i])
            keys = next(v for k, v in DIM_KEYS.items() if name.split(".")[-2].endswith(k))
            fail(f"tensor {hf_name(name)} has shape {list(found[name])}, the config expects {list(shape)}", keys[dim])


# ---------------------------------------------------------------------------------------------
# Export


def export_llama(state_dict: dict[str, torch.Tensor], config: BaseModelConfig, output_dir, *,
                 max_position_embeddings: int, tokenizer_path=None, max_shard_bytes: int = 5 * 2**30,
                 overwrite: bool = False) -> Path:
    """Write a folder that `LlamaForCausalLM.from_pretrained` loads, in the state dict's dtype.
    Everything goes into a hidden sibling folder first, renamed into place only when complete."""
    output_dir = Path(output_dir).resolve()  # resolved: "." has no name to put a sibling beside
    dtype = next(iter(state_dict.values())).dtype if state_dict else torch.float32  # empty: refused below
    config_json = hf_config(config, max_position_embeddings, dtype)
    with torch.device("meta"):  # the model that `config` describes, without its memory
        expected = {n: tuple(t.shape) for n, t in Llama(config, 1).state_dict().items()}
    check_tensors(expected, {n: tuple(t.shape) for n, t in state_dict.items()}, "the state dict to export")
    jsons = {"config.json": config_json}  # the files besides the weights, by name
    if tokenizer_path is not None:
        special = tokenizer_special_ids(Path(tokenizer_path), config.vocab_size)
        config_json.update(bos_token_id=special.get(BOS), eos_token_id=special.get(EOS))
        jsons["tokenizer_config.json"] = {
            "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_position_embeddings,
            "bos_token": BOS if BOS in special else None, "eos_token": EOS if EOS in special else None,
            "model_input_names": ["input_ids", "attention_mask"],  # no token_type_ids: generate() rejects them
            "clean_up_tokenization_spaces": False}
    jsons["generation_config.json"] = {k: config_json[k] for k in ("bos_token_id", "eos_token_id")}
    tmp, old = (output_dir.with_name(f".{output_dir.name}.{end}") for end in ("partial", "old"))
    if old.is_dir() and not output_dir.exists():  # killed between the two renames below: the old one is whole
        old.rename(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise ExportError(f"{output_dir}: already exists and is not empty; remove it, export elsewhere, "
                          "or ask to overwrite (--overwrite).")
    shards, size = [[]], 0  # tensors in state-dict order, a new file whenever the next would pass the limit
    for name, t in state_dict.items():
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards, size = shards + [[]], 0
        shards[-1].append(name)
        size += t.nbytes
    files = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    if len(files) > 1:
        jsons["model.safetensors.index.json"] = {
            "metadata": {"total_size": sum(t.nbytes for t in state_dict.values())},
            "weight_map": {hf_name(n): f for f, names in zip(files, shards) for n in names}}

    remove(tmp)  # left by an earlier crash
    tmp.mkdir(parents=True)
    try:
        for file, names in zip(files, shards):  # one shard at a time on the CPU
            try:
                save_file({hf_name(n): state_dict[n].detach().cpu().contiguous() for n in names}, tmp / file,
                          metadata={"format": "pt"})
            except SafetensorError as e:  # its own error for a failed write (a full disk): made Python's OSError
                code = int(m[1]) if (m := re.search(r"os error (\d+)", str(e))) else errno.EIO
                raise OSError(code, os.strerror(code), str(tmp / file)) from None
            os.chmod(tmp / file, 0o666 & ~UMASK)  # safetensors writes its files 0600: others may read the weights
        for name, content in jsons.items():
            (tmp / name).write_text(json.dumps(content, indent=2))
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, tmp / "tokenizer.json")
        if output_dir.exists() or output_dir.is_symlink():  # empty, or overwrite was asked for: replaced by renames,
            remove(old)  # so that a kill at any moment leaves a whole export under one of the two names
            output_dir.rename(old)
        tmp.rename(output_dir)
        remove(old)
    except BaseException:
        remove(tmp)
        raise
    return output_dir


def tokenizer_special_ids(path: Path, vocab_size: int) -> dict[str, int]:
    """Ids of Llama 3's bos/eos tokens in a tokenizer.json, checking that every id fits the model."""
    try:
        ids = tokenizer_ids(path)
    except DataError as e:
        raise ExportError(str(e)) from None
    if ids and max(ids.values()) >= vocab_size:
        raise ExportError(f"{path}: token ids go up to {max(ids.values())} but model.base_model.vocab_size is "
                          f"{vocab_size}; the model could not embed them.")
    return {tok: ids[tok] for tok in (BOS, EOS) if tok in ids}


# ---------------------------------------------------------------------------------------------
# Import


def load_llama_weights(model: Llama, path) -> None:
    """Copy a Hugging Face Llama folder's weights into a materialized `model`, strictly: same tensor
    names and shapes (else ExportError, the model untouched), converted to the model's dtype. A model
    on the meta device is only checked, from the files' headers."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({path / f for f in _read_json(index, "the shard index")["weight_map"].values()})
    elif (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    else:
        raise ExportError(f"{path}: no weights (model.safetensors or model.safetensors.index.json); "
                          "only safetensors are read, and pretrained.model_weights: false takes the config only.")
    found = {}  # our name -> (file, its name in the file, shape)
    for file in files:
        if not file.is_file():
            raise ExportError(f"{index}: names shard {file.name}, which is not in the folder.")
        try:
            with safe_open(file, "pt") as f:  # rotary_emb.inv_freq: a derived buffer that old exports carried
                found.update({name.removeprefix("model."): (file, name, tuple(f.get_slice(name).get_shape()))
                              for name in f.keys() if not name.endswith("rotary_emb.inv_freq")})
        except SafetensorError as e:
            raise ExportError(f"{file}: not a readable safetensors file ({e}).") from None
    params = model.state_dict()  # tensors sharing storage with the parameters
    check_tensors({n: tuple(p.shape) for n, p in params.items()}, {n: v[2] for n, v in found.items()},
                  f"{path} (weights vs model config)")
    if any(p.is_meta for p in params.values()):
        return  # a model on meta (train.py --dry-run): the names and shapes are checked, nothing is read
    with torch.no_grad():
        for file in files:
            with safe_open(file, "pt") as f:
                for name, (in_file, key, _) in found.items():
                    if in_file == file:
                        params[name].copy_(f.get_tensor(key))  # converts dtype and device
    model.init_rotary()  # in case the model was only `to_empty`-ed


# ---------------------------------------------------------------------------------------------
# Command line: export a training checkpoint


def export_checkpoint(checkpoint, output_dir, tokenizer_path=None, **kwargs) -> Path:
    """Export a checkpoint folder, or an experiment folder's newest checkpoint. Without `tokenizer_path`,
    the tokenizer.json beside the dataset the checkpoint was trained on goes in, when there is one."""
    checkpoint, weights, out = Path(checkpoint), {}, Path(output_dir).resolve()
    experiment = (checkpoint / "checkpoints").is_dir()  # else a checkpoint folder
    kept = checkpoint.resolve() / "checkpoints" if experiment else checkpoint.resolve()  # rotation deletes in there
    if checkpoint.resolve().is_relative_to(out) or out.is_relative_to(kept):
        raise ExportError(f"{output_dir}: holds or lies inside {checkpoint}, which an export there would overwrite "
                          "or checkpoint rotation delete; export elsewhere.")

    def load(checkpoint: Path, state) -> str | None:  # its weights, if they are finite
        weights.clear()
        try:
            weights.update(load_file(checkpoint / "model.safetensors"))
        except SafetensorError as e:
            return f"{checkpoint / 'model.safetensors'} is not a readable safetensors file ({e})"
        return None if all(t.isfinite().all() for t in weights.values()) else "its weights hold NaN or infinity"
    if experiment:  # an experiment folder: its newest usable checkpoint, as a resume takes
        if (found := choose_checkpoint(checkpoint, 0, 1, load)[0]) is None:
            raise ExportError(f"{checkpoint}: an experiment folder without a complete checkpoint yet.")
        checkpoint = found
    elif not (checkpoint / "manifest.json").is_file():
        where = "" if checkpoint.is_dir() else "; no such folder"
        raise ExportError(f"{checkpoint}: not a checkpoint folder (train.py writes them into EXPERIMENT_DIR/"
                          f"checkpoints/STEP/, with a manifest.json){where}.")
    elif problem := damage(checkpoint) or load(checkpoint, None):
        raise ExportError(f"checkpoint {checkpoint} can't be used: {problem}.")
    if tokenizer_path is None:
        data = (yaml.safe_load((checkpoint / "config.yaml").read_text()) or {}).get("data") or {}
        found = Path(str(data.get("path"))).parent / "tokenizer.json"
        tokenizer_path = found if data.get("format", "file") == "file" and "path" in data and found.is_file() else None
    config = model_config_from_dict(json.loads((checkpoint / "model_config.json").read_text()))
    sequence_length = read_state(checkpoint).sequence_length
    return export_llama(weights, config, output_dir, max_position_embeddings=context_length(config, sequence_length),
                        tokenizer_path=tokenizer_path, **kwargs)


def context_length(config: BaseModelConfig, sequence_length: int) -> int:
    """max_position_embeddings: the trained length, or what llama3 scaling stretches the original context to."""
    r = config.transformer.rotary
    return max(sequence_length, int(r.original_context_length * r.scale_factor) if r.scaling_type == "llama3" else 0)


def parse_size(text: str) -> int:
    """'5GB' (10^9) or '5GiB' (2^30) or plain bytes, as transformers' max_shard_size."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([a-zA-Z]*)", text.strip())
    if not m or m[2].upper() not in units:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 5GB, 500MiB or 1000000")
    return int(float(m[1]) * units[m[2].upper()])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Export a training checkpoint as a Hugging Face Llama folder, which\n"
                    "transformers' AutoModelForCausalLM.from_pretrained loads.",
        epilog="examples:\n  python export.py experiments/tiny hf/tiny            (its newest checkpoint)\n"
               "  python export.py experiments/tiny/checkpoints/120 hf/tiny --tokenizer data/demo/tokenizer.json\n\n"
               "The folder's files: docs/formats.md, section 3. Exit status 0 when written, 2 on bad input.")
    p.add_argument("checkpoint", help="a checkpoint folder, EXPERIMENT_DIR/checkpoints/STEP, or EXPERIMENT_DIR "
                   "for its newest checkpoint")
    p.add_argument("output", help="the folder to write (must not exist, or be empty)")
    p.add_argument("--tokenizer", help="a tokenizer.json to include, with a tokenizer_config.json; its BOS/EOS ids "
                   "go into config.json (default: the one beside the dataset the checkpoint was trained on)")
    p.add_argument("--max-shard-size", type=parse_size, default=5 * 2**30, metavar="SIZE",
                   help="largest safetensors file before the weights are split: 5GB, 500MiB or bytes; default 5GiB")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export")
    args = p.parse_args(argv)
    try:
        out = export_checkpoint(args.checkpoint, args.output, tokenizer_path=args.tokenizer,
                                max_shard_bytes=args.max_shard_size, overwrite=args.overwrite)
    except (ExportError, CheckpointError) as e:
        p.exit(2, f"export.py: error: {e}\n")
    except OSError as e:  # an unwritable folder, a full disk: one line, as argparse reports a bad argument
        p.exit(2, f"export.py: error: {e.filename or args.output}: {e.strerror or e}\n")
    tokenizer = (out / "tokenizer.json").is_file()
    print(f"exported {args.checkpoint} to {out}" + ("" if tokenizer else " (no tokenizer found: use --tokenizer)"))


if __name__ == "__main__":
    main()
