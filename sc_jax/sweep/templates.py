"""The launcher scripts, defined once: a SLURM batch script and a TPU-pod script that run
`python -m sc_jax.train` with some arguments. The sweep renders one job per point from them
(sc_jax.sweep.jobs), and experiments/launch/ holds the same templates rendered for a config
given on the command line (`launch_script(name)`; tests/test_experiments.py checks that the
files there are exactly that). Both use the same variables: PYTHON, and for TPU pods
TPU_NAME, TPU_ZONE, TPU_PROJECT, SC_JAX_DIR and SKIP_SETUP.

The GPU script also sets the launch environment (GPU_ENV: JAX's memory pool fraction and the
XLA flags of GPU_XLA_FLAGS), each only where the user's environment leaves it unset, so
`XLA_FLAGS=... sbatch ...` (or an empty XLA_FLAGS) replaces them. bench/mfu.py starts its
measurements with the same values (`gpu_env_defaults`). The library itself sets neither:
what a process runs with is the launcher's (or the user's) choice. On the CPU, the training
command is the launcher: it sets CPU_TRAIN_XLA_FLAGS where XLA_FLAGS is unset (`set_cpu_train_env`).

A template's {{name}} is replaced by its value; a line that holds only an empty value goes.
"""

from __future__ import annotations

import os
import re

# JAX preallocates 75% of GPU memory unless told otherwise; 0.9 is what NVIDIA's JAX-Toolbox
# recommends for LLM training (MaxText's GPU configs use 0.85-0.94): XLA gets 90% and the
# rest stays for the CUDA context, cuDNN/cuBLAS handles and NCCL's own buffers, which are
# allocated outside XLA's pool.
GPU_MEM_FRACTION = "0.9"

# MaxText's XLA flags for GPU training (its configs/a3 llama2 scripts, NVIDIA JAX-Toolbox's
# GPU performance guide), without the ones newer XLA removed (--xla_gpu_graph_level,
# --xla_gpu_enable_triton_softmax_fusion: XLA refuses to start on an unknown flag, naming
# it). Each with why; most matter only across GPUs (FSDP's gathers and reductions).
GPU_XLA_FLAGS = (
    ("--xla_gpu_enable_latency_hiding_scheduler=true",
     "collectives (FSDP gathers, gradient reductions) overlap compute"),
    ("--xla_gpu_enable_triton_gemm=false", "matmuls by cuBLAS rather than Triton-generated kernels"),
    ("--xla_gpu_enable_highest_priority_async_stream=true", "collectives on the high-priority stream"),
    ("--xla_gpu_all_reduce_combine_threshold_bytes=134217728", "fewer, bigger all-reduces (128 MiB)"),
    ("--xla_gpu_all_gather_combine_threshold_bytes=134217728", "fewer, bigger all-gathers (128 MiB)"),
    ("--xla_gpu_reduce_scatter_combine_threshold_bytes=67108864", "fewer, bigger reduce-scatters (64 MiB)"),
    ("--xla_gpu_enable_pipelined_all_gather=true", "gather the next scanned layer's weights during this one"),
    ("--xla_gpu_enable_pipelined_reduce_scatter=true", "reduce a layer's gradients during the next one"),
    ("--xla_gpu_enable_pipelined_all_reduce=true", "the same for all-reduces"),
    ("--xla_gpu_enable_while_loop_double_buffering=true", "double-buffer the layer scan, for that overlap"),
    ("--xla_disable_hlo_passes=rematerialization",
     "no recompute behind model.remat's back: over budget fails, not slows"),
)


# XLA's CPU flags for training, measured side by side by bench/train.py (162M StableLM, seq
# 512 x batch 8, fp32, 2 cores of a Sapphire Rapids VM: README, "Benchmarks"). Set by
# `python -m sc_jax.train` where XLA_FLAGS is unset; generation keeps XLA's defaults, where
# YNNPACK's dots decode faster (bench/generate.py).
CPU_TRAIN_XLA_FLAGS = (
    ("--xla_cpu_experimental_ynn_fusion_type=",
     "matmuls by XLA's own (Eigen) dot, not YNNPACK's: 0.78-1.04x torch's against 0.65-0.69x per shape"),
    ("--xla_cpu_prefer_vector_width=512", "512-bit vectors in XLA's own loops (only where the CPU has AVX-512)"),
)


def _has_avx512() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return " avx512f" in f.read()
    except OSError:
        return False


