"""Evol-Instruct (WizardLM; WizardCoder's code variants): seed prompts rewritten by a model, round
after round, into harder ones (in depth) or new ones (in breadth), each answered by the same
model, the failed evolutions eliminated. What `python -m sc_jax.instruct.evolve` runs.

    round r, for every seed in order: its current prompt (the seed's, or its last evolution that
    survived) -> an operation drawn from (seed, seed index, r) -> the evolution prompt (templates
    below) -> the model writes the new prompt -> the model answers it -> eliminated, or kept
    (SFT record with lineage: seed id, round, operation) and the seed's current prompt from then

Elimination (`eliminate`), as the method lists it: the new prompt copies the template's words
("#Given Prompt#", "rewritten prompt", ...); it brings no new information (its words are all the
old prompt's); it is too short (fewer than `min_words` words), or the answer is (nothing but
punctuation and stop words); the answer apologises ("sorry", "as an AI", ...) in few words.

Resumable: every chunk of `batch_size` prompts is generated with seeds drawn from (seed, round,
chunk), so the same chunk always gives the same text, and appended to a progress file (one JSON
line per chunk, fsync'd). A rerun after a kill reads the progress, drops a torn last line, and
goes on from the first chunk not done: the output is the same as an uninterrupted run's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re

import numpy as np

from sc_jax.config import ConfigError
from sc_jax.fileio import atomic_file

# ----------------------------------------------------------------------------- templates

# In depth: the prompt made harder, one method at a time. Written for this project from the
# method's description (WizardLM section 3.1, WizardCoder section 3.1).
DEPTH_TEMPLATE = """You rewrite prompts. Make the prompt below harder to answer, for the strongest AI assistants, \
while keeping it sensible: a person must still understand it and be able to answer it. Keep any code, \
tables or input it contains. Method: {method}
Add no more than 10 to 20 words. Write only the new prompt, without naming these instructions.

#Given Prompt#:
{prompt}

#Rewritten Prompt#:
"""

DEPTH_METHODS = {
    "constraints": "add one more constraint or requirement the answer must meet.",
    "deepen": "where the prompt asks about something, ask about it in more depth and breadth.",
    "concretise": "replace a general idea in the prompt by a more specific one.",
    "reasoning": "if the prompt can be solved in a few simple steps, ask explicitly for reasoning in several steps.",
    # WizardCoder's code variants
    "misleading_code": "add a piece of erroneous code as a reference, to mislead.",
    "complexity": "demand a higher time or space complexity, but not too often.",
}

# In breadth: a new prompt of the same domain, rarer (WizardLM's "mutation").
BREADTH_TEMPLATE = """You create prompts. Taking the prompt below as inspiration, write a brand-new prompt of the \
same domain and of similar length and difficulty, but about a rarer topic. A person must be able to \
understand and answer it. Write only the new prompt, without naming these instructions.

#Given Prompt#:
{prompt}

