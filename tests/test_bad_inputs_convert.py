"""Bad input to `python -m sc_jax.convert`: one `error:` line naming the problem and the fix,
exit code 2, no traceback, nothing at --out (see tests/cli_harness.py)."""

import json
import os
import shutil
import struct

import pytest
from cli_harness import BadInput, run_bad_input
from damage import damage_params

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=128)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Small real checkpoints saved by transformers: StableLM, Llama, GPT-NeoX, and an orbax
    conversion of the StableLM one."""
    from sc_jax.convert.__main__ import main as convert_main

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    transformers.StableLmForCausalLM(transformers.StableLmConfig(**TINY)).save_pretrained(root / "stablelm")
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).save_pretrained(root / "llama")
    neox = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
    transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**neox)).save_pretrained(root / "gpt_neox")
    assert convert_main(["hf-to-orbax", "--hf", str(root / "stablelm"), "--out", str(root / "orbax")]) == 0
    return root


def copy_model(models, name, dst="in"):
    def setup(d):
        shutil.copytree(models / name, os.path.join(d, dst))
    return setup


def edited_config(models, **changes):
    def setup(d):
        copy_model(models, "stablelm")(d)
        path = os.path.join(d, "in", "config.json")
        with open(path) as f:
            config = json.load(f)
        config.update(changes)
        with open(path, "w") as f:
            json.dump(config, f)
    return setup


def damaged_file(models, name, damage):
    def setup(d):
        copy_model(models, "stablelm")(d)
        damage(os.path.join(d, "in", name))
    return setup


def truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def overwrite(text):
    def damage(path):
        with open(path, "w") as f:
            f.write(text)
    return damage


def crafted_header(entry):
    """A model.safetensors whose one header entry is `entry` (hand-made or damaged headers)."""
    def damage(path):
        blob = json.dumps({"model.embed_tokens.weight": entry}).encode()
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(blob)) + blob + bytes(64))
    return damage


def only_bin(d):
    os.makedirs(os.path.join(d, "in"))
    with open(os.path.join(d, "in", "config.json"), "w") as f:
        json.dump({"model_type": "stablelm"}, f)
    open(os.path.join(d, "in", "pytorch_model.bin"), "wb").close()


def index_missing_shard(models):
    def setup(d):
        copy_model(models, "stablelm")(d)
        src = os.path.join(d, "in", "model.safetensors")
        os.rename(src, os.path.join(d, "in", "model-00001-of-00002.safetensors"))
        with open(os.path.join(d, "in", "model.safetensors.index.json"), "w") as f:
            json.dump({"weight_map": {"model.embed_tokens.weight": "model-00002-of-00002.safetensors"}}, f)
    return setup


def non_empty_out(models):
    def setup(d):
        copy_model(models, "stablelm")(d)
        os.makedirs(os.path.join(d, "out"))
        open(os.path.join(d, "out", "keep.txt"), "w").close()
    return setup


def no_checkpoint(d):
    os.makedirs(os.path.join(d, "in"))


def damaged_only_step(models):
    """An orbax checkpoint whose only step's data files are cut short."""
    def setup(d):
        copy_model(models, "orbax")(d)
        damage_params(os.path.join(d, "in", "0"))
    return setup


