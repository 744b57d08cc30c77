"""Command line of the Faster R-CNN 4-step alternating-training pipeline: run, status, clean, inspect, eval, demo,
plot-losses.

    python pipeline.py run [--until STEP] [--from STEP] [--only STEP] [--force STEP]
                           [--config FILE.yml] [--set KEY VALUE ...] [--debug]
    python pipeline.py status [--config FILE.yml] [--set KEY VALUE ...]
    python pipeline.py clean STEP [--config FILE.yml] [--set KEY VALUE ...]
    python pipeline.py inspect STEP|FILE.pkl [...] [--imdb NAME] [--top N ...] [--draw IMAGE_ID --out FILE.png]
                               [--plot FILE.png] [--json]
    python pipeline.py eval [--step stage4|stage2] [--imdb NAME] [--use-07-metric/--no-use-07-metric]
                            [--pr-plot FILE.png] [--detections FILE.pkl] [--out DIR]
    python pipeline.py demo IMAGE... [--step stage4|stage2] [--out DIR] [--thresh 0.8]
    python pipeline.py plot-losses [STEP...] --out FILE.png [--smooth K]
    python pipeline.py compare EXP_DIR... [--plot FILE.png] [--json]

Bad input ends with a one-line `error: ...` and exit status 2 (a traceback only with --debug); Ctrl-C or SIGTERM
ends with 130 after saying how to continue.
"""
from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

import click

import stages  # noqa: F401  (importing stages registers the step bodies)
from stages.engine.config import Config, load_config
from stages.engine.paths import add_write_root, roots_for, set_write_roots
from stages.engine.distributed import init_from_env, shutdown
from stages.engine.errors import Interrupted, is_bad_input, one_line
from stages.engine.graph import all_step_ids
from stages.engine.runner import Runner, StepReport, format_metrics

TRAINING_STEPS = ("stage1", "stage2", "stage3", "stage4", "e2e")

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "default.yml"
STEP = click.Choice(all_step_ids())


def config_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """--config, --set and --debug, shared by every command."""
    command = click.option("--debug", is_flag=True, help="Show the full traceback on errors.")(command)
    command = click.option("--set", "overrides", type=(str, str), multiple=True, metavar="KEY VALUE",
                           help="Override a config key, e.g. --set TEST.NMS 0.4 (repeatable).")(command)
    command = click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
                           help=f"YAML config (default: configs/{DEFAULT_CONFIG.name}).")(command)
    return command


def build_config(config_path: str | None, overrides: Sequence[tuple[str, str]]) -> Config:
    """The command's config; from here on every write must stay inside its output and data roots."""
    config = load_config(config_path or DEFAULT_CONFIG, overrides=list(overrides))
    set_write_roots(roots_for(config))
    return config


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show the full traceback on errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Faster R-CNN 4-step alternating training (py-faster-rcnn semantics), resumable step by step.

    Steps: stage1 (RPN, M1) -> p1 (proposals) -> stage2 (Fast R-CNN, M2) -> stage3 (RPN, M3) -> p2 -> stage4
    (Fast R-CNN, M4) -> eval; with PIPELINE.MODE end2end (approximate joint training): e2e -> eval. Outputs go to
    output/<EXP_DIR>/<step>/.
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
    """Run the pipeline: skip done steps, resume partial ones, run the rest.

    Under `torchrun --nproc_per_node=N pipeline.py run ...` every training step runs data-parallel (DDP) and the
    proposal dumps and eval split the images; rank 0 prints and writes.
    """
    ctx.obj["debug"] = ctx.obj.get("debug") or debug
    config = build_config(config_path, overrides)
    dist = init_from_env(config.get("PIPELINE.DEVICE"))
    try:
        runner = Runner(config, echo=click.echo, debug=ctx.obj["debug"], dist=dist)
        runner.echo(f"experiment: {runner.exp_dir}"
                    + (f" ({dist.world_size} processes, {dist.device.type})" if dist.enabled else ""))
        reports = runner.run(until=until, from_=from_, only=only, force=force)
        runner.echo(summary_table(reports))
    finally:
        shutdown()


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
    click.echo(runner.cache_summary())


