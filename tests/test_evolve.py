"""Evol-Instruct (`python -m sc_jax.instruct.evolve`): the elimination rules on crafted outputs,
the seed formats, the progress file; end to end with the quick start's model architecture
(experiments/configs/quickstart.yaml's model, trained here for a few SFT steps: the quick start's
700-step run takes a quarter of an hour) on 50 CodeAlpaca seeds for 2 rounds, killed with -9
mid-round and rerun to the same output as an uninterrupted run, and that output trained on with
train.task=sft as it is."""

import json
import math
import os
import signal
import subprocess
import sys

import pytest

from cli_harness import REPO, BadInput, run_bad_input
from data_fixtures import STDLIB
from sc_jax.config import ConfigError
from sc_jax.instruct import evolution as ev
from sc_jax.tokenizer import iter_corpus_texts, train_tokenizer

QUICKSTART = os.path.join(REPO, "experiments", "configs", "quickstart.yaml")

# ----------------------------------------------------------------------------- elimination

SEED = "Write a function that returns the sum of a list of numbers."
KEPT_PROMPT = "Write a function that returns the sum of a list of numbers, skipping negative values, in O(n) time."
ANSWER = "def total(xs):\n    return sum(x for x in xs if x >= 0)"


@pytest.mark.parametrize("new, answer, why", [
    (KEPT_PROMPT, ANSWER, None),
    ("#Rewritten Prompt#: " + KEPT_PROMPT, ANSWER, "copied_template"),
    ("Here is the rewritten prompt: " + KEPT_PROMPT, ANSWER, "copied_template"),
    ("Based on the given prompt, write a faster sum.", ANSWER, "copied_template"),
    ("#Created Prompt#\nParse a CSV file.", ANSWER, "copied_template"),
    (SEED, ANSWER, "no_new_information"),
    ("Write a function that returns the sum of a list of numbers.  ", ANSWER, "no_new_information"),
    ("returns the sum: a function, write that!", ANSWER, "no_new_information"),  # the same words, reordered
    ("Sum it.", ANSWER, "too_short"),
    ("", ANSWER, "too_short"),
    (KEPT_PROMPT, "", "empty_answer"),
    (KEPT_PROMPT, "... the, and it is; a to of!", "empty_answer"),  # punctuation and stop words only
    (KEPT_PROMPT, "I'm sorry, but I cannot help with that.", "apology"),
    (KEPT_PROMPT, "As an AI language model I cannot run code.", "apology"),
    (KEPT_PROMPT, "Sorry for the long answer. " + "def total(xs): return sum(xs) " * 20, None),  # long: an answer
])
def test_elimination_rules(new, answer, why):
    assert ev.eliminate(SEED, new, answer, min_words=3) == why


def test_generations_lose_an_echoed_marker():
    assert ev.clean_generation("  #Rewritten Prompt#: Do X with Y.\n") == "Do X with Y."
    assert ev.clean_generation("#Created Prompt#:\nParse a CSV.") == "Parse a CSV."


def test_templates_name_their_method_and_prompt():
    for op in ev.OPERATIONS:
        text = ev.evolution_prompt(op, "Reverse a string.")
        assert "Reverse a string." in text
        if op != "breadth":
            assert ev.DEPTH_METHODS[op] in text and text.endswith("#Rewritten Prompt#:\n")
        else:
            assert text.endswith("#Created Prompt#:\n")
    assert {"misleading_code", "complexity"} <= set(ev.OPERATIONS)  # WizardCoder's code variants


def test_operations_are_drawn_per_seed_and_round():
    picks = [ev.choose_operation(0, i, r, ev.OPERATIONS) for r in (1, 2) for i in range(200)]
    assert picks == [ev.choose_operation(0, i, r, ev.OPERATIONS) for r in (1, 2) for i in range(200)]
    assert set(picks) == set(ev.OPERATIONS)
    assert picks[:200] != picks[200:]  # rounds differ


# ----------------------------------------------------------------------------- seeds and progress


