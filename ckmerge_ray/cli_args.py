"""The command line's arguments: `build_parser`, with one function per subcommand and per group
of options they share. `cli.py` turns the parsed arguments into the library's settings values
(`config.py`) and runs the subcommand.
"""

from __future__ import annotations

import argparse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ckmerge-ray",
        description="Tune the linear merge λ·Θ(t) + (1-λ)·Θ(t-1) of two pretraining checkpoints "
        "with Bayesian optimization on Ray Tune.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_tune_parser(sub)
    _add_window_parser(sub)
    _add_compare_parser(sub)
    _add_sweep_parser(sub)
    _add_watch_parser(sub)
    pl = sub.add_parser("plot", help="redraw the plots of a run, sweep or comparison",
                        description="Redraw the PNG plots of RUN_DIR from its saved tables.")
    pl.add_argument("run_dir")
    d = sub.add_parser("demo", help="make a small trajectory from the stdlib and tune its last pair")
    d.add_argument("--workdir", default="ckmerge_demo",
                   help="where checkpoints and results go (default ckmerge_demo)")
    d.add_argument("--trials", type=int, default=8, help="λ values to evaluate (default 8)")
    d.add_argument("--max-concurrent", type=int, default=2, help="trials at once (default 2)")
    d.add_argument("--steps", type=int, default=None, help="training steps (default 400)")
    return parser


def _add_tune_parser(sub) -> None:
    t = sub.add_parser("tune", help="tune the merge of two checkpoints",
                       description="Tune λ for EARLIER and LATER (checkpoint folders or URIs: Hugging Face model directories or torch.distributed.checkpoint folders).")
    t.add_argument("earlier", nargs="?", help="the earlier checkpoint Θ(t-1)")
    t.add_argument("later", nargs="?", help="the later checkpoint Θ(t); λ weights this one")
    _add_objective_arguments(t, required=False)  # not with --resume
    t.add_argument("--resume", metavar="RUN_DIR", default=None,
                   help="continue the run in RUN_DIR (after a killed driver or a preempted job) "
                   "with its own arguments; finished evaluations are not redone")
    t.add_argument("--noise-aware", action="store_true",
                   help="feed each trial's standard error (lmeval reports it) into the GP")
    t.add_argument("--screen-limit", type=float, default=None,
                   help="lmeval multi-fidelity: score every λ on this many documents per task "
                   "first (count, or fraction < 1); only competitive λ get the full evaluation")
    t.add_argument("--screen-keep", type=float, default=0.5,
                   help="fraction of screened λ that go on to the full evaluation (default 0.5)")
    _add_shared_arguments(t, "ckmerge_runs/latest", 10,
                          "distinct λ values to evaluate in [alpha, 1] (default 10)",
                          "trials at once (default: what the cluster fits)")
    t.add_argument("--acquisitions", default=None,
                   help="GP-Hedge portfolio, a comma list of ei, pi, ucb (default all; one alone "
                   "disables the hedge)")
    t.add_argument("--eta", type=float, default=1.0, help="hedge learning rate (default 1)")
    t.add_argument("--initial", default="",
                   help="extra λ values to evaluate after the endpoints, e.g. 0.75,0.9")
    t.add_argument("--kappa", type=float, default=1.0, help="UCB exploration (default 1.0)")
    t.add_argument("--xi", type=float, default=0.0, help="EI/PI margin (default 0)")
    t.add_argument("--gp-noise", type=float, default=1e-6, help="GP noise variance (default 1e-6)")
    t.add_argument("--no-export", action="store_true", help="do not write the best model")
    t.add_argument("--export-to", default=None, metavar="PATH_OR_URI",
                   help="also publish best/ there (e.g. s3://bucket/run/best), atomically: a "
                   "reader never sees half a model")
    t.add_argument("--storage-path", default=None,
                   help="Ray Tune storage path (shared filesystem or URI on multi-node clusters)")
    t.add_argument("--no-gpu-shard-cache", action="store_true",
                   help="GPU trials: stream both checkpoints from host memory in every trial "
                   "instead of keeping them in device memory (when they take <= half of it)")
    t.add_argument("--allow-spilling", action="store_true",
                   help="run even if the two checkpoints exceed a node's object store (slow)")


