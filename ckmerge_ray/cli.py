"""Command line: a thin layer over the library.

    ckmerge-ray demo
    ckmerge-ray tune ckpts/checkpoint-900 ckpts/checkpoint-1000 \\
        --objective loss:heldout.jsonl --alpha 0.5 --trials 12 \\
        --cpus-per-trial 1 --gpus-per-trial 0 --output runs/x
    ckmerge-ray watch runs/pretrain --objective loss:heldout.jsonl \\
        --marker trainer_state.json --output runs/watch      # while the run trains
    ckmerge-ray tune-window ckpts/checkpoint-{700,800,900,1000} --family simplex \\
        --objective loss:heldout.jsonl --trials 12          # weights of k checkpoints

Exit codes: 0 on success; 2 on bad input, a failed run, a sweep whose every pair failed or a
comparison whose every method failed (one line on stderr); 130 on SIGINT (Ctrl-C) and 143 on
SIGTERM, with the run saved for ``--resume``.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import List, Optional

from ckmerge_ray.cli_args import build_parser
from ckmerge_ray.errors import CkmergeError, ConfigError, RunInterrupted


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "tune":
            return _tune(args)
        if args.command == "tune-window":
            return _tune_window(args)
        if args.command == "demo":
            return _demo(args)
        if args.command == "compare":
            return _compare(args)
        if args.command == "sweep":
            return _sweep(args)
        if args.command == "watch":
            return _watch(args)
        if args.command == "plot":
            return _plot(args)
    except RunInterrupted as e:  # before CkmergeError: the run is saved, not failed
        print(f"ckmerge-ray: {e}", file=sys.stderr)
        return 128 + e.signum
    except CkmergeError as e:
        print(f"ckmerge-ray: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ckmerge-ray: interrupted", file=sys.stderr)
        return 130
    except SystemExit as e:
        if e.code != signal.SIGTERM:  # Ray's driver turns SIGTERM into sys.exit(15)
            raise
        print("ckmerge-ray: terminated (SIGTERM)", file=sys.stderr)
        return 128 + signal.SIGTERM
    return 2


def _tune(args) -> int:
    from ckmerge_ray.config import RunConfig, SearchConfig
    from ckmerge_ray.tuner import resume_run, tune_merge

    _join_cluster(args)
    if args.resume:
        _resume_alone(args)
        _report(resume_run(args.resume, export_best=not args.no_export, progress=not args.quiet),
                args.quiet)
        return 0
    if not (args.earlier and args.later and args.objective):
        raise ConfigError("tune needs EARLIER LATER --objective SPEC (or --resume RUN_DIR)")
    extra = {"acquisitions": _csv(args.acquisitions, str)} if args.acquisitions else {}
    search = SearchConfig(
        alpha=args.alpha, num_trials=args.trials, eta=args.eta, kappa=args.kappa, xi=args.xi,
        gp_noise=args.gp_noise, initial_lambdas=_csv(args.initial, float), seed=args.seed,
        noise_aware=args.noise_aware, screen_limit=_count_or_fraction(args.screen_limit),
        screen_keep=args.screen_keep, **extra,
    )
    run = RunConfig(
        output_dir=args.output, overwrite=args.overwrite, storage_path=args.storage_path,
        progress=not args.quiet, max_concurrent=args.max_concurrent,
        allow_spilling=args.allow_spilling, export_best=not args.no_export,
        gpu_shard_cache=not args.no_gpu_shard_cache, export_to=args.export_to,
    )
    result = tune_merge((args.earlier, args.later), _resources(args), args.objective,
                        search=search, run=run,
                        checkpoint=_checkpoint_config(args),
                        objective_options=_objective_options(args))
    _report(result, args.quiet)
    return 0


def _tune_window(args) -> int:
    from ckmerge_ray.config import RunConfig, SearchConfig
    from ckmerge_ray.window import resume_window, tune_window

    _join_cluster(args)
    if args.resume:
        _resume_alone(args)
        result = resume_window(args.resume, export_best=not args.no_export,
                               progress=not args.quiet)
    else:
        if len(args.checkpoints) < 2 or not args.objective:
            raise ConfigError("tune-window needs CHECKPOINT CHECKPOINT [...] --objective SPEC "
                              "(or --resume RUN_DIR)")
        run = RunConfig(output_dir=args.output, overwrite=args.overwrite, progress=not args.quiet,
                        max_concurrent=args.max_concurrent, export_best=not args.no_export,
                        export_to=args.export_to)
        result = tune_window(args.checkpoints, _resources(args), args.objective,
                             family=args.family, search=SearchConfig(
                                 alpha=args.alpha, num_trials=args.trials, seed=args.seed),
                             run=run, checkpoint=_checkpoint_config(args),
                             objective_options=_objective_options(args))
    if args.quiet:
        print(result.format(), flush=True)
    print(f"[ckmerge] results: {result.output_dir} (trials.parquet, summary.json)", flush=True)
    return 0


#: What `--resume RUN_DIR` takes from its command line; every other argument is the run's own
#: (its run.json), so giving one is refused rather than silently ignored.
RESUME_ARGS = {"command", "resume", "no_export", "quiet", "address"}
POSITIONALS = {"earlier": "EARLIER", "later": "LATER", "checkpoints": "CHECKPOINTS"}


def _resume_alone(args) -> None:
    """Refuse arguments that `--resume RUN_DIR` would ignore, naming them."""
    defaults = vars(build_parser().parse_args([args.command, "--resume", args.resume]))
    given = [k for k, v in vars(args).items() if k not in RESUME_ARGS and v != defaults.get(k)]
    if given:
        names = ", ".join(POSITIONALS.get(k, "--" + k.replace("_", "-")) for k in given)
        raise ConfigError(
            f"--resume RUN_DIR continues the run with its own arguments (RUN_DIR/run.json); "
            f"{names} would be ignored. Leave them out (only --no-export, --quiet and --address "
            "go with --resume), or start a new run with another --output")


def _report(result, quiet: bool) -> None:
    """The end of the output, also what `ray job logs` shows of a job: the final table and the
    best model's path (tune_merge printed them already unless --quiet), and where the run is."""
    from ckmerge_ray.results import format_result

    if quiet:
        print(format_result(result), flush=True)
    print(f"[ckmerge] results: {result.output_dir} (trials.parquet, summary.json)", flush=True)


