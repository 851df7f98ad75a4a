"""Training: one loop for pre-training, SFT and DPO on any mesh (`python -m sc_jax.train`).

    from sc_jax.train import load_config, run
    summary = run(load_config("experiments/configs/quickstart.yaml", ["train.steps=100"]))

Modules: `config` (the Config sections, validation, RESUME_SAFE), `state` (setup: mesh,
shardings, optimizer, the jitted steps; the state: fresh, init_from, restored), `step` (the
train step, FLOPs), `data` (synthetic or pipeline batches, placed on the mesh), `trainer` (a
started run and its start-up), `loop` (run and the loop), `hooks` (metrics, checkpoints,
evaluation, attached to the loop), `metrics` (metrics.jsonl, TensorBoard, the terminal),
`run_dir`, `preemption`, `distributed`; `__main__` is the command line.
"""

# Each name is imported from its module on first use: `python -m sc_jax.train` installs its
# Ctrl-C handler before the libraries (jax: seconds) load, and sc_jax.train.step imports alone.
_EXPORTS = {
    "config": ("CheckpointConfig", "Config", "LoggingConfig", "RESUME_SAFE", "TrainConfig", "by_key",
               "config_changes", "load_config", "refuse_changed_config", "resume_notes", "resume_safe"),
    "data": ("SyntheticIterator", "global_placer", "make_data", "synthetic_batches"),
    "distributed": ("init_distributed",),
    "hooks": ("Evaluate", "Hooks", "ReportMetrics", "SaveCheckpoints", "StepInfo", "TrainingError", "evaluate"),
    "loop": ("finish", "run", "train_loop"),
    "metrics": ("MetricsLog", "Progress", "duration", "step_cost", "tensorboard_scalars"),
    "preemption": ("Interrupted", "Preemption"),
    "run_dir": ("saved_run_config",),
    "state": ("Setup", "init_state", "load_init_params", "reference_params", "setup"),
    "trainer": ("Trainer", "start"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name):
    if name in _MODULE_OF:
        import importlib

        return getattr(importlib.import_module(f"sc_jax.train.{_MODULE_OF[name]}"), name)
    raise AttributeError(f"module 'sc_jax.train' has no attribute '{name}'")