@cli.command()
@config_options
@click.pass_context
def pretrain(ctx: click.Context, config_path: str | None, overrides: tuple[tuple[str, str], ...], debug: bool) -> None:
    """Build (or find) the pretrained M0 that PIPELINE.WEIGHTS names as 'pretrain:<recipe>' (the default config's
    tiny_shapes: the tiny body taught to classify shape crops of scenes of another seed) and print where it is.
    `run` builds it on first use too; it is kept under <DATA_ROOT>/pretrained/ and built once per machine."""
    from stages.pretrain import build, recipe_of

    ctx.obj["debug"] = ctx.obj.get("debug") or debug
    config = build_config(config_path, overrides)
    if recipe_of(config) is None:
        raise click.UsageError(f"PIPELINE.WEIGHTS is {config.get('PIPELINE.WEIGHTS')!r}, not a 'pretrain:<recipe>' "
                               f"M0 (e.g. --set PIPELINE.WEIGHTS pretrain:tiny_shapes)")
    path, manifest = build(config, echo=click.echo)
    accuracy = manifest["held_out_accuracy"]
    click.echo(f"{config.get('PIPELINE.WEIGHTS')}: {path}")
    click.echo(f"sha256 {manifest['sha256']}, built in {manifest['seconds']}s, held-out crop accuracy "
               f"{accuracy['all']:.3f} (objects {accuracy['objects']:.3f}, background {accuracy['background']:.3f})")


@cli.command()
@click.argument("step", type=STEP, required=False)
@click.option("--cache", "cache_only", is_flag=True,
              help="Empty the run cache (of STEP only, when given) instead of removing STEP's folder.")
@config_options
@click.pass_context
def clean(ctx: click.Context, step: str | None, cache_only: bool, config_path: str | None,
          overrides: tuple[tuple[str, str], ...], debug: bool) -> None:
    """Remove STEP's folder and its cached versions (its downstream steps re-run next time if STEP's new outputs
    differ), or with --cache empty the run cache of earlier versions."""
    ctx.obj["debug"] = ctx.obj.get("debug") or debug
    if step is None and not cache_only:
        raise click.UsageError("name a STEP to remove, or give --cache to empty the run cache")
    runner = Runner(build_config(config_path, overrides), echo=click.echo)
    if cache_only:
        count, size = runner.clean_cache(step)
        click.echo(f"removed {count} cached version{'s' if count != 1 else ''} ({size / 1e6:.1f} MB)"
                   + (f" of {step}" if step else "") + f" from {runner.cache.root}")
        return
    downstream = runner.clean(step)
    click.echo(f"removed {runner.step_dir(step)}")
    if downstream:
        click.echo(f"downstream of {step}: {', '.join(downstream)}; they re-run on the next `run` unless the "
                   f"new {step} outputs are byte-identical")


@cli.command("inspect")
@click.argument("targets", nargs=-1, required=True, metavar="STEP|FILE.pkl...")
@click.option("--imdb", "imdb_name", default=None, metavar="NAME",
              help="imdb the pickles index (default: the config's PIPELINE.TRAIN_IMDB).")
@click.option("--top", "top_ns", type=click.IntRange(min=1), multiple=True, metavar="N",
              help="Proposal counts for the recall table (repeatable; default 50 100 300 1000 2000).")
@click.option("--draw", "draw_id", default=None, metavar="IMAGE_ID",
              help="Draw this image's top proposals (thin) and GT boxes (thick) into --out.")