def _join_cluster(args) -> None:
    """--address: the run joins that cluster (see cluster.connect, which reads RAY_ADDRESS)."""
    if args.address:
        os.environ["RAY_ADDRESS"] = args.address


def _checkpoint_config(args):
    from ckmerge_ray.config import CheckpointConfig

    return CheckpointConfig(allow_pickle=args.allow_pickle,
                            trust_remote_code=args.trust_remote_code, format=args.format,
                            name_map=args.name_map, model_config=args.model_config,
                            tokenizer=args.tokenizer)


def _resources(args) -> dict:
    return {"cpu": args.cpus_per_trial, "gpu": args.gpus_per_trial}


def _settings(args) -> dict:
    """The settings values compare and sweep share with tune, from their common options."""
    from ckmerge_ray.config import RunConfig, SearchConfig

    _join_cluster(args)
    return dict(
        search=SearchConfig(alpha=args.alpha, num_trials=args.trials, seed=args.seed),
        run=RunConfig(output_dir=args.output, overwrite=args.overwrite, progress=not args.quiet,
                      max_concurrent=args.max_concurrent,
                      max_concurrent_pairs=getattr(args, "max_concurrent_pairs", None),
                      export_to=getattr(args, "export_to", None)),
        checkpoint=_checkpoint_config(args),
        objective_options=_objective_options(args),
    )


def _compare(args) -> int:
    from ckmerge_ray.compare import compare_merges
    from ckmerge_ray.config import BaselineConfig

    baselines = BaselineConfig(
        last_n=args.last_n, ema_alpha=args.ema_alpha, stats_tokens=args.stats_tokens,
        calibration=args.calibration, regmean_alpha=args.regmean_alpha,
        window_family=args.window_family,
        **({"methods": args.methods} if args.methods else {}),
    )
    result = compare_merges(args.checkpoints, _resources(args), args.objective,
                            baselines=baselines, **_settings(args))
    if args.quiet:
        print(result.markdown(), flush=True)
    print(f"[ckmerge] results: {result.output_dir} (compare.parquet, compare.md, summary.json)",
          flush=True)
    return 0


