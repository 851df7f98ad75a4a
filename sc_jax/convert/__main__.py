"""Checkpoint conversion between Hugging Face (`StableLmForCausalLM`) and orbax.

    python -m sc_jax.convert hf-to-orbax --hf DIR --out DIR [--dtype source|float32|bfloat16]
    python -m sc_jax.convert orbax-to-hf --ckpt DIR --out DIR [--step N] [--dtype bfloat16|float32|float16]
    python -m sc_jax.convert orbax-to-gguf --ckpt DIR --out FILE.gguf [--step N] [--type f16|q8_0|q4_0|...]
    python -m sc_jax.convert hf-to-gguf --hf DIR --out FILE.gguf [--type f16|q8_0|q4_0|...]

Both directions stream: one of our parameters (a stack of one tensor over all layers)
is in memory at a time, so a model converts in little more than its largest tensor.
"""

from __future__ import annotations

import sys

from sc_jax.cli import Parser
from sc_jax.config import DTYPES, ConfigError
from sc_jax.convert.streaming import hf_to_gguf, hf_to_orbax, orbax_to_gguf, orbax_to_hf
from sc_jax.convert.to_gguf import GGUF_TYPES


def main(argv=None) -> int:
    parser = Parser(prog="python -m sc_jax.convert", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("hf-to-orbax", help="HF directory (config.json + safetensors) -> orbax checkpoint")
    a.add_argument("--hf", required=True, help="Hugging Face model directory (StableLM)")
    a.add_argument("--out", required=True, help="new orbax checkpoint directory (must not exist, or be empty)")
    a.add_argument("--dtype", default="source", choices=["source", *sorted(DTYPES)],
                   help="dtype of the stored parameters: source keeps each tensor's own")
    b = sub.add_parser("orbax-to-hf", help="orbax checkpoint or training run directory -> HF directory")
    b.add_argument("--ckpt", required=True, help="orbax checkpoint directory, a step in it, or a training run directory")
    b.add_argument("--out", required=True, help="new Hugging Face model directory (must not exist, or be empty)")
    b.add_argument("--step", type=int, default=None, help="step to export (default: the newest readable one)")
    b.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES), help="dtype of the exported weights")
    b.add_argument("--tokenizer", default=None,
                   help="tokenizer.json or directory to copy (default: found beside the checkpoint)")
    _add_gguf_commands(sub)
    args = parser.parse_args(argv)
    try:
        if args.cmd == "hf-to-orbax":
            hf_to_orbax(args.hf, args.out, args.dtype)
        elif args.cmd == "orbax-to-hf":
            orbax_to_hf(args.ckpt, args.out, args.step, args.dtype, args.tokenizer)
        elif args.cmd == "orbax-to-gguf":
            orbax_to_gguf(args.ckpt, args.out, args.step, args.type, args.tokenizer, args.force)
        else:
            hf_to_gguf(args.hf, args.out, args.type, args.tokenizer, args.force)
    except (ConfigError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _add_gguf_commands(sub) -> None:
    types = ("f32/f16/bf16: every matrix at that precision; q8_0, q4_0, q4_1: llama.cpp's block quantization "
             "(norms stay f32)")
    for cmd, source, flag, what in (("orbax-to-gguf", "orbax checkpoint or training run directory", "--ckpt",
                                     "orbax checkpoint directory, a step in it, or a training run directory"),
                                    ("hf-to-gguf", "HF directory", "--hf", "Hugging Face model directory (StableLM)")):
        p = sub.add_parser(cmd, help=f"{source} -> one GGUF file for llama.cpp")
        p.add_argument(flag, dest="ckpt" if flag == "--ckpt" else "hf", required=True, help=what)
        p.add_argument("--out", required=True, help="new .gguf file")
        if flag == "--ckpt":
            p.add_argument("--step", type=int, default=None, help="step to export (default: the newest readable one)")
        p.add_argument("--type", default="f16", choices=GGUF_TYPES, help=types)
        p.add_argument("--tokenizer", default=None,
                       help="tokenizer.json or directory holding one (default: found beside the checkpoint)")
        p.add_argument("--force", action="store_true", help="replace --out if it exists")


if __name__ == "__main__":
    sys.exit(main())