def _add_window_parser(sub) -> None:
    w = sub.add_parser("tune-window", help="tune the merge weights of k checkpoints",
                       description="Tune the merge weights w1..wk of CHECKPOINTS (oldest first; "
                       "folders or URIs) by GP-Hedge over a family of weightings; writes "
                       "trials.parquet (a column per weight), summary.json, window.png, best/.")
    w.add_argument("checkpoints", nargs="*", help="k >= 2 checkpoints of one run, oldest first")
    _add_objective_arguments(w, required=False)  # not with --resume
    w.add_argument("--family", default="simplex",
                   help="simplex (every weighting; k <= 4), ema or decay (one shape parameter; "
                   "add +length to also search the window length, e.g. decay+length), or pair "
                   "(k = 2: the same run as `tune`); default simplex")
    w.add_argument("--resume", metavar="RUN_DIR", default=None,
                   help="continue the window run in RUN_DIR with its own arguments")
    _add_shared_arguments(w, "ckmerge_runs/window", 10,
                          "distinct weightings to evaluate, the family's initial design "
                          "included (default 10)", "trials at once (default: what the cluster "
                          "fits)")
    w.add_argument("--no-export", action="store_true", help="do not write the best model")
    w.add_argument("--export-to", default=None, metavar="PATH_OR_URI",
                   help="also publish best/ there, atomically")


def _add_compare_parser(sub) -> None:
    c = sub.add_parser("compare", help="the tuned merge against merging baselines",
                       description="Score baselines (soups, moving averages, Fisher, RegMean, "
                       "grid/random λ) and the tuned merge of the last pair, on CHECKPOINTS "
                       "(oldest first); writes compare.parquet and compare.md.")
    c.add_argument("checkpoints", nargs="+", help="two or more checkpoint directories, oldest first")
    c.add_argument("--methods", default=None,
                   help="comma list from uniform, greedy, sma, ema, wma, fisher, regmean, grid, "
                   "random, tuned, tuned-window (default all)")
    c.add_argument("--window-family", default=None,
                   help="tuned-window's family (simplex, ema, decay, +length; default simplex up "
                   "to 4 checkpoints, decay+length beyond)")
    c.add_argument("--last-n", type=int, default=None,
                   help="SMA/EMA/WMA window: the last N checkpoints (default all)")
    c.add_argument("--ema-alpha", type=float, default=0.5, help="EMA weight of the newest (default 0.5)")
    c.add_argument("--stats-tokens", type=int, default=8192,
                   help="tokens per checkpoint for Fisher/RegMean statistics (default 8192)")
    c.add_argument("--calibration", default=None,
                   help="text file for Fisher/RegMean statistics (needed with lmeval objectives)")
    c.add_argument("--regmean-alpha", type=float, default=0.9,
                   help="RegMean off-diagonal scaling (default 0.9)")
    _add_run_arguments(c, default_output="ckmerge_runs/compare",
                       trials_help="λ evaluations in [alpha, 1] for the tuned pair, and for "
                       "grid and random search (default 8)")


