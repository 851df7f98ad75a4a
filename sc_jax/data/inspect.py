"""Look at what the data pipeline feeds the model.

    python -m sc_jax.data.inspect --config experiments/configs/quickstart.yaml [data.fim_rate=0.9 ...]

(quickstart.yaml reads what `python experiments/quickstart.py` makes: its tokenizer and dataset.)
--config is a training YAML with a top-level `data:` section (seq_len then comes from `train.seq_len`
unless --seq-len is given) or a YAML holding only data keys. Prints a few packed rows decoded with
the special tokens visible, then statistics over --batches batches: tokens/s, fill rate, FIM
fraction, documents per row, the files skipped and why, and per source the target share of the
mixture (data.weight_unit: tokens or documents) and the realised share of tokens.
"""

from __future__ import annotations

import os
import sys
import time

import yaml

from sc_jax.config import ConfigError, apply_overrides, from_dict
from sc_jax.cli import Parser, first_line, whole_number


def _read_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        what = "is a directory" if os.path.isdir(path) else "does not exist"
        raise ConfigError(f"config file '{path}' {what}: give a YAML file, e.g. experiments/configs/quickstart.yaml")
    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"config file '{path}' cannot be read as YAML{_yaml_problem(e)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping at the top level")
    return raw


def _yaml_problem(e: Exception) -> str:
    """' (line N): what' for a YAML syntax error, ': the error' for others."""
    mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
    if mark is not None and problem:
        return f" (line {mark.line + 1}): {problem}"
    return f": {first_line(e)}"


def _seq_len_value(value, where: str) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where} = {value!r} must be a whole number (the row length, e.g. 1024)") from None
    if n < 2:
        raise ConfigError(f"{where} = {n} must be at least 2")
    return n


def load_data_config(path: str, overrides: list[str] = ()):
    """(DataConfig, seq_len or None) from a training YAML (`data:` section) or a data-only YAML."""
    from sc_jax.data.config import DataConfig

    raw = _read_yaml(path)
    seq_len = None
    if "data" in raw and isinstance(raw["data"], dict):
        train = raw.get("train") or {}
        seq_len = train.get("seq_len") if isinstance(train, dict) else None
        if seq_len is not None:
            seq_len = _seq_len_value(seq_len, f"train.seq_len in {path}")
        raw = raw["data"]
    base = os.path.dirname(os.path.abspath(path))
    data_overrides = []
    for item in overrides:
        key = item.split("=", 1)[0]
        if key == "train.seq_len":
            seq_len = _seq_len_value(item.split("=", 1)[1], "train.seq_len")
        elif key.startswith("data."):
            data_overrides.append(item[len("data."):])
        elif "." in key and key.split(".")[0] in ("train", "model", "eval", "checkpoint", "mesh", "optimizer"):
            print(f"note: ignoring override '{item}' (not a data setting)", file=sys.stderr)
        else:
            data_overrides.append(item)
    if data_overrides:
        try:
            raw = apply_overrides(raw, data_overrides, DataConfig)
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or first_line(e)
            raise ConfigError(f"an override's value is not valid YAML ({problem}); quote it in the shell, "
                              "e.g. data.sources='[{kind: dir, path: DIR}]'") from None
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


def show_row(batch, r: int, tok, max_chars: int, out=None) -> None:
    out = out or sys.stdout  # looked up per call: a default would keep the stdout of import time
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
    lines += format_mixture(st.get("mixture") or [])
    return "\n".join(lines)


def format_mixture(rows: list[dict]) -> list[str]:
    """Per source: the target share (of tokens or documents, per data.weight_unit) and the realised
    share of the tokens built so far."""
    if len(rows) < 2:
        return []
    unit = rows[0]["unit"]
    out = [f"mixture             target share of {unit} -> realised share of tokens"]
    for r in rows:
        out.append(f"  {r['source']:<30} {r['target']:7.2%} -> {r['realised']:7.2%}  ({r['tokens']:,} tokens)")
    return out


def _parser() -> Parser:
    doc = __doc__.split("\n\n", 1)
    parser = Parser(prog="python -m sc_jax.data.inspect", description=doc[0], epilog=doc[1])
    parser.add_argument("--config", required=True, metavar="FILE",
                        help="training YAML (with data:) or a data-only YAML")
    parser.add_argument("overrides", nargs="*", help="key=value (data.* or bare data keys; train.seq_len=N)")
    parser.add_argument("--seq-len", type=whole_number(2), default=None, metavar="N",
                        help="row length (default: train.seq_len, else 1024)")
    parser.add_argument("--batch-size", type=whole_number(1), default=4, metavar="N", help="rows per batch")
    parser.add_argument("--rows", type=whole_number(0), default=2, metavar="N", help="rows to decode and print")
    parser.add_argument("--batches", type=whole_number(1), default=20, metavar="N",
                        help="batches to read for the statistics")
    parser.add_argument("--seed", type=whole_number(0), default=0, metavar="N", help="shuffling and FIM seed")
    parser.add_argument("--split", choices=("train", "eval"), default="train",
                        help="train: the training stream; eval: one pass over the held-out data")
    parser.add_argument("--max-chars", type=whole_number(0), default=1200, metavar="N",
                        help="characters shown per segment (0 = all)")
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    it = None
    try:
        cfg, file_seq_len = load_data_config(args.config, args.overrides)
        from sc_jax.data import make_eval_iterator, make_train_iterator  # grain: seconds, after the config is read
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
    except OSError as e:  # a source that cannot be listed or read at all
        print(f"error: {first_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        if it is not None:
            it.close()


if __name__ == "__main__":
    sys.exit(main())