def cpu_train_xla_flags() -> str:
    """CPU_TRAIN_XLA_FLAGS that apply to this machine, as one XLA_FLAGS value."""
    return " ".join(flag for flag, _ in CPU_TRAIN_XLA_FLAGS if "vector_width=512" not in flag or _has_avx512())


def set_cpu_train_env(environ=os.environ) -> bool:
    """Sets XLA_FLAGS to `cpu_train_xla_flags()` where it is unset (an XLA_FLAGS of the user's,
    even empty, is kept whole); must run before jax starts its backend. True if it set it.
    Only XLA's CPU compiler reads these flags: on GPU and TPU hosts they change nothing."""
    if "XLA_FLAGS" in environ:
        return False
    environ["XLA_FLAGS"] = cpu_train_xla_flags()
    return True


def gpu_env_defaults() -> dict[str, str]:
    """{variable: value} the GPU launchers set where the environment leaves them unset."""
    return {"XLA_PYTHON_CLIENT_MEM_FRACTION": GPU_MEM_FRACTION,
            "XLA_FLAGS": " ".join(flag for flag, _ in GPU_XLA_FLAGS)}


def _gpu_env_lines() -> str:
    """The SLURM script's lines that set GPU_ENV, one flag per line with its reason."""
    lines = [f"export XLA_PYTHON_CLIENT_MEM_FRACTION=${{XLA_PYTHON_CLIENT_MEM_FRACTION:-{GPU_MEM_FRACTION}}}"
             "  # JAX's GPU memory pool (default 0.75)",
             "# XLA flags, from MaxText's GPU configs; an XLA_FLAGS of your own (even empty) replaces them all.",
             'if [ -z "${XLA_FLAGS+set}" ]; then']
    for i, (flag, why) in enumerate(GPU_XLA_FLAGS):
        lines.append(f'  XLA_FLAGS{"+" if i else ""}="{" " if i else ""}{flag}"  # {why}')
    lines += ["  export XLA_FLAGS", "fi"]
    return "\n".join(lines)


SLURM = ("""#!/bin/bash
{{about}}
#SBATCH --job-name={{job_name}}
{{resources}}
#SBATCH --signal=TERM@120
#SBATCH --output={{log}}
# --signal: SIGTERM two minutes before the time limit (or a preemption): sc_jax.train saves a
# checkpoint of the current step and exits; the same script, resubmitted or requeued, resumes it.
set -euo pipefail
{{arguments}}
cd {{workdir}}
""" + _gpu_env_lines() + """
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}  # NCCL over the cluster fabric; adjust for your site
export SLURM_KILL_BAD_EXIT=1  # srun ends every task when one of them fails
{{cache}}
srun "${PYTHON:-python}" -m sc_jax.train {{train_args}}
""")

TPU = """#!/bin/bash
{{about}}
# Set TPU_NAME and TPU_ZONE (and TPU_PROJECT if not gcloud's default project). SC_JAX_DIR is the
# repository checkout on the workers (default: sc_jax under the home directory); relative paths in
# the arguments are relative to it. PYTHON is the workers' interpreter (e.g. a virtualenv's
# bin/python). The run directory must be on storage all workers share (every worker writes
# checkpoints), e.g. a GCS bucket mounted with gcsfuse or a Filestore path.
# (ZONE, PROJECT and REMOTE_DIR, the names of earlier versions, still work.)
set -euo pipefail
TPU_ZONE="${TPU_ZONE:-${ZONE:-}}"
TPU_PROJECT="${TPU_PROJECT:-${PROJECT:-}}"
: "${TPU_NAME:?set TPU_NAME to the TPU VM name}"
: "${TPU_ZONE:?set TPU_ZONE, e.g. us-central2-b}"
SC_JAX_DIR="${SC_JAX_DIR:-${REMOTE_DIR:-sc_jax}}"
PYTHON="${PYTHON:-python3}"
{{arguments}}
ssh_all() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$TPU_ZONE" ${TPU_PROJECT:+--project="$TPU_PROJECT"} \\
    --worker=all --command="$1"
}
if [ "${SKIP_SETUP:-{{skip_setup}}}" != 1 ]; then  # copy this checkout to every worker and install it
  gcloud compute tpus tpu-vm scp --recurse --zone="$TPU_ZONE" ${TPU_PROJECT:+--project="$TPU_PROJECT"} \\
    --worker=all "$(git rev-parse --show-toplevel)" "$TPU_NAME:$SC_JAX_DIR"
  ssh_all "cd $SC_JAX_DIR && $PYTHON -m pip install -q -r requirements.txt 'jax[tpu]'"
fi
ssh_all "cd $SC_JAX_DIR && {{cache}}$PYTHON -m sc_jax.train $ARGS" 2>&1 | tee -a {{log}}
"""

