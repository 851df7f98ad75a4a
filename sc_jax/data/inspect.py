"""Look at what the data pipeline feeds the model.

    python -m sc_jax.data.inspect --config experiments/configs/cpu.yaml [data.fim_rate=0.9 ...]

FILE is a training YAML with a top-level `data:` section (seq_len then comes from `train.seq_len`
unless --seq-len is given) or a YAML holding only data keys. Prints a few packed rows decoded with
the special tokens visible, then statistics over --batches batches: tokens/s, fill rate, FIM
fraction, documents per row, and the files skipped and why.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import yaml

from sc_jax.config import ConfigError, apply_overrides, from_dict


def load_data_config(path: str, overrides: list[str] = ()):
    """(DataConfig, seq_len or None) from a training YAML (`data:` section) or a data-only YAML."""
    from sc_jax.data.config import DataConfig

    if not os.path.exists(path):
        raise ConfigError(f"config file '{path}' does not exist")
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping at the top level")
    seq_len = None
    if "data" in raw and isinstance(raw["data"], dict):
        train = raw.get("train") or {}
        seq_len = train.get("seq_len") if isinstance(train, dict) else None
        raw = raw["data"]
    base = os.path.dirname(os.path.abspath(path))
    data_overrides = []
    for item in overrides:
        key = item.split("=", 1)[0]
        if key == "train.seq_len":
            seq_len = int(item.split("=", 1)[1])
        elif key.startswith("data."):
            data_overrides.append(item[len("data."):])
        elif "." in key and key.split(".")[0] in ("train", "model", "eval", "checkpoint", "mesh", "optimizer"):
            print(f"note: ignoring override '{item}' (not a data setting)", file=sys.stderr)
        else:
            data_overrides.append(item)
    if data_overrides:
        raw = apply_overrides(raw, data_overrides, DataConfig)
    cfg = from_dict(DataConfig, raw, "data")
    # Relative paths in the YAML are relative to the file when they do not exist from here.
    def fix(p: str) -> str:
        if p and not os.path.isabs(p) and not os.path.exists(p) and os.path.exists(os.path.join(base, p)):
            return os.path.join(base, p)
        return p
    cfg.tokenizer = fix(cfg.tokenizer)
    for s in cfg.sources + cfg.eval_sources:
        s.path = fix(s.path)
    return cfg.validate(), seq_len


def _segments(row_seg):
    t, n = 0, len(row_seg)
    while t < n:
        if row_seg[t] == 0:
            t += 1
            continue
        s = t
        while t < n and row_seg[t] == row_seg[s]:
            t += 1
        yield s, t


def _clip(text: str, max_chars: int) -> str:
    if max_chars and len(text) > max_chars:
        half = max_chars // 2
        return f"{text[:half]}\n   [... {len(text) - max_chars} characters ...]\n{text[-half:]}"
    return text


def show_row(batch, r: int, tok, max_chars: int, out=sys.stdout) -> None:
    seg = batch["segment_ids"][r]
    n_pad = int((seg == 0).sum())
    segs = list(_segments(seg))
    print(f"=== row {r}: {len(segs)} segment(s), {len(seg) - n_pad} tokens, {n_pad} padding", file=out)
    for s, t in segs:
        ids = batch["input_ids"][r, s:t].tolist()
        last = int(batch["targets"][r, t - 1])
        ends = last == tok.eos_id
        print(f"--- segment {int(seg[s])}: positions {int(batch['positions'][r, s])}..{int(batch['positions'][r, t - 1])}"
              f"{', ends its document' if ends else ', document continues in the next row'}", file=out)
        print(_clip(tok.decode(ids + [last]), max_chars), file=out)


def format_stats(st: dict, wall: float, tokens: int) -> str:
    lines = [
        f"tokens/s            {tokens / wall:,.0f}  ({tokens:,} tokens in {wall:.2f}s)" if wall > 0 else "tokens/s  n/a",
        f"fill rate           {st['fill_rate']:.4f}",
        f"documents per row   {st['documents_per_row']:.3f}",
        f"FIM fraction        {st['fim_fraction']:.3f}  (files; SPM share of FIM: {st['spm_fraction']:.3f})",
        f"built               {st['documents_built']} documents, {st['repos_built']} repositories, "
        f"{st['files_built']} files",
    ]
    skipped = st["skipped"]
    lines.append("skipped             " + (", ".join(f"{k}={v}" for k, v in skipped.items()) or "nothing"))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sc_jax.data.inspect", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--config", required=True, help="training YAML (with data:) or a data-only YAML")
    parser.add_argument("overrides", nargs="*", help="key=value (data.* or bare data keys; train.seq_len=N)")
    parser.add_argument("--seq-len", type=int, default=None, help="row length (default: train.seq_len, else 1024)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rows", type=int, default=2, help="rows to decode and print")
    parser.add_argument("--batches", type=int, default=20, help="batches to read for the statistics")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", choices=("train", "eval"), default="train")
    parser.add_argument("--max-chars", type=int, default=1200, help="characters shown per segment (0 = all)")
    args = parser.parse_args(argv)
    from sc_jax.data import make_eval_iterator, make_train_iterator

    it = None
    try:
        cfg, file_seq_len = load_data_config(args.config, args.overrides)
        seq_len = args.seq_len or file_seq_len or 1024
        make = make_train_iterator if args.split == "train" else make_eval_iterator
        t0 = time.perf_counter()
        it = make(cfg, seq_len=seq_len, batch_size=args.batch_size, seed=args.seed)
        setup = time.perf_counter() - t0
        src = "; ".join(s.describe() for s in it.info.sources)
        print(f"sources: {src} (scan {setup:.2f}s)")
        print(f"tokenizer: {it.tokenizer.path} (vocab_size {it.tokenizer.vocab_size}); seq_len {seq_len}, "
              f"batch {args.batch_size}, packing {cfg.packing}, documents {cfg.document}")
        batches, t_first, t0 = 0, None, time.perf_counter()
        tokens_after_first = 0
        for batch in it:
            if t_first is None:
                t_first = time.perf_counter()
                for r in range(min(args.rows, args.batch_size)):
                    show_row(batch, r, it.tokenizer, args.max_chars)
            else:
                tokens_after_first += int((batch["segment_ids"] > 0).sum())
            batches += 1
            if batches >= args.batches:
                break
        wall = time.perf_counter() - (t_first or t0)
        st = it.stats()
        print(f"=== statistics over {batches} batches (first batch after {((t_first or t0) - t0):.2f}s; "
              f"tokens/s counts the batches after it)")
        print(format_stats(st, wall, tokens_after_first))
        return 0
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        if it is not None:
            it.close()


if __name__ == "__main__":
    sys.exit(main())