def small_tokenizer(size=100, pre=None, specials=("<|endoftext|>", "<fim_prefix>"), name="tok.json"):
    """A byte-level BPE tokenizer.json of `size` tokens (the tiny models have 128 rows)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    def setup(d):
        alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())[:size - len(specials)]
        tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
        tok.pre_tokenizer = pre or pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.add_special_tokens(list(specials))
        tok.save(os.path.join(d, name))
    return setup


def both(*setups):
    def setup(d):
        for s in setups:
            s(d)
    return setup


def existing_file(name):
    def setup(d):
        with open(os.path.join(d, name), "w") as f:
            f.write("someone's model")
    return setup


def gguf_rows(models):
    from tokenizers import pre_tokenizers

    G = ["orbax-to-gguf", "--ckpt", "in", "--out", "out.gguf"]
    GT = [*G, "--tokenizer", "tok.json"]
    HG = ["hf-to-gguf", "--hf", "in", "--out", "out.gguf", "--tokenizer", "tok.json"]
    orbax = copy_model(models, "orbax")
    return [
        BadInput("gguf: missing --ckpt", "sc_jax.convert", G, ("'in'", "does not exist"), leaves=("out.gguf",)),
        BadInput("gguf: unknown --type", "sc_jax.convert", [*GT, "--type", "q3_k"], ("--type", "invalid choice"),
                 both(orbax, small_tokenizer()), leaves=("out.gguf",)),
        BadInput("gguf: --out exists without --force", "sc_jax.convert", GT, ("exists", "--force"),
                 both(orbax, small_tokenizer(), existing_file("out.gguf"))),
        BadInput("gguf: --out is a directory", "sc_jax.convert", GT, ("is a directory",),
                 both(orbax, small_tokenizer(), lambda d: os.makedirs(os.path.join(d, "out.gguf")))),
        BadInput("gguf: no tokenizer beside the checkpoint", "sc_jax.convert", G, ("no tokenizer found", "--tokenizer"),
                 orbax, leaves=("out.gguf",)),
        BadInput("gguf: tokenizer bigger than the model's vocabulary", "sc_jax.convert", GT,
                 ("200 tokens", "128 embedding rows", "--tokenizer"), both(orbax, small_tokenizer(200)),
                 leaves=("out.gguf",)),
        BadInput("gguf: a pre-tokenizer llama.cpp cannot express", "sc_jax.convert", GT,
                 ("pre-tokenizer", "llama.cpp"), both(orbax, small_tokenizer(pre=pre_tokenizers.Whitespace())),
                 leaves=("out.gguf",)),
        BadInput("gguf: tokenizer without <|endoftext|>", "sc_jax.convert", GT, ("<|endoftext|>",),
                 both(orbax, small_tokenizer(specials=("<fim_prefix>",))), leaves=("out.gguf",)),
        BadInput("gguf: the only step is damaged", "sc_jax.convert", GT, ("checkpoint step 0", "could not be read"),
                 both(damaged_only_step(models), small_tokenizer()), leaves=("out.gguf",)),
        BadInput("hf-to-gguf: a llama checkpoint", "sc_jax.convert", HG, ("model_type 'llama'",),
                 both(copy_model(models, "llama"), small_tokenizer()), leaves=("out.gguf",)),
        BadInput("hf-to-gguf: missing --hf", "sc_jax.convert", HG, ("'in'", "not found"), small_tokenizer(),
                 leaves=("out.gguf",)),
    ]


def rows(models):
    H = ["hf-to-orbax", "--hf", "in", "--out", "out"]
    O = ["orbax-to-hf", "--ckpt", "in", "--out", "out"]
    return [*gguf_rows(models),
        BadInput("llama config over StableLM tensors", "sc_jax.convert", H, ("model_type 'llama'", "stablelm"),
                 edited_config(models, model_type="llama", architectures=["LlamaForCausalLM"]), leaves=("out",)),
        BadInput("intermediate_size disagrees with the tensors", "sc_jax.convert", H,
                 ("mlp.gate_proj.weight", "[96, 64]", "[100, 64]", "intermediate_size"),
                 edited_config(models, intermediate_size=100), leaves=("out",)),
        BadInput("hidden_size disagrees", "sc_jax.convert", H, ("embed_tokens", "[128, 64]", "[128, 96]"),
                 edited_config(models, hidden_size=96), leaves=("out",)),
        BadInput("config says more layers than the weights hold", "sc_jax.convert", H, ("3 layers", "hold 2"),
                 edited_config(models, num_hidden_layers=3), leaves=("out",)),
        BadInput("config says qk layernorm the weights lack", "sc_jax.convert", H, ("q_layernorm", "missing"),
                 edited_config(models, qk_layernorm=True), leaves=("out",)),
        BadInput("a real llama checkpoint", "sc_jax.convert", H, ("model_type 'llama'", "stablelm checkpoints only"),
                 copy_model(models, "llama"), leaves=("out",)),
        BadInput("a real gpt_neox checkpoint", "sc_jax.convert", H, ("model_type 'gpt_neox'",),
                 copy_model(models, "gpt_neox"), leaves=("out",)),
        BadInput("missing --hf directory", "sc_jax.convert", H, ("'in'", "not found"), leaves=("out",)),
        BadInput("--hf is a file", "sc_jax.convert", H, ("is a file",), lambda d: open(os.path.join(d, "in"), "w").close(),
                 leaves=("out",)),
        BadInput("config.json is not JSON", "sc_jax.convert", H, ("not valid json",),
                 damaged_file(models, "config.json", overwrite("{model_type: ")), leaves=("out",)),
        BadInput("no config.json", "sc_jax.convert", H, ("no config.json",),
                 damaged_file(models, "config.json", os.remove), leaves=("out",)),
        BadInput("truncated safetensors", "sc_jax.convert", H, ("truncated",),
                 damaged_file(models, "model.safetensors", truncate), leaves=("out",)),
        BadInput("safetensors with a garbage header", "sc_jax.convert", H, ("not a valid safetensors",),
                 damaged_file(models, "model.safetensors", overwrite("garbage" * 10)), leaves=("out",)),
        BadInput("safetensors header entry that is a list", "sc_jax.convert", H, ("bad header entry",),
                 damaged_file(models, "model.safetensors", crafted_header([1, 2])), leaves=("out",)),
        BadInput("safetensors header entry without offsets", "sc_jax.convert", H, ("bad header entry",),
                 damaged_file(models, "model.safetensors", crafted_header({"dtype": "F32", "shape": [2]})),
                 leaves=("out",)),
        BadInput("safetensors shape and offsets disagree", "sc_jax.convert", H, ("shape and offsets disagree",),
                 damaged_file(models, "model.safetensors",
                              crafted_header({"dtype": "F32", "shape": [2], "data_offsets": [0, 4]})),
                 leaves=("out",)),
        BadInput("only PyTorch .bin weights", "sc_jax.convert", H, (".bin", "safetensors"), only_bin, leaves=("out",)),
        BadInput("index names a shard that does not exist", "sc_jax.convert", H, ("does not exist",),
                 index_missing_shard(models), leaves=("out",)),
        BadInput("--out exists and is not empty", "sc_jax.convert", H, ("not empty", "new --out"), non_empty_out(models)),
        BadInput("bad --dtype", "sc_jax.convert", [*H, "--dtype", "int8"], ("--dtype", "invalid choice"),
                 copy_model(models, "stablelm"), leaves=("out",)),
        BadInput("missing --ckpt", "sc_jax.convert", O, ("'in'", "does not exist"), leaves=("out",)),
        BadInput("--ckpt holds no checkpoint", "sc_jax.convert", O, ("no complete orbax checkpoint",), no_checkpoint,
                 leaves=("out",)),
        BadInput("--step that is not there", "sc_jax.convert", [*O, "--step", "5"], ("step 5", "[0]"),
                 copy_model(models, "orbax"), leaves=("out",)),
        BadInput("--tokenizer that does not exist", "sc_jax.convert", [*O, "--tokenizer", "nope.json"],
                 ("nope.json", "does not exist"), copy_model(models, "orbax"), leaves=("out",)),
        BadInput("the only step is damaged", "sc_jax.convert", O, ("checkpoint step 0", "could not be read"),
                 damaged_only_step(models), leaves=("out",)),
        BadInput("no subcommand", "sc_jax.convert", [], ("required",)),
    ]


ROW_NAMES = [r.name for r in rows(None)]


@pytest.mark.parametrize("name", ROW_NAMES)
def test_bad_input(models, tmp_path, name):
    (row,) = [r for r in rows(models) if r.name == name]
    run_bad_input(row, str(tmp_path))