#Created Prompt#:
"""

OPERATIONS = tuple(DEPTH_METHODS) + ("breadth",)

# Words of the templates that must not turn up in an evolved prompt.
TEMPLATE_WORDS = ("#given prompt#", "#rewritten prompt#", "#created prompt#", "given prompt", "rewritten prompt",
                  "created prompt", "you rewrite prompts", "you create prompts", "the prompt below")
APOLOGIES = ("sorry", "i apologize", "i apologise", "as an ai", "i cannot", "i can't", "i am unable", "i'm unable")
APOLOGY_MAX_WORDS = 80  # an apology in fewer words than this is a refusal, not an answer
STOP_WORDS = frozenset("""a an and are as at be by for from has have i in is it its of on or that the this to was were
will with you your we they he she not no yes do does can""".split())


def evolution_prompt(op: str, prompt: str) -> str:
    if op == "breadth":
        return BREADTH_TEMPLATE.format(prompt=prompt)
    return DEPTH_TEMPLATE.format(method=DEPTH_METHODS[op], prompt=prompt)


# ----------------------------------------------------------------------------- elimination


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9_]+", text.lower())


def eliminate(old: str, new: str, answer: str, *, min_words: int = 3) -> str | None:
    """Why an evolution fails (None: it is kept): copied_template, no_new_information, too_short,
    empty_answer, apology."""
    low = new.lower()
    if any(w in low for w in TEMPLATE_WORDS):
        return "copied_template"
    words = _words(new)
    if len(words) < min_words:
        return "too_short"
    if set(words) <= set(_words(old)):
        return "no_new_information"
    content = [w for w in _words(answer) if w not in STOP_WORDS]
    if not content:
        return "empty_answer"
    a = answer.lower()
    if any(x in a for x in APOLOGIES) and len(_words(answer)) < APOLOGY_MAX_WORDS:
        return "apology"
    return None


def clean_generation(text: str) -> str:
    """A generated prompt or answer without a template marker echoed at its start, trimmed."""
    text = text.strip()
    for marker in ("#Rewritten Prompt#:", "#Created Prompt#:"):
        if text.startswith(marker):
            text = text[len(marker):].strip()
    return text


# ----------------------------------------------------------------------------- seeds


@dataclasses.dataclass(frozen=True)
class Seed:
    id: str
    prompt: str


def _seed_prompt(obj, where: str) -> str:
    """CodeAlpaca {instruction, input, output}: instruction and input; ours {messages}: the first user turn."""
    if isinstance(obj, dict) and isinstance(obj.get("instruction"), str):
        extra = obj.get("input") or ""
        return obj["instruction"].strip() + (f"\n{extra.strip()}" if isinstance(extra, str) and extra.strip() else "")
    if isinstance(obj, dict) and ("messages" in obj or "conversations" in obj):
        from sc_jax.instruct.chat import RecordError, parse_messages

        try:
            msgs = parse_messages(obj.get("messages", obj.get("conversations")))
        except RecordError as e:
            raise ConfigError(f"{where}: {e}") from None
        user = next((m["content"] for m in msgs if m["role"] == "user"), None)
        if user is not None:
            return user.strip()
    raise ConfigError(f"{where}: a seed is a CodeAlpaca record {{instruction, input, output}} or an SFT record "
                      "{messages: [...]} with a user turn")


def read_seeds(path: str, limit: int = 0) -> list[Seed]:
    """The seeds of a CodeAlpaca JSON file (a list of records), or of JSON lines (CodeAlpaca's
    records or our SFT records). Ids: the record's "id" when it has one, else FILE:N (N = its
    position, from 1). Empty prompts are skipped."""
    if not os.path.isfile(path):
        raise ConfigError(f"seed file '{path}' does not exist: give a CodeAlpaca JSON file or an SFT JSONL file")
    with open(path, "rb") as f:
        data = f.read()
    name = os.path.basename(path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"seed file '{path}' is not UTF-8 text") from None
    if text.lstrip().startswith("["):
        try:
            records = [(f"{path}: record {i}", r) for i, r in enumerate(json.loads(text), 1)]
        except ValueError as e:
            raise ConfigError(f"seed file '{path}' is not valid JSON ({e})") from None
    else:
        records = []
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append((f"{path}:{i}", json.loads(line)))
                except ValueError as e:
                    raise ConfigError(f"{path}:{i}: not valid JSON ({e})") from None
    seeds = []
    for n, (where, obj) in enumerate(records, 1):
        prompt = _seed_prompt(obj, where)
        if prompt:
            seeds.append(Seed(str(obj.get("id", f"{name}:{n}")), prompt))
        if limit and len(seeds) >= limit:
            break
    if not seeds:
        raise ConfigError(f"seed file '{path}' holds no seed prompts")
    return seeds


def choose_operation(seed: int, seed_index: int, round_: int, ops: tuple[str, ...]) -> str:
    """The operation of one seed in one round: drawn from (seed, seed index, round) alone."""
    return ops[int(np.random.default_rng([int(seed), int(seed_index), int(round_)]).integers(len(ops)))]


def chunk_seed(seed: int, round_: int, chunk: int, phase: int) -> int:
    """The sampling seed of one chunk's generation (phase 0: the prompts, 1: the answers)."""
    return int(np.random.SeedSequence([int(seed), int(round_), int(chunk), int(phase)]).generate_state(1)[0] >> 1)


