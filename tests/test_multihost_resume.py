"""Two processes on real pipeline data: a run stopped and resumed ends with the losses of
the uninterrupted run. Each host reads its own slice of the data, so each must get its
own iterator state back from the checkpoint (not process 0's)."""

import json
import os
import socket
import subprocess
import sys

import pytest

from corpus import data_overrides, make_corpus, make_tokenizer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("mh-data")
    corpus = make_corpus(root / "corpus", repos=("json", "email", "wsgiref"))
    return data_overrides(corpus, make_tokenizer(corpus, str(root / "tokenizer.json")))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_two_processes(data, run_dir, *extra):
    port = _free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.getcwd())
    args = [*data, f"train.run_dir={run_dir}", "train.steps=6", "train.seq_len=64", "train.global_batch_size=8",
            "optimizer.peak_lr=3e-3", "optimizer.warmup_steps=1", "logging.progress=false", "checkpoint.every=3",
            "mesh.data=4", "data.document=file", *extra]  # files of many sizes: the hosts' positions differ
    procs = [subprocess.Popen([sys.executable, "-m", "sc_jax.train", *args, "--coordinator", f"127.0.0.1:{port}",
                               "--num-processes", "2", "--process-id", str(i)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in map(json.loads, open(os.path.join(run_dir, "metrics.jsonl"))) if "loss" in r}


def test_a_two_process_run_resumes_each_hosts_data_exactly(data, tmp_path):
    _train_two_processes(data, tmp_path / "straight")
    _train_two_processes(data, tmp_path / "sliced", "train.stop_after_steps=3")
    assert sorted(_losses(tmp_path / "sliced")) == [1, 2, 3]
    _train_two_processes(data, tmp_path / "sliced")
    assert _losses(tmp_path / "sliced") == _losses(tmp_path / "straight")
    meta = json.load(open(tmp_path / "sliced" / "checkpoints" / "3" / "meta" / "metadata"))
    assert len(meta["data_states"]) == 2 and meta["data_states"][0] != meta["data_states"][1]