def _add_sweep_parser(sub) -> None:
    w = sub.add_parser("sweep", help="tune every adjacent pair of a run's checkpoints",
                       description="Tune λ for every adjacent pair of checkpoints in DIR "
                       "(checkpoint-<step>/, step<N>/, iter_<N>/, sorted by step) or of the "
                       "directories listed; writes sweep.parquet and plots.")
    w.add_argument("checkpoints", nargs="+",
                   help="a directory holding checkpoints, or checkpoint directories oldest first")
    w.add_argument("--heatmap", action="store_true",
                   help="also score the merge of every pair (i, j) at --heatmap-lambda")
    w.add_argument("--heatmap-lambda", type=float, default=0.5,
                   help="weight of the later checkpoint in heatmap merges (default 0.5)")
    w.add_argument("--include-final", action="store_true",
                   help="also the model Trainer's save_model wrote at the top of DIR, as the "
                   "last point (default: reported, not swept)")
    w.add_argument("--window", type=int, default=2, metavar="K",
                   help="checkpoints per tuned unit: 2 (default) tunes adjacent pairs; K > 2 "
                   "slides a window of K checkpoints and tunes its weights (tune-window)")
    w.add_argument("--family", default="simplex",
                   help="with --window K > 2: the weights' family (simplex, ema, decay, "
                   "+length; default simplex)")
    _add_pairs_argument(w, "as many as the trial slots and the object store fit; each pair "
                        "then runs the slots / pairs trials at a time unless --max-concurrent",
                        "each pair's (or window's)", "pairs write no best/")
    w.add_argument("--resume", action="store_true",
                   help="continue the sweep in --output (the same arguments): finished pairs "
                   "are not redone, a pair that was running resumes without redoing a finished "
                   "evaluation")
    _add_run_arguments(w, default_output="ckmerge_runs/sweep",
                       trials_help="evaluations per tuned pair or window (default 8)")


def _add_pairs_argument(p: argparse.ArgumentParser, default: str, units: str,
                       export_default: str) -> None:
    """The options sweep and watch share for their pairs: how many at once, where they publish."""
    p.add_argument("--max-concurrent-pairs", type=int, default=None, metavar="N",
                   help=f"adjacent pairs tuned at once, sharing the cluster's trial slots "
                   f"(default: {default})")
    p.add_argument("--export-to", default=None, metavar="PATH_OR_URI",
                   help=f"also publish {units} best/ to PATH_OR_URI/<its run directory>/best, "
                   f"atomically (default: {export_default})")


def _add_watch_parser(sub) -> None:
    w = sub.add_parser("watch", help="follow a training run: tune each new adjacent pair",
                       description="Poll SOURCE (a run directory or URI prefix) for "
                       "checkpoint-<step>/ (step-<N>/, iter_<N>/, ...) folders and tune each new "
                       "adjacent pair once its later checkpoint is complete; keeps "
                       "sweep.parquet, the plots, latest/ and best_overall/ in --output current.")
    w.add_argument("source", help="the directory or URI prefix the trainer saves checkpoints in")
    w.add_argument("--marker", default=None, metavar="NAME",
                   help="a checkpoint is complete once NAME exists in its folder (HF Trainer "
                   "writes trainer_state.json last; CkmergeCallback writes "
                   "ckmerge_complete); default: its files all there and unchanged between two "
                   "polls")
    _add_pairs_argument(w, "the trial slots over --max-concurrent, so one pair at a time "
                        "unless --max-concurrent leaves room", "each pair's",
                        "each pair's best/ stays in its run directory under pairs/")
    w.add_argument("--until", type=int, default=None, metavar="STEP",
                   help="stop after the pair whose later checkpoint is at step >= STEP")
    w.add_argument("--max-pairs", type=int, default=None,
                   help="stop once this many pairs are done (resumed ones included)")
    w.add_argument("--poll-seconds", type=float, default=30.0,
                   help="seconds between two looks at SOURCE (default 30)")
    w.add_argument("--idle-timeout", type=float, default=None, metavar="SECONDS",
                   help="stop when no checkpoint became complete for this long (default: never)")
    w.add_argument("--resume", action="store_true",
                   help="continue the watch in --output: finished pairs are not redone, the "
                   "pair that was running resumes without redoing a finished evaluation")
    _add_run_arguments(w, default_output="ckmerge_runs/watch")