@click.option("--draw-top", type=click.IntRange(min=1), default=300, show_default=True,
              help="How many proposals --draw shows.")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), default=None, help="PNG/JPG for --draw.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="PNG of recall-vs-IoU curves (the paper's fig. 4), every pickle on one chart.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array of proposal-stats/1 objects instead.")
@config_options
@click.pass_context
def inspect_command(ctx: click.Context, targets: tuple[str, ...], imdb_name: str | None, top_ns: tuple[int, ...],
                    draw_id: str | None, draw_top: int, out_path: str | None, plot_path: str | None, as_json: bool,
                    config_path: str | None, overrides: tuple[tuple[str, str], ...], debug: bool) -> None:
    """Proposal statistics of p1/p2 or any py-faster-rcnn proposal pickle: proposals per image, score range,
    recall at IoU 0.5/0.7 for the top N, average recall (IoU 0.5:0.95), mean best overlap."""
    from stages.commands.inspect import (TOP_NS, draw_proposal_picture, format_stats_table, inspect_pickle,
                                         resolve_proposal_file, stats_to_json)
    from stages.settings import load_imdb
    from stages.commands.plots import plot_recall_vs_iou
    from stages.commands.reval import eval_imdb

    if draw_id is not None and out_path is None:
        raise click.UsageError("--draw needs --out FILE.png")
    config = build_config(config_path, overrides)
    _allow_writes_to(out_path, plot_path)
    imdb = eval_imdb(config, imdb_name) if imdb_name else load_imdb(config, "PIPELINE.TRAIN_IMDB")
    if draw_id is not None and draw_id not in imdb.image_index:
        raise click.BadParameter(f"image id {draw_id!r} is not in {imdb.name}", param_hint="--draw")
    resolved = [resolve_proposal_file(config, t) for t in targets]
    all_stats = [inspect_pickle(path, imdb, top_ns or TOP_NS, label=label) for path, label in resolved]
    if as_json:
        click.echo(json.dumps([stats_to_json(s) for s in all_stats], indent=1))
    else:
        click.echo("\n\n".join(f"== {label}\n{format_stats_table(s)}" for (_, label), s in zip(resolved, all_stats)))
    if plot_path:
        panels = plot_recall_vs_iou(all_stats, [label for _, label in resolved], plot_path)
        _note(as_json, f"wrote {plot_path} (recall vs IoU for {', '.join(map(str, panels))} proposals)")
    if draw_id is not None:
        for path, label in resolved:
            target = out_path if len(resolved) == 1 else _suffixed(out_path, label)
            draw_proposal_picture(imdb, path, draw_id, draw_top, target)
            _note(as_json, f"wrote {target} ({label}: top {draw_top} proposals and GT of image {draw_id})")


def _allow_writes_to(*paths: str | None, folder: bool = False) -> None:
    """Paths the user named on the command line (--out, --pr-plot, ...) are write roots too: their folder, or the
    folder itself with `folder`."""
    for path in paths:
        if path:
            add_write_root(Path(path) if folder else Path(os.path.abspath(path)).parent)


def _note(quiet_stdout: bool, message: str) -> None:
    """A 'wrote ...' line: on stdout, or on stderr when stdout carries JSON."""
    click.echo(message, err=quiet_stdout)


def _suffixed(path: str, label: str) -> str:
    stem, ext = os.path.splitext(path)
    return f"{stem}_{label.removesuffix('.pkl')}{ext}"


@cli.command("eval")
@click.option("--step", type=click.Choice(["stage4", "stage2", "e2e"]), default=None,
              help="stage4: the unified model M4; stage2: M1's RPN proposes, M2 detects (the unshared row); e2e: "
                   "the end2end model (default: the final model of PIPELINE.MODE, stage4 or e2e).")
@click.option("--imdb", "imdb_name", default=None, metavar="NAME",
              help="imdb to evaluate on (default: the config's PIPELINE.TEST_IMDB).")
@click.option("--use-07-metric/--no-use-07-metric", "use_07_metric", default=None,
              help="VOC07 11-point AP or area under the curve (default: the imdb decides; VOC2007-style: 07). "
                   "VOC-format data only: COCO-format data is scored with COCOeval.")
@click.option("--pr-plot", type=click.Path(dir_okay=False), default=None, help="PNG of per-class PR curves.")
@click.option("--detections", "detections_file", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Re-score this detections.pkl (all_boxes[cls][image]) instead of detecting, like reval.py.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Output folder (default output/<EXP_DIR>/eval_<step>_<imdb>/, or reval_<imdb>/ beside "
                   "--detections).")
@config_options
@click.pass_context
def eval_command(ctx: click.Context, step: str, imdb_name: str | None, use_07_metric: bool | None,
                 pr_plot: str | None, detections_file: str | None, out_dir: str | None, config_path: str | None,
                 overrides: tuple[tuple[str, str], ...], debug: bool) -> None:
    """Evaluate a trained detector (or saved detections): per-class AP table and mAP with the VOC metric, or
    COCOeval's AP/AR statistics on COCO-format data."""
    from stages.evaluation import format_results, is_coco, metric_description
    from stages.commands.plots import plot_pr_curves
    from stages.commands.reval import default_step, evaluate_step, eval_imdb, read_pr, reval

    config = build_config(config_path, overrides)
    _allow_writes_to(pr_plot, detections_file)
    _allow_writes_to(out_dir, folder=True)
    step = step or default_step(config)
    imdb = eval_imdb(config, imdb_name, use_07_metric)
    target = Path(out_dir) if out_dir else None
    if detections_file:
        result = reval(detections_file, imdb, target)
        what = f"detections {detections_file}"
    else:
        result = evaluate_step(config, step, imdb, target)
        what = f"{step} ({ {'stage4': 'M4', 'stage2': 'M1 RPN + M2 detector', 'e2e': 'joint model'}[step]})"
    metric = metric_description(imdb, result.results, voc_area="area under the PR curve")
    click.echo(f"{what} on {imdb.name}: {imdb.num_images} images, {metric}")
    click.echo(format_results(result.results))
    files = "results/detections_*_results.json" if is_coco(result.results) else "results/comp4_det_*.txt"
    click.echo(f"wrote {result.out_dir} (aps.json, {files}{'' if detections_file else ', detections.pkl'})")
    if pr_plot:
        plot_pr_curves(read_pr(result.out_dir / "results", imdb.classes), pr_plot,
                       title=f"{'reval' if detections_file else step} on {imdb.name}")
        click.echo(f"wrote {pr_plot}")


@cli.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--step", type=click.Choice(["stage4", "stage2", "e2e"]), default=None,
              help="stage4: the unified model; stage2: M1's RPN + M2; e2e: the end2end model (default: the final "
                   "model of PIPELINE.MODE).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Output folder (default output/<EXP_DIR>/demo/); files are <stem>_det.<png|jpg>.")
@click.option("--thresh", type=float, default=0.8, show_default=True, help="Score threshold (CONF_THRESH).")
@config_options
@click.pass_context
def demo(ctx: click.Context, images: tuple[str, ...], step: str, out_dir: str | None, thresh: float,
         config_path: str | None, overrides: tuple[tuple[str, str], ...], debug: bool) -> None:
    """Detect objects in plain image files and draw them with class name and score."""
    from stages.engine.config import experiment_dir
    from stages.commands.demo import demo as run_demo, format_detections
    from stages.commands.reval import default_step

    config = build_config(config_path, overrides)
    _allow_writes_to(out_dir, folder=True)
    step = step or default_step(config)
    folder = Path(out_dir) if out_dir else experiment_dir(config) / "demo"
    results = run_demo(config, images, folder, step=step, thresh=thresh)
    click.echo(format_detections(results))
    click.echo(f"wrote {len(results)} picture(s) to {folder}")


@cli.command("plot-losses")
@click.argument("steps", nargs=-1, type=click.Choice(TRAINING_STEPS))
@click.option("--out", "out_path", type=click.Path(dir_okay=False), required=True, help="PNG to write.")
@click.option("--smooth", type=click.IntRange(min=0), default=0, show_default=True,
              help="Moving-average window over logged iterations (0: raw).")
@config_options
@click.pass_context
def plot_losses(ctx: click.Context, steps: tuple[str, ...], out_path: str, smooth: int, config_path: str | None,
                overrides: tuple[tuple[str, str], ...], debug: bool) -> None:
    """Loss curves from each training step's log.jsonl (default: every step that has one), one panel per step:
    RPN cls/box or Fast R-CNN cls/box, and the lr."""
    from stages.commands.plots import plot_losses as draw, training_logs
    from stages.engine.config import experiment_dir

    config = build_config(config_path, overrides)
    _allow_writes_to(out_path)
    logs = training_logs(experiment_dir(config), steps, TRAINING_STEPS)
    draw(logs, out_path, smooth=smooth)
    click.echo(format_table(["step", "iterations", "last loss", "last lr"],
                            [[s, str(r[-1]["iter"]), f"{r[-1]['loss']:.4f}", f"{r[-1]['lr']:g}"]
                             for s, r in logs.items()]))
    click.echo(f"wrote {out_path}")


@cli.command("compare")
@click.argument("exp_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False),
                metavar="EXP_DIR...")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="PNG with every detector's PR curves (one panel per class).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array (one object per detector) instead.")