# ----------------------------------------------------------------------------- progress


class Progress:
    """The append-only progress file: a header line (the settings, checked on resume) then one
    line per finished chunk {"round", "chunk", "items": [...]}, each flushed and fsync'd."""

    def __init__(self, path: str, header: dict):
        self.path, self.header = path, header
        self.done: dict[tuple[int, int], list[dict]] = {}
        if os.path.exists(path) and os.path.getsize(path) > 0:
            self._load()
        else:  # the header appears whole or not at all (an empty file, from older code, counts as none)
            with atomic_file(path, force=True) as tmp, open(tmp, "w", encoding="utf-8") as f:
                f.write(json.dumps({"header": header}) + "\n")
                f.flush()
                os.fsync(f.fileno())

    @staticmethod
    def saved_header(path: str) -> dict | None:
        """The header of an existing progress file (None: there is none yet, or it is unreadable)."""
        try:
            with open(path, encoding="utf-8") as f:
                header = json.loads(f.readline()).get("header")
        except (OSError, ValueError, AttributeError):
            return None
        return header if isinstance(header, dict) else None

    def _load(self) -> None:
        with open(self.path, "rb") as f:
            data = f.read()
        good, lines = 0, data.split(b"\n")
        for k, line in enumerate(lines[:-1]):  # the part after the last newline is torn (or empty)
            try:
                obj = json.loads(line)
            except ValueError:
                break
            if k == 0:
                if obj.get("header") != self.header:
                    diff = sorted(key for key in set(obj.get("header", {})) | set(self.header)
                                  if obj.get("header", {}).get(key) != self.header.get(key))
                    raise ConfigError(f"progress file {self.path} was made with other settings ({', '.join(diff)}): "
                                      "rerun with those, or delete it to start over")
            else:
                self.done[(obj["round"], obj["chunk"])] = obj["items"]
            good += len(line) + 1
        if good < len(data):  # a line cut by a kill: dropped, its chunk is redone
            with open(self.path, "r+b") as f:
                f.truncate(good)
        if good == 0:
            raise ConfigError(f"progress file {self.path} has no header: delete it to start over")

    def add(self, round_: int, chunk: int, items: list[dict]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"round": round_, "chunk": chunk, "items": items}, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done[(round_, chunk)] = items