def _add_objective_arguments(p: argparse.ArgumentParser, required: bool) -> None:
    """The objective and its options, the same for tune, compare and sweep."""
    p.add_argument("--objective", required=required,
                   help="what to minimize/maximize: loss:heldout.jsonl (jsonl, parquet, txt), "
                   "lmeval:task1,task2, or an objective .yaml file (see README)")
    p.add_argument("--text-field", default="text", help="JSON field / parquet column (default text)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per window (default 512, or the model's context if shorter)")
    p.add_argument("--max-tokens", type=int, default=65536,
                   help="held-out tokens scored per evaluation, in whole windows of "
                   "--seq-len (default 65536)")
    p.add_argument("--eval-batch-size", type=int, default=None,
                   help="windows (loss) or requests (lmeval) per forward pass (default: sized to "
                   "the device; see README)")
    p.add_argument("--include-path", default=None,
                   help="lmeval: a directory of local lm-eval task YAMLs")
    p.add_argument("--metric", default="acc",
                   help="lmeval: the metric of every task (default acc), e.g. acc_norm, word_perplexity")
    p.add_argument("--limit", type=float, default=None,
                   help="lmeval: documents per task (count, or fraction < 1), the same in every "
                   "evaluation")
    p.add_argument("--num-fewshot", type=int, default=None, help="lmeval: few-shot examples")


def _add_run_arguments(c: argparse.ArgumentParser, default_output: str,
                       trials_help: str = "λ evaluations in [alpha, 1] per tuned pair (default "
                       "8)") -> None:
    """Options compare, sweep and watch share with tune, with their own defaults."""
    _add_objective_arguments(c, required=True)
    _add_shared_arguments(c, default_output, 8, trials_help,
                          "evaluations at once (default: what the cluster fits)")


def _add_shared_arguments(p: argparse.ArgumentParser, default_output: str, trials: int,
                          trials_help: str, concurrent_help: str) -> None:
    """The search space, budget, resources and run options of tune, compare and sweep."""
    p.add_argument("--alpha", type=float, default=0.5, help="search λ in [alpha, 1] (default 0.5)")
    p.add_argument("--trials", type=int, default=trials, help=trials_help)
    p.add_argument("--max-concurrent", type=int, default=None, help=concurrent_help)
    p.add_argument("--cpus-per-trial", type=float, default=1.0, help="default 1")
    p.add_argument("--gpus-per-trial", type=float, default=0.0, help="default 0; fractions allowed")
    p.add_argument("--seed", type=int, default=0, help="search seed (default 0)")
    p.add_argument("--output", default=default_output,
                   help=f"output directory (default {default_output})")
    p.add_argument("--overwrite", action="store_true", help="replace the results in --output")
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept pytorch_model.bin (loaded with torch.load(weights_only=True))")
    p.add_argument("--format", choices=["auto", "hf", "dcp"], default="auto",
                   help="checkpoint format: hf (config.json + safetensors), dcp "
                   "(torch.distributed.checkpoint, e.g. Trainer's pytorch_model_fsdp_0/); "
                   "default: detected")
    p.add_argument("--name-map", default=None, metavar="YAML",
                   help="rules from the trainer's tensor names to the architecture's (see README "
                   "'Checkpoints from your trainer'); wrapper prefixes need none")
    p.add_argument("--model-config", default=None, metavar="PATH",
                   help="config.json (or its folder, path or URI) for DCP checkpoints with none "
                   "beside or above them")
    p.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="the run's tokenizer (a folder tokenizer.save_pretrained wrote, path or "
                   "URI) for checkpoints saved without one; default: the later checkpoint's own")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run the modeling code a checkpoint ships (config.json auto_map), on the "
                   "driver and every trial worker; off by default: such checkpoints are refused")
    p.add_argument("--address", default=None,
                   help="join this Ray cluster (HEAD_IP:6379, or auto on a cluster node) instead "
                   "of starting a local Ray; default: $RAY_ADDRESS, which `ray job submit` sets")
    p.add_argument("--quiet", action="store_true", help="no progress output")
