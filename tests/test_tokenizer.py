"""Tokenizer: special tokens by string, exact round trips, the train CLI."""

import json
import os
import pickle

import pytest
import tokenizers
from data_fixtures import STDLIB, run_cli, tok, tokenizer_path  # noqa: F401  (fixtures)
from tokenizers import models, pre_tokenizers

from sc_jax.tokenizer import (ALL_SPECIAL_TOKENS, CHAT_TOKENS, EOS, FILE_SEP, FIM_PREFIX, PRETRAIN_TOKENS, REPO_NAME,
                              Tokenizer, TokenizerError)

WEIRD = "def f(x):\r\n\treturn x  # é 中文 🙂 \x1b[0m <fim_prefix> <|endoftext|>\n\n    \u00a0\ufeff"


def test_trained_tokenizer_has_all_special_tokens(tok):
    assert set(tok.special) == set(ALL_SPECIAL_TOKENS)
    assert len(set(tok.special.values())) == len(ALL_SPECIAL_TOKENS)
    tok.require(*PRETRAIN_TOKENS, *CHAT_TOKENS)
    assert tok.eos_id == tok.token_id(EOS) == tok.special[EOS]
    assert tok.vocab_size == 1024
    assert max(tok.special.values()) < tok.vocab_size


def test_round_trip_is_exact_and_specials_stay_text(tok):
    plain = tok.encode(WEIRD, allow_special=False)
    assert tok.decode(plain) == WEIRD
    assert not set(plain) & set(tok.special.values())  # special-token strings in data stay text
    parsed = tok.encode(WEIRD)  # default: HF behaviour, special-token strings become the tokens
    assert tok.special[FIM_PREFIX] in parsed and tok.special[EOS] in parsed
    assert tok.decode(parsed) == WEIRD
    assert tok.decode(parsed, skip_special_tokens=True) == WEIRD.replace("<fim_prefix>", "").replace("<|endoftext|>", "")
    assert tok.encode_batch(["a b", WEIRD]) == [tok.encode("a b", allow_special=False), plain]


def test_round_trip_on_real_code(tok):
    for name in ("json/decoder.py", "html/parser.py", "textwrap.py"):
        with open(os.path.join(STDLIB, name), encoding="utf-8") as f:
            text = f.read()
        assert tok.decode(tok.encode(text, allow_special=False)) == text


def _bare_tokenizer(path, added=()):
    t = tokenizers.Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.train_from_iterator(["hello world"] * 10, tokenizers.trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                                                              special_tokens=list(added)))
    t.save(str(path))
    return str(path)


def test_require_lists_every_missing_token_in_one_error(tmp_path):
    path = _bare_tokenizer(tmp_path / "tokenizer.json", added=[EOS, "<reponame>"])
    t = Tokenizer.from_file(str(tmp_path))  # a directory holding tokenizer.json works too
    assert set(t.special) == {EOS}
    with pytest.raises(TokenizerError) as e:
        t.require(*PRETRAIN_TOKENS)
    msg = str(e.value)
    for name in PRETRAIN_TOKENS[1:]:
        assert name in msg
    assert path in msg and "python -m sc_jax.tokenizer train" in msg
    with pytest.raises(TokenizerError, match="<fim_middle>"):
        t.token_id("<fim_middle>")
    # Differently spelled tokens are mapped by name.
    t2 = Tokenizer.from_file(path, aliases={REPO_NAME: "<reponame>"})
    assert t2.special[REPO_NAME] == t2.token_id("<reponame>") == t2.token_id(REPO_NAME)
    with pytest.raises(TokenizerError) as e:
        t2.require(EOS, REPO_NAME, FILE_SEP)
    assert FILE_SEP in str(e.value) and REPO_NAME not in str(e.value).split("lacks")[1].split(".")[0]


def test_from_file_errors(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        Tokenizer.from_file(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(TokenizerError, match="cannot read tokenizer"):
        Tokenizer.from_file(str(bad))
    with pytest.raises(TokenizerError, match="no tokenizer"):
        Tokenizer.from_file("")


def test_pickle_keeps_everything(tok):
    t2 = pickle.loads(pickle.dumps(tok))
    assert t2.special == tok.special and t2.vocab_size == tok.vocab_size
    assert t2.encode(WEIRD, allow_special=False) == tok.encode(WEIRD, allow_special=False)


def test_train_cli(tmp_path):
    out = tmp_path / "sub" / "tokenizer.json"
    proc = run_cli("-m", "sc_jax.tokenizer", "train", "--corpus", os.path.join(STDLIB, "json"), "--vocab-size", "600",
                   "--out", str(out))
    assert "wrote" in proc.stdout and "vocab_size=600" in proc.stdout
    t = Tokenizer.from_file(str(out))
    assert list(t.special) == list(ALL_SPECIAL_TOKENS)
    assert [t.special[s] for s in ALL_SPECIAL_TOKENS] == list(range(len(ALL_SPECIAL_TOKENS)))
    info = run_cli("-m", "sc_jax.tokenizer", "info", str(out))
    assert json.loads(info.stdout)["vocab_size"] == 600
    assert "--vocab-size" in run_cli("-m", "sc_jax.tokenizer", "train", "--help").stdout


@pytest.mark.parametrize("args, needle", [
    (["--corpus", "/no/such/dir", "--vocab-size", "600"], "does not exist"),
    (["--corpus", STDLIB + "/json", "--vocab-size", "100"], "too small"),
])
def test_train_cli_errors_are_one_line(tmp_path, args, needle):
    proc = run_cli("-m", "sc_jax.tokenizer", "train", *args, "--out", str(tmp_path / "t.json"), "--quiet", check_rc=2)
    assert needle in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
