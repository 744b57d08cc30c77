"""The orchestrator of 4-step alternating training: config, step graph, artefacts, lock, training loop, runner.

What the step bodies use:
    register_step(step_id, fn, version="1")   plug in a step's body: fn(ctx: StepContext) -> StepResult
                 (fn may be "module:function", imported only when the step runs)
    StepContext  ctx.config, ctx.step, ctx.step_dir, ctx.exp_dir, ctx.inputs, ctx.input_file(step, relpath),
                 ctx.weights (M0 path or None), ctx.solver, ctx.device, ctx.log(msg), ctx.report_progress(k, n)
    ctx.train(model, loss_fn, loader, param_groups=..., checkpoint_fn=...)   train_loop with this step's solver
    StepResult(outputs=[relpaths], metrics={...})
    train_loop(model, loss_fn, loader, iters=..., lr=..., ..., out_dir=ctx.step_dir)
"""
from .engine.config import Config, SolverSettings, experiment_dir, load_config, solver_settings
from .engine.errors import (ConfigError, Interrupted, LockError, MissingStepBodyError, NonFiniteLossError, PipelineError,
                     StepFailedError, StepSelectionError)
from .engine.graph import STEP_ORDER, STEPS, Step, fingerprint, select_steps
from .engine.runner import REGISTRY, Runner, StepContext, StepInput, StepRegistry, StepResult, register_step

__all__ = [
    "Config", "SolverSettings", "experiment_dir", "load_config", "solver_settings",
    "ConfigError", "Interrupted", "LockError", "MissingStepBodyError", "NonFiniteLossError", "PipelineError",
    "StepFailedError", "StepSelectionError",
    "STEP_ORDER", "STEPS", "Step", "fingerprint", "select_steps",
    "REGISTRY", "Runner", "StepContext", "StepInput", "StepRegistry", "StepResult", "register_step",
    "TrainResult", "train_loop",
]

from . import steps  # noqa: E402,F401  (registers the step bodies; last, it imports the above)


def __getattr__(name: str):  # train_loop and TrainResult import torch: only when asked for
    if name in ("TrainResult", "train_loop"):
        from .engine import trainer
        return getattr(trainer, name)
    raise AttributeError(f"module 'stages' has no attribute {name!r}")
