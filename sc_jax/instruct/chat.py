"""The ChatML template and the instruction-data records (pure Python, no JAX).

    <|im_start|>system\\n{content}<|im_end|>\\n<|im_start|>user\\n{content}<|im_end|>\\n
    <|im_start|>assistant\\n{content}<|im_end|>\\n

Token ids are looked up by string (`<|im_start|>`, `<|im_end|>`), never hard-coded. Message text is
encoded with `allow_special=False`: a message that contains the string "<|im_end|>" gets ordinary
text tokens, so data can never forge a turn boundary. Each piece (role header, content, end
marker) is encoded on its own, exactly as a generation prompt ending in
`<|im_start|>assistant\\n` is, so training and inference see the same tokens.

Records (one JSON object per line):

    SFT  {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
         (ShareGPT spelling {"conversations": [{"from": "human"|"gpt"|"system", "value": str}]} too)
    DPO  {"prompt": str | [messages], "chosen": str, "rejected": str}
         (a text prompt is one user turn; chosen/rejected are the assistant's answer text)
"""

from __future__ import annotations

import numpy as np

from sc_jax.data.batches import PAIR_SIDES, empty_batch
from sc_jax.tokenizer import IM_END, IM_START, Tokenizer

ROLES = ("system", "user", "assistant")
_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}

# `sc_jax.tokenizer.CHAT_TEMPLATE` is the same layout for Hugging Face `tokenizer_config.json`,
# so `tokenizer.apply_chat_template(messages, add_generation_prompt=True)` matches `render_text`.

# Why a record was skipped (the keys of the iterator's `stats()["skipped"]`).
SKIP_REASONS = ("bad_json", "not_object", "missing_field", "bad_message", "no_assistant", "empty_prompt",
                "empty_answer", "too_long")


class RecordError(ValueError):
    """A malformed record: `reason` is one of SKIP_REASONS, the message says what is wrong."""

    def __init__(self, reason: str, what: str):
        super().__init__(what)
        self.reason = reason


# ----------------------------------------------------------------------------- records