def settings_digest(path: str) -> str:
    """What a seed file holds (its bytes' hash), for the progress file's header."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- evolving


@dataclasses.dataclass(frozen=True)
class Settings:
    rounds: int = 2
    ops: tuple[str, ...] = OPERATIONS
    batch_size: int = 16  # prompts per chunk: generated together, saved together
    prompt_tokens: int = 128  # new tokens for an evolved prompt
    answer_tokens: int = 256  # new tokens for its answer
    temperature: float = 0.7
    top_p: float = 0.95
    seed: int = 0
    min_words: int = 3


class Prompter:
    """Token prompts for the generator: ChatML (one user turn) when the tokenizer has its
    tokens, else the plain text followed by a newline."""

    def __init__(self, gen):
        from sc_jax.instruct.chat import ChatFormat
        from sc_jax.tokenizer import IM_END, IM_START

        self.gen, tok = gen, gen._tok()
        self.chat = ChatFormat(tok) if all(t in tok.special for t in (IM_START, IM_END)) else None
        self.tok = tok
        self.format = "chat" if self.chat else "plain"
        eos = [] if gen.eos_id is None else [gen.eos_id]
        self.stop_ids = sorted(set(eos + ([self.chat.im_end] if self.chat else [])))

    def ids(self, text: str) -> list[int]:
        if self.chat:
            return self.chat.encode_prompt([{"role": "user", "content": text}])
        return self.tok.encode(text + "\n", allow_special=False)

    def generate(self, texts: list[str], max_new: int, settings: Settings, seed: int) -> list[str | None]:
        """The model's text after each prompt (None: the prompt does not fit the context)."""
        room = self.gen.prompt_room(max_new)
        ids = [self.ids(t) for t in texts]
        fits = [i for i, x in enumerate(ids) if len(x) <= room]
        out: list[str | None] = [None] * len(texts)
        if fits:
            stop = [] if self.chat else ["\n#"]
            made = self.gen.generate_text([ids[i] for i in fits], self.stop_ids, stop, max_new, settings.temperature,
                                          settings.top_p, 0, seed)
            for i, text in zip(fits, made):
                out[i] = clean_generation(text)
        return out


def evolve_chunk(prompter: Prompter, settings: Settings, round_: int, chunk: int,
                 items: list[tuple[int, Seed, str, int]]) -> list[dict]:
    """One chunk of a round: items (seed index, seed, current prompt, its round) -> result records."""
    ops = [choose_operation(settings.seed, i, round_, settings.ops) for i, _, _, _ in items]
    new = prompter.generate([evolution_prompt(op, cur) for op, (_, _, cur, _) in zip(ops, items)],
                            settings.prompt_tokens, settings, chunk_seed(settings.seed, round_, chunk, 0))
    ask = [k for k, p in enumerate(new) if p]
    answered = prompter.generate([new[k] for k in ask], settings.answer_tokens, settings,
                                 chunk_seed(settings.seed, round_, chunk, 1)) if ask else []
    answers: list[str | None] = [None] * len(items)
    for k, a in zip(ask, answered):
        answers[k] = a
    out = []
    for (i, seed, cur, parent_round), op, p, a in zip(items, ops, new, answers):
        if p is None:
            why = "too_long"
        elif a is None:
            why = "too_long" if p else "too_short"
        else:
            why = eliminate(cur, p, a, min_words=settings.min_words)
        out.append({"seed_index": i, "seed_id": seed.id, "round": round_, "operation": op,
                    "parent_round": parent_round, "prompt": p, "answer": a, "eliminated": why})
    return out


def run_rounds(prompter: Prompter, seeds: list[Seed], settings: Settings, progress: Progress, report=None,
               after_chunk=None) -> list[dict]:
    """Every round over every seed, chunk by chunk (done chunks read back from `progress`);
    returns every result record, in (round, seed) order."""
    current = [(s.prompt, 0) for s in seeds]  # per seed: its prompt now, and the round that made it
    results = []
    B = settings.batch_size
    for r in range(1, settings.rounds + 1):
        for k, start in enumerate(range(0, len(seeds), B)):
            items = [(i, seeds[i], *current[i]) for i in range(start, min(start + B, len(seeds)))]
            done = progress.done.get((r, k))
            if done is None:
                done = evolve_chunk(prompter, settings, r, k, items)
                progress.add(r, k, done)
                if after_chunk is not None:
                    after_chunk(r, k)
            if report is not None:
                report(r, k, done)
            for rec in done:
                if rec["eliminated"] is None:
                    current[rec["seed_index"]] = (rec["prompt"], r)
            results.extend(done)
    return results


def sft_records(results: list[dict]) -> list[dict]:
    """The kept evolutions as SFT records, with their lineage."""
    return [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["answer"]}],
             "lineage": {"seed_id": r["seed_id"], "round": r["round"], "operation": r["operation"],
                         "parent_round": r["parent_round"]}}
            for r in results if r["eliminated"] is None]
