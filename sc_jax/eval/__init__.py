"""Evaluation harness: sandboxed execution, HumanEval / MultiPL-E, fill-in-the-middle, pass@k.

Run ``python -m sc_jax.eval --help``. Library entry points:

* :func:`run_program`, :func:`run_many`, :class:`ProgramPool`, :func:`register_executor` (``execution``)
* :func:`pass_at_k`, :func:`aggregate_pass_at_k` (``passk``)
* :func:`load_humaneval`, :func:`load_multipl_e`, :func:`evaluate`, :func:`execute_samples` (``humaneval``)
* :func:`build_fim_tasks`, :func:`evaluate_fim` (``fim``)
* :func:`load_samples`: MultiPL-E / bigcode-evaluation-harness samples (``score``)
* Defog sql-eval: ``sql`` (the command), ``sql_data``, ``sql_db``, ``sql_compare``
"""

from sc_jax.eval.execution import (
    EvalError,
    ExecResult,
    Executor,
    Program,
    ProgramPool,
    SandboxConfig,
    UnknownLanguageError,
    describe_failure,
    get_executor,
    register_executor,
    run_many,
    run_program,
    sandbox_capabilities,
)
from sc_jax.eval.fim import FimTask, build_fim_tasks, evaluate_fim
from sc_jax.eval.humaneval import (
    DataError,
    EvalReport,
    Problem,
    evaluate,
    execute_samples,
    load_humaneval,
    load_multipl_e,
)
from sc_jax.eval.passk import aggregate_pass_at_k, estimate_pass_at_k, pass_at_k
from sc_jax.eval.score import load_samples

__all__ = [
    "DataError", "EvalError", "EvalReport", "ExecResult", "Executor", "FimTask", "Problem", "Program",
    "ProgramPool", "SandboxConfig", "UnknownLanguageError", "aggregate_pass_at_k", "build_fim_tasks",
    "describe_failure", "estimate_pass_at_k", "evaluate", "evaluate_fim", "execute_samples", "get_executor",
    "load_humaneval", "load_multipl_e", "load_samples", "pass_at_k", "register_executor", "run_many",
    "run_program", "sandbox_capabilities",
]