@click.option("--debug", is_flag=True, help="Show the full traceback on errors.")
def compare_command(exp_dirs: tuple[str, ...], plot_path: str | None, as_json: bool, debug: bool) -> None:
    """Finished experiments (output/<EXP_DIR> folders, alt_opt or end2end) side by side: mode, net, mAP, per-class
    AP, the RPN's recall of the test GT by its top 300 proposals, wall time per step and in total, training
    images/s; plus alt_opt's unshared detector (M1 RPN + M2) where `eval --step stage2` has run."""
    from stages.commands.compare import comparison_json, compare, format_comparison, plot_comparison

    detectors, notes = compare(exp_dirs)
    click.echo(json.dumps(comparison_json(detectors), indent=1) if as_json else format_comparison(detectors))
    for note in notes:
        _note(True, note)
    if plot_path:
        plot_comparison(detectors, plot_path)
        _note(as_json, f"wrote {plot_path}")


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
    rank = os.environ.get("RANK", "0")
    return ("" if rank == "0" else f"[rank {rank}] ") + one_line(err)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 1 bug, 2 bad input, 130 interrupted).

    Bad input is a typed error (stages.engine.errors.is_bad_input): one `error:` line. Any other exception is a
    bug: its traceback, then one line saying so."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    previous_roots = set_write_roots(())
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
    except Exception as err:  # noqa: BLE001  (sorted into bad input and bugs right here)
        if not is_bad_input(err):
            traceback.print_exc()
            click.echo(f"error: this is a bug, not bad input ({type(err).__name__}: {_message(err)}); the traceback "
                       f"above says where; please report it", err=True)
            return 1
        if debug:
            traceback.print_exc()
        click.echo(f"error: {_message(err)}", err=True)
        return 2
    finally:
        set_write_roots(previous_roots)
    return 0


if __name__ == "__main__":
    sys.exit(main())
