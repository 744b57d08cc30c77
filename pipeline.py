"""Command line of the Faster R-CNN 4-step alternating-training pipeline: run, status, clean.

    python pipeline.py run [--until STEP] [--from STEP] [--only STEP] [--force STEP]
                           [--config FILE.yml] [--set KEY VALUE ...] [--debug]
    python pipeline.py status [--config FILE.yml] [--set KEY VALUE ...]
    python pipeline.py clean STEP [--config FILE.yml] [--set KEY VALUE ...]

Bad input ends with a one-line `error: ...` and exit status 2 (a traceback only with --debug); Ctrl-C or SIGTERM
ends with 130 after saying how to continue.
"""
from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

import click

import stages  # noqa: F401  (importing stages registers the step bodies)
from stages.config import Config, load_config
from stages.errors import Interrupted, PipelineError
from stages.graph import STEP_ORDER
from stages.runner import Runner, StepReport, format_metrics

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "default.yml"
STEP = click.Choice(STEP_ORDER)
BAD_INPUT = (PipelineError, ValueError, KeyError, FileNotFoundError, OSError)


def config_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """--config, --set and --debug, shared by every command."""
    command = click.option("--debug", is_flag=True, help="Show the full traceback on errors.")(command)
    command = click.option("--set", "overrides", type=(str, str), multiple=True, metavar="KEY VALUE",
                           help="Override a config key, e.g. --set TEST.NMS 0.4 (repeatable).")(command)
    command = click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
                           help=f"YAML config (default: configs/{DEFAULT_CONFIG.name}).")(command)
    return command


def build_config(config_path: str | None, overrides: Sequence[tuple[str, str]]) -> Config:
    return load_config(config_path or DEFAULT_CONFIG, overrides=list(overrides))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show the full traceback on errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Faster R-CNN 4-step alternating training (py-faster-rcnn semantics), resumable step by step.

    Steps: stage1 (RPN, M1) -> p1 (proposals) -> stage2 (Fast R-CNN, M2) -> stage3 (RPN, M3) -> p2 -> stage4
    (Fast R-CNN, M4) -> eval. Outputs go to output/<EXP_DIR>/<step>/.
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


@cli.command()
@click.option("--until", type=STEP, default=None, help="Stop after this step (default: eval).")
@click.option("--from", "from_", type=STEP, default=None,
              help="Re-run this step and every step after it (its inputs must be done).")
@click.option("--only", type=STEP, default=None, help="Run just this step (its inputs must be done).")
@click.option("--force", type=STEP, default=None, help="Re-run this step even if it is done.")
@config_options
@click.pass_context
def run(ctx: click.Context, until: str | None, from_: str | None, only: str | None, force: str | None,
        config_path: str | None, overrides: tuple[tuple[str, str], ...], debug: bool) -> None:
    """Run the pipeline: skip done steps, resume partial ones, run the rest."""
    ctx.obj["debug"] = ctx.obj.get("debug") or debug
    config = build_config(config_path, overrides)
    runner = Runner(config, echo=click.echo, debug=ctx.obj["debug"])
    click.echo(f"experiment: {runner.exp_dir}")
    reports = runner.run(until=until, from_=from_, only=only, force=force)
    click.echo(summary_table(reports))


@cli.command()
@config_options
@click.pass_context
def status(ctx: click.Context, config_path: str | None, overrides: tuple[tuple[str, str], ...],
           debug: bool) -> None:
    """Show each step's state (done, stale and why, partial at iteration k/N, missing), time and metrics."""
    ctx.obj["debug"] = ctx.obj.get("debug") or debug
    runner = Runner(build_config(config_path, overrides), echo=click.echo)
    click.echo(f"experiment: {runner.exp_dir}")
    rows = runner.status_rows()
    click.echo(format_table(["step", "state", "time", "metrics"],
                            [[r["step"], r["state"], r["time"], r["metrics"]] for r in rows]))


@cli.command()
@click.argument("step", type=STEP)
@config_options
@click.pass_context
def clean(ctx: click.Context, step: str, config_path: str | None, overrides: tuple[tuple[str, str], ...],
          debug: bool) -> None:
    """Remove STEP's folder; its downstream steps re-run next time if STEP's new outputs differ."""
    ctx.obj["debug"] = ctx.obj.get("debug") or debug
    runner = Runner(build_config(config_path, overrides), echo=click.echo)
    downstream = runner.clean(step)
    click.echo(f"removed {runner.step_dir(step)}")
    if downstream:
        click.echo(f"downstream of {step}: {', '.join(downstream)}; they re-run on the next `run` unless the "
                   f"new {step} outputs are byte-identical")


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """Left-aligned columns separated by two spaces."""
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip() for line in [header, *rows]]
    return "\n".join(lines)


def summary_table(reports: list[StepReport]) -> str:
    rows = [[r.step, r.action, f"{r.seconds:.1f}s" if r.action == "ran" else "-", format_metrics(r.metrics)]
            for r in reports]
    return format_table(["step", "action", "time", "metrics"], rows)


def _message(err: BaseException) -> str:
    text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    return " ".join(str(text).split())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 1 bug, 2 bad input, 130 interrupted)."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    try:
        cli.main(args=args, prog_name="pipeline.py", standalone_mode=False)
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("interrupted", err=True)
        return 130
    except click.ClickException as err:
        err.show()
        return err.exit_code
    except click.exceptions.Exit as err:
        return err.exit_code
    except Interrupted as err:
        if debug:
            traceback.print_exc()
        click.echo(f"{_message(err)}; finished steps are kept: run the same command again to continue "
                   f"(a training step resumes from its last snapshot)", err=True)
        return 130
    except BAD_INPUT as err:
        if debug:
            traceback.print_exc()
        click.echo(f"error: {_message(err)}", err=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