def codealpaca(n: int) -> list[dict]:
    """n CodeAlpaca-style seeds: {instruction, input, output}, some with an input."""
    tasks = ["reverse a string", "sum a list of numbers", "find the largest element in a list",
             "check whether a number is prime", "count the vowels in a string", "merge two sorted lists",
             "remove duplicates from a list", "compute the factorial of n", "convert Celsius to Fahrenheit",
             "flatten a nested list"]
    langs = ["Python", "JavaScript", "Java", "C", "Go"]
    out = []
    for i in range(n):
        task, lang = tasks[i % len(tasks)], langs[(i // len(tasks)) % len(langs)]
        out.append({"instruction": f"Write a {lang} function to {task}.",
                    "input": f"[{i}, {i + 1}, {i + 2}]" if i % 3 == 0 else "",
                    "output": f"// {lang} solution {i}"})
    return out


def test_seed_files_in_both_layouts(tmp_path):
    alpaca = tmp_path / "code_alpaca.json"
    alpaca.write_text(json.dumps(codealpaca(4)))
    seeds = ev.read_seeds(str(alpaca))
    assert [s.id for s in seeds] == [f"code_alpaca.json:{i}" for i in range(1, 5)]
    assert seeds[0].prompt == "Write a Python function to reverse a string.\n[0, 1, 2]"
    sft = tmp_path / "sft.jsonl"
    sft.write_text("\n".join(json.dumps(r) for r in [
        {"id": "a7", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Q1 "},
                                  {"role": "assistant", "content": "A1"}]},
        {"conversations": [{"from": "human", "value": "Q2"}, {"from": "gpt", "value": "A2"}]}]) + "\n")
    assert ev.read_seeds(str(sft)) == [ev.Seed("a7", "Q1"), ev.Seed("sft.jsonl:2", "Q2")]
    assert len(ev.read_seeds(str(alpaca), limit=2)) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no prompt"}\n')
    with pytest.raises(ConfigError, match="bad.jsonl:1: a seed is a CodeAlpaca record"):
        ev.read_seeds(str(bad))


def test_progress_drops_a_torn_line_and_refuses_other_settings(tmp_path):
    path = str(tmp_path / "p.jsonl")
    p = ev.Progress(path, {"seed": 0})
    p.add(1, 0, [{"x": 1}])
    p.add(1, 1, [{"x": 2}])
    with open(path, "rb") as f:
        whole = f.read()
    with open(path, "wb") as f:  # killed while writing chunk 1's line
        f.write(whole[:-5])
    again = ev.Progress(path, {"seed": 0})
    assert again.done == {(1, 0): [{"x": 1}]}
    with open(path, "rb") as f:
        assert f.read() == whole[:whole.index(b"\n", whole.index(b'"chunk": 0')) + 1]
    with pytest.raises(ConfigError, match=r"other settings \(seed\)"):
        ev.Progress(path, {"seed": 1})


def test_a_kill_while_writing_the_header_leaves_no_progress_file(tmp_path, monkeypatch):
    path = tmp_path / "p.jsonl"

    def killed(fd):
        raise KeyboardInterrupt  # stands for a kill between opening the file and its fsync

    with monkeypatch.context() as m:
        m.setattr(ev.os, "fsync", killed)
        with pytest.raises(KeyboardInterrupt):
            ev.Progress(str(path), {"seed": 0})
    assert os.listdir(tmp_path) == []  # neither the file nor its temporary: the rerun starts afresh
    path.write_bytes(b"")  # an empty file, as older code could leave it, counts as none
    ev.Progress(str(path), {"seed": 0}).add(1, 0, [{"x": 1}])
    assert ev.Progress(str(path), {"seed": 0}).done == {(1, 0): [{"x": 1}]}


def test_the_progress_file_names_the_step_and_older_ones_stay_readable(tmp_path):
    from sc_jax.instruct.evolve import _checked_model

    run = tmp_path / "run"
    for step in (3, 5):
        (run / "checkpoints" / str(step) / "model").mkdir(parents=True)
    progress = tmp_path / "p.jsonl"
    assert _checked_model(str(progress), str(run)) is None  # none yet: the newest step, 5, is recorded
    for made_with, want in ((run / "checkpoints" / "5", None), (run, str(run))):  # this step; before steps
        progress.write_text(json.dumps({"header": {"checkpoint": str(made_with)}}) + "\n")
        assert _checked_model(str(progress), str(run)) == want
    progress.write_text(json.dumps({"header": {"checkpoint": str(run / "checkpoints" / "3")}}) + "\n")
    assert _checked_model(str(progress), str(run / "checkpoints" / "3")) is None
    with pytest.raises(ConfigError, match="rerun with --checkpoint .*checkpoints/3 to go on"):
        _checked_model(str(progress), str(run))


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def model_run(tmp_path_factory):
    """The quick start's model architecture, after 3 SFT steps on the seeds (a run directory:
    what --checkpoint takes), and the seed file."""
    from sc_jax.train import load_config, run

    root = tmp_path_factory.mktemp("evolve")
    texts = [t for pkg in ("json", "html", "email") for t in iter_corpus_texts(os.path.join(STDLIB, pkg))]
    tok = str(root / "tokenizer.json")
    train_tokenizer(texts, 2048).backend.save(tok)
    seeds = codealpaca(50)
    (root / "code_alpaca.json").write_text(json.dumps(seeds))
    with open(root / "seed_sft.jsonl", "w") as f:
        for s in seeds:
            f.write(json.dumps({"messages": [{"role": "user", "content": s["instruction"]},
                                             {"role": "assistant", "content": s["output"]}]}) + "\n")
    run_dir = str(root / "run")
    run(load_config(QUICKSTART, sft_overrides(tok, str(root / "seed_sft.jsonl"), run_dir, steps=3)))
    return root, run_dir


def sft_overrides(tok, data, run_dir, steps):
    return ["train.task=sft", f"data.tokenizer={tok}", f"data.sources=[{{kind: jsonl, path: '{data}'}}]",
            "data.holdout_fraction=0", f"train.run_dir={run_dir}", f"train.steps={steps}", "train.seq_len=256",
            "train.global_batch_size=4", "train.eval_every=0", "train.eval_batches=0", f"checkpoint.every={steps}",
            "optimizer.warmup_steps=1", "mesh.num_devices=1",
            "logging.progress=false", "logging.tensorboard=false", "train.log_every=1"]


def evolve_cmd(root, run_dir, out):
    return [sys.executable, "-m", "sc_jax.instruct.evolve", "--seeds", str(root / "code_alpaca.json"),
            "--checkpoint", run_dir, "--out", str(out), "--rounds", "2", "--batch-size", "16",
            "--prompt-tokens", "24", "--answer-tokens", "24", "--seed", "5"]


def env(root, **extra):
    # One compilation cache for the three runs: each compiles the same few functions.
    return {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "PYTHONPATH": REPO,
            "JAX_COMPILATION_CACHE_DIR": str(root / "jax_cache"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            **extra}


@pytest.fixture(scope="module")
def evolved(model_run):
    """The uninterrupted run: 50 seeds, 2 rounds."""
    root, run_dir = model_run
    whole = root / "whole.jsonl"
    done = subprocess.run(evolve_cmd(root, run_dir, whole), capture_output=True, text=True, env=env(root),
                          timeout=900)
    assert done.returncode == 0, done.stderr
    return whole, done.stdout


@pytest.mark.slow
def test_evolve_end_to_end(model_run, evolved):
    root, _ = model_run
    whole, stdout = evolved
    assert "evolving 50 seeds" in stdout and "chat prompts" in stdout
    records = [json.loads(x) for x in whole.read_text().splitlines()]
    assert records and all(r["lineage"]["round"] in (1, 2) for r in records)
    assert {r["lineage"]["operation"] for r in records} <= set(ev.OPERATIONS)
    assert all(r["messages"][0]["role"] == "user" and r["messages"][1]["role"] == "assistant" for r in records)
    progress = [json.loads(x) for x in (root / "whole.jsonl.progress.jsonl").read_text().splitlines()]
    assert len(progress) == 1 + 2 * 4  # the header, 4 chunks of 16 seeds in each of 2 rounds
    items = [x for p in progress[1:] for x in p["items"]]
    assert len(items) == 100 and {x["seed_id"] for x in items} == {f"code_alpaca.json:{i}" for i in range(1, 51)}
    kept = [x for x in items if x["eliminated"] is None]
    assert len(kept) == len(records) and f"wrote {len(kept)} evolved prompt(s)" in stdout
    # A seed whose round-1 evolution was kept is evolved from it in round 2.
    first = {x["seed_id"] for x in kept if x["round"] == 1}
    assert all(x["parent_round"] == (1 if x["seed_id"] in first else 0) for x in items if x["round"] == 2)
    print(stdout.splitlines()[-3:])


@pytest.mark.slow
def test_killed_mid_round_then_rerun_writes_the_same_file(model_run, evolved):
    root, run_dir = model_run
    whole, _ = evolved
    # Killed (-9) in the middle of round 1, after its second chunk; then the same command again.
    killed = root / "killed.jsonl"
    proc = subprocess.Popen(evolve_cmd(root, run_dir, killed), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env(root, SC_JAX_EVOLVE_PAUSE_AFTER="2"))
    for line in proc.stdout:
        if line.startswith("paused after round 1 chunk 1"):
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL and not killed.exists()
    with open(str(killed) + ".progress.jsonl", "a") as f:
        f.write('{"round": 1, "chunk": 2, "items": [{"seed_ind')  # and a line cut by the kill
    again = subprocess.run(evolve_cmd(root, run_dir, killed), capture_output=True, text=True, env=env(root),
                           timeout=900)
    assert again.returncode == 0, again.stderr
    assert "(2 chunk(s) done before)" in again.stdout
    assert killed.read_bytes() == whole.read_bytes()


@pytest.mark.slow
def test_the_evolved_set_trains_with_task_sft(model_run, evolved):
    from sc_jax.train import load_config, run

    root, _ = model_run
    data, _ = evolved
    summary = run(load_config(QUICKSTART, sft_overrides(str(root / "run" / "tokenizer.json"), str(data),
                                                        str(root / "sft_run"), steps=2)))
    assert summary["step"] == 2 and summary["trained"]
    with open(root / "sft_run" / "metrics.jsonl") as f:
        losses = [r["loss"] for r in map(json.loads, f) if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)


EVOLVE = "sc_jax.instruct.evolve"


def _seeds(d):
    with open(os.path.join(d, "s.json"), "w") as f:
        json.dump(codealpaca(2), f)
    os.makedirs(os.path.join(d, "ckpt"))


def _progress_of_an_older_step(d):
    """A run directory that trained on (steps 3 and 5) after a progress file was made with step 3."""
    _seeds(d)
    for step in (3, 5):
        os.makedirs(os.path.join(d, "run", "checkpoints", str(step), "model"))
    with open(os.path.join(d, "o.jsonl.progress.jsonl"), "w") as f:
        f.write(json.dumps({"header": {"checkpoint": os.path.join(d, "run", "checkpoints", "3")}}) + "\n")


BAD = [
    BadInput("evolve: the run directory gained a newer step", EVOLVE,
             ["--seeds", "s.json", "--checkpoint", "run", "--out", "o.jsonl"],
             ("made with the model at", os.path.join("checkpoints", "3"), os.path.join("checkpoints", "5"),
              "rerun with --checkpoint", "delete the progress file"), setup=_progress_of_an_older_step,
             leaves=("o.jsonl",)),
    BadInput("evolve: missing seeds", EVOLVE, ["--seeds", "nope.json", "--checkpoint", "ckpt", "--out", "o.jsonl"],
             ("seed file", "does not exist"), setup=_seeds, leaves=("o.jsonl",)),
    BadInput("evolve: unknown operation", EVOLVE, ["--seeds", "s.json", "--checkpoint", "ckpt", "--out", "o.jsonl",
                                                  "--ops", "deepen,shorten"], ("shorten", "choose from"),
             setup=_seeds),
    BadInput("evolve: out exists", EVOLVE, ["--seeds", "s.json", "--checkpoint", "ckpt", "--out", "s.json"],
             ("exists", "--force"), setup=_seeds),
    BadInput("evolve: missing checkpoint", EVOLVE, ["--seeds", "s.json", "--checkpoint", "gone", "--out", "o.jsonl"],
             ("gone", "does not exist"), setup=_seeds, leaves=("o.jsonl", "o.jsonl.progress.jsonl")),
    BadInput("evolve: rounds 0", EVOLVE, ["--seeds", "s.json", "--checkpoint", "ckpt", "--out", "o.jsonl",
                                         "--rounds", "0"], ("--rounds",), setup=_seeds),
]


@pytest.mark.parametrize("row", BAD, ids=str)
def test_bad_input(row, tmp_path):
    run_bad_input(row, str(tmp_path))