def parse_messages(value, where: str = "messages") -> list[dict]:
    """A validated list of {"role", "content"} (ShareGPT's {"from", "value"} accepted)."""
    if not isinstance(value, list) or not value:
        raise RecordError("missing_field", f"'{where}' must be a non-empty list of messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise RecordError("bad_message", f"{where}[{i}] is not an object")
        role, content = m.get("role"), m.get("content")
        if role is None and "from" in m:
            role, content = _SHAREGPT_ROLES.get(m["from"], m["from"]), m.get("value")
        if role is None:
            raise RecordError("bad_message", f"{where}[{i}] has no 'role'")
        if role not in ROLES:
            raise RecordError("bad_message", f"{where}[{i}] has role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise RecordError("bad_message", f"{where}[{i}] ({role}) has no text 'content'")
        out.append({"role": role, "content": content})
    return out


def parse_chat(obj) -> list[dict]:
    """An SFT record -> its messages (at least one assistant turn, and no empty answer)."""
    if not isinstance(obj, dict):
        raise RecordError("not_object", f"a record must be a JSON object, got {type(obj).__name__}")
    key = "messages" if "messages" in obj else "conversations" if "conversations" in obj else None
    if key is None:
        raise RecordError("missing_field", "no 'messages' field")
    messages = parse_messages(obj[key], key)
    if not any(m["role"] == "assistant" for m in messages):
        raise RecordError("no_assistant", "the conversation has no assistant turn")
    for i, m in enumerate(messages):
        # As in DPO: an empty (or whitespace-only) answer would teach the model to end its turn at
        # once, so the whole record is skipped rather than that one turn.
        if m["role"] == "assistant" and not m["content"].strip():
            raise RecordError("empty_answer", f"{key}[{i}] (assistant) is empty")
    return messages


def parse_pair(obj) -> tuple[list[dict], str, str]:
    """A DPO record -> (prompt messages, chosen answer, rejected answer)."""
    if not isinstance(obj, dict):
        raise RecordError("not_object", f"a record must be a JSON object, got {type(obj).__name__}")
    for key in ("prompt", "chosen", "rejected"):
        if key not in obj:
            raise RecordError("missing_field", f"no '{key}' field")
    prompt = obj["prompt"]
    if isinstance(prompt, str):
        if not prompt.strip():
            raise RecordError("empty_prompt", "'prompt' is empty")
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list):
        messages = parse_messages(prompt, "prompt")
    else:
        raise RecordError("missing_field", "'prompt' must be a string or a list of messages")
    answers = []
    for key in ("chosen", "rejected"):
        a = obj[key]
        if not isinstance(a, str):
            raise RecordError("missing_field", f"'{key}' must be the answer text (a string)")
        if not a.strip():
            raise RecordError("empty_answer", f"'{key}' is empty")
        answers.append(a)
    return messages, answers[0], answers[1]


# ----------------------------------------------------------------------------- template


def render_text(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The template as a string (what `CHAT_TEMPLATE` renders)."""
    text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")


class ChatFormat:
    """Token-level ChatML for one tokenizer."""

    def __init__(self, tok: Tokenizer):
        tok.require(IM_START, IM_END)
        self.tok = tok
        self.im_start, self.im_end = tok.token_id(IM_START), tok.token_id(IM_END)
        self.newline = tok.encode("\n", allow_special=False)
        self._headers = {role: [self.im_start] + tok.encode(f"{role}\n", allow_special=False) for role in ROLES}

    def header(self, role: str) -> list[int]:
        return self._headers[role]

    def encode_chat(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        """(ids, assistant) where assistant[i] = 1 for the tokens of assistant contents and the
        `<|im_end|>` closing each assistant turn, 0 elsewhere (headers, other roles, newlines)."""
        ids: list[int] = []
        mask: list[int] = []
        for m in messages:
            head, body = self._headers[m["role"]], self.tok.encode(m["content"], allow_special=False)
            a = int(m["role"] == "assistant")
            ids += head + body + [self.im_end] + self.newline
            mask += [0] * len(head) + [a] * (len(body) + 1) + [0] * len(self.newline)
        return ids, mask

    def encode_prompt(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        ids = self.encode_chat(messages)[0]
        return ids + (self._headers["assistant"] if add_generation_prompt else [])

    def encode_answer(self, text: str) -> list[int]:
        """An assistant answer as the model must write it: content then `<|im_end|>`."""
        return self.tok.encode(text, allow_special=False) + [self.im_end]


# ----------------------------------------------------------------------------- examples


def sft_example(fmt: ChatFormat, messages: list[dict], seq_len: int) -> tuple[dict | None, str | None]:
    """A conversation -> ({input_ids, targets, loss_mask} of length <= seq_len, note).

    note: None, "truncated" (longer than seq_len: the end was cut) or "too_long" (nothing to learn
    from was left after the cut: the example is None)."""
    ids, assistant = fmt.encode_chat(messages)
    inputs, targets, mask = ids[:-1], ids[1:], assistant[1:]
    note = None
    if len(inputs) > seq_len:
        inputs, targets, mask, note = inputs[:seq_len], targets[:seq_len], mask[:seq_len], "truncated"
        if not any(mask):
            return None, "too_long"
    return {"input_ids": np.asarray(inputs, np.int32), "targets": np.asarray(targets, np.int32),
            "loss_mask": np.asarray(mask, np.float32)}, note


def dpo_example(fmt: ChatFormat, prompt: list[dict], chosen: str, rejected: str,
                seq_len: int) -> tuple[dict | None, str | None]:
    """A preference pair -> (one padded [seq_len] row per side, note).

    Keys `chosen_{input_ids,targets,segment_ids,positions,loss_mask}` and the same for `rejected_`;
    loss_mask = 1 on the answer tokens (content + `<|im_end|>`). A pair longer than seq_len loses
    the start of its prompt (the same tokens on both sides, note "truncated"); when even the answer
    with one prompt token does not fit, it is dropped (None, "too_long")."""

    p = fmt.encode_prompt(prompt)
    answers = dict(zip(PAIR_SIDES, (fmt.encode_answer(chosen), fmt.encode_answer(rejected))))
    over = len(p) + max(len(a) for a in answers.values()) - 1 - seq_len
    note = None
    if over > 0:
        if over > len(p) - 1:
            return None, "too_long"
        p, note = p[over:], "truncated"
    out = {}
    for side, a in answers.items():
        ids = p + a
        n = len(ids) - 1
        row = empty_batch(1, seq_len)
        row["input_ids"][0, :n], row["targets"][0, :n] = ids[:-1], ids[1:]
        row["segment_ids"][0, :n], row["positions"][0, :n] = 1, np.arange(n)
        row["loss_mask"][0, len(p) - 1:n] = 1
        out.update({f"{side}_{k}": v[0] for k, v in row.items()})
    return out, note