_GENERATED = ("# Rendered from sc_jax/sweep/templates.py, as the sweep's job scripts are: edit it there, then\n"
              "#   python -c 'from sc_jax.sweep.templates import write_launch_scripts; write_launch_scripts()'")

# experiments/launch/: the templates with the config and overrides from the command line.
LAUNCH_SCRIPTS = {
    "slurm_gpu.sbatch": (SLURM, {
        "about": """\
# SLURM batch script for GPU clusters: one process per GPU (8 per node here), each running
# python -m sc_jax.train --config CONFIG [key=value ...] (PYTHON=... for another interpreter).
# sc_jax.train calls jax.distributed.initialize() when SLURM_NTASKS > 1; JAX reads the
# coordinator, process count and id from SLURM's environment. Each process feeds its own
# share of the global batch.
#
#   sbatch --nodes=32 experiments/launch/slurm_gpu.sbatch experiments/configs/stage1.yaml
#   sbatch --nodes=32 experiments/launch/slurm_gpu.sbatch experiments/configs/stage2.yaml train.micro_batches=2
#
# For one process per node (all 8 GPUs in one process) use --ntasks-per-node=1 --gpus-per-task=8.
# --requeue: a preempted job starts the same command again, which resumes.
""" + _GENERATED,
        "job_name": "stable-code",
        "resources": "#SBATCH --ntasks-per-node=8\n#SBATCH --gpus-per-task=1\n#SBATCH --cpus-per-task=12\n"
                     "#SBATCH --requeue",
        "log": "slurm-%j.out",
        "arguments": 'CONFIG=${1:?usage: sbatch slurm_gpu.sbatch CONFIG [key=value ...]}\nshift',
        "workdir": '"${SLURM_SUBMIT_DIR:-.}"',
        "cache": "",
        "train_args": '--config "$CONFIG" "$@"',
    }),
    "tpu_pod.sh": (TPU, {
        "about": """\
# Run sc_jax.train on every worker of a TPU pod slice. All workers run the same command,
# python -m sc_jax.train --config CONFIG [key=value ...] (PYTHON, default python3, is the interpreter);
# jax.distributed.initialize() finds the pod by itself (sc_jax.train calls it when it sees
# TPU_WORKER_HOSTNAMES / MEGASCALE_COORDINATOR_ADDRESS), and each worker feeds its own
# share of the global batch.
#
#   TPU_NAME=my-v5p-256 TPU_ZONE=us-east5-a ./experiments/launch/tpu_pod.sh \\
#       experiments/configs/stage1.yaml mesh.fsdp=-1 train.run_dir=gs://bucket/stage1
#
# First this checkout is copied to every worker and its requirements installed there
# (SKIP_SETUP=1 skips that). A preempted slice resumes when you rerun the same command.
# The output of all workers goes to train-$TPU_NAME.log here.
""" + _GENERATED,
        "arguments": 'CONFIG=${1:?usage: tpu_pod.sh CONFIG [key=value ...]}\nshift\nARGS="--config $CONFIG $*"',
        "skip_setup": "0",
        "cache": "",
        "log": '"train-$TPU_NAME.log"',
    }),
}


def render(template: str, **values: str) -> str:
    """`template` with every {{name}} replaced by values[name] (all of them given, none left over)."""
    names = set(re.findall(r"{{(\w+)}}", template))
    if names != set(values):
        raise ValueError(f"template placeholders {sorted(names)} but values for {sorted(values)}")
    text = re.sub(r"^{{(\w+)}}\n", lambda m: values[m[1]] + "\n" if values[m[1]] else "", template, flags=re.M)
    return re.sub(r"{{(\w+)}}", lambda m: values[m[1]], text)


def launch_script(name: str) -> str:
    """experiments/launch/<name> as it must read."""
    template, values = LAUNCH_SCRIPTS[name]
    return render(template, **values)


def write_launch_scripts(directory: str = "experiments/launch") -> None:
    """Writes every launch script into `directory` (run from the repository root)."""
    for name in LAUNCH_SCRIPTS:
        path = os.path.join(directory, name)
        with open(path, "w") as f:
            f.write(launch_script(name))
        os.chmod(path, 0o755)