def _sweep(args) -> int:
    import dataclasses

    from ckmerge_ray.sweep import sweep_trajectory

    checkpoints = args.checkpoints[0] if len(args.checkpoints) == 1 else args.checkpoints
    settings = _settings(args)
    settings["run"] = dataclasses.replace(settings["run"], resume=args.resume)
    result = sweep_trajectory(checkpoints, _resources(args), args.objective, heatmap=args.heatmap,
                              heatmap_lambda=args.heatmap_lambda,
                              include_final=args.include_final, window=args.window,
                              family=args.family, **settings)
    for r in result.table.to_pylist():
        best = (f"best λ={r['best_lambda']:.4f}" if r.get("best_lambda") is not None
                else f"best weights {r.get('best_weights')}")
        what = (f"{best} gain {r['gain']:+.5f}" if r["status"] == "ok"
                else f"FAILED: {r['error']}")
        print(f"[ckmerge] step {r['earlier_step']} -> {r['later_step']}: {what}", flush=True)
    print(f"[ckmerge] results: {result.output_dir} (sweep.parquet, summary.json)", flush=True)
    return 0


def _watch(args) -> int:
    import dataclasses

    from ckmerge_ray.watch import watch_trajectory

    settings = _settings(args)
    settings["run"] = dataclasses.replace(settings["run"], resume=args.resume)
    result = watch_trajectory(args.source, _resources(args), args.objective, marker=args.marker,
                              until=args.until, max_pairs=args.max_pairs,
                              poll_seconds=args.poll_seconds, idle_timeout=args.idle_timeout,
                              **settings)
    for r in result.table.to_pylist():
        what = (f"best λ={r['best_lambda']:.4f} gain {r['gain']:+.5f}" if r["status"] == "ok"
                else f"FAILED: {r['error']}")
        print(f"[ckmerge] step {r['earlier_step']} -> {r['later_step']}: {what}", flush=True)
    if result.table.num_rows == 0:
        print(f"[ckmerge] no pair was tuned: {args.source} never held two complete checkpoints "
              "while watched", flush=True)
        return 0
    made = [n for n in ("sweep.parquet", "latest/", "best_overall/", "summary.json")
            if (result.output_dir / n).exists()]
    print(f"[ckmerge] results: {result.output_dir} ({', '.join(made)})", flush=True)
    return 0


def _plot(args) -> int:
    from ckmerge_ray.plots import plot_run

    for path in plot_run(args.run_dir):
        print(path)
    return 0


def _count_or_fraction(value):
    return value if value is None or value < 1 else int(value)


def _objective_options(args) -> dict:
    if args.objective.endswith((".yaml", ".yml")):
        return {}  # the objective file holds its options
    if args.objective.startswith("lmeval:"):
        limit = _count_or_fraction(args.limit)
        options = {"include_path": args.include_path, "metrics": args.metric, "limit": limit,
                   "num_fewshot": args.num_fewshot}
    else:
        options = {"text_field": args.text_field, "max_tokens": args.max_tokens}
        if args.seq_len is not None:  # unset: the objective's default, clamped to the context
            options["seq_len"] = args.seq_len
    if args.eval_batch_size is not None:  # unset: the objective sizes it to the device
        options["batch_size"] = args.eval_batch_size
    return options


def _csv(text: str, kind):
    try:
        return [kind(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise ConfigError(f"cannot parse list {text!r}: {e}") from e


def _demo(args) -> int:
    from ckmerge_ray.demo import TrajectoryConfig, run_demo

    if args.steps is None:
        cfg = TrajectoryConfig()
    else:  # at least two checkpoints (four when steps allow) whatever the number of steps
        cfg = TrajectoryConfig(steps=args.steps, save_every=min(100, max(1, args.steps // 4)))
    run_demo(args.workdir, trials=args.trials, max_concurrent=args.max_concurrent, cfg=cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
