"""Results on disk: the trials table, the summary, and the atomic export of the best model.

Every write goes to a temporary name in the target folder and is renamed into place, so a crash
never leaves a half-written table or a partial model under its final name.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
import ray
from safetensors import SafetensorError
from safetensors.torch import save_file

from ckmerge_ray.errors import OutputError
from ckmerge_ray.merge import weighted_state_dict
from ckmerge_ray.search import LAMBDA
from ckmerge_ray.publish import give_default_modes, recover_published, swap_in
from ckmerge_ray.store import StoredCheckpoint, shard_tensors

# Every file and folder a run writes, named once. A tune run's directory:
TRIALS_FILE = "trials.parquet"  # one row per trial, rewritten after each
SUMMARY_FILE = "summary.json"  # written once, when the run has finished
BEST_DIR = "best"  # the best merged model (Hugging Face layout)
RUN_FILE = "run.json"  # the run's settings and Tune experiment path, for resume
JOURNAL_DIR = "evaluations"  # one JSON per finished evaluation, recorded by the plan holder
LOCK_FILE = "run.lock"  # held by the run working in the directory (rundir.lock_run_dir)
LANDSCAPE_PLOT = "landscape.png"
# A comparison's directory (compare_merges):
COMPARE_TABLE = "compare.parquet"
COMPARE_MD = "compare.md"
COMPARE_PLOT = "compare.png"
TUNED_DIR = "tuned"  # the tuned merge's own tune run
WINDOW_DIR = "tuned_window"  # the tuned-window method's own tune_window run
# A trajectory sweep's directory (sweep_trajectory):
SWEEP_TABLE = "sweep.parquet"
HEATMAP_TABLE = "heatmap.parquet"
SWEEP_GAIN_PLOT = "sweep_gain.png"
SWEEP_HEATMAP_PLOT = "sweep_heatmap.png"
PAIRS_DIR = "pairs"  # each pair's own tune run
WINDOWS_DIR = "windows"  # each window's own tune_window run (a sweep with window > 2)
SWEEP_RECORD = "sweep.json"  # what defines the sweep (a resume must match it)
# A watch's directory (watch_trajectory): a sweep's files, and
WATCH_FILE = "watch.json"  # what defines the watch (a resume must match it)
LATEST_DIR = "latest"  # the newest pair's best merged model
BEST_OVERALL_DIR = "best_overall"  # the best merged model of any pair so far


def renamed_name(module: str, renamed: Dict[str, str], name: str):
    """A module's `__getattr__` for output-file names of earlier versions: the name in this
    module it became, with a DeprecationWarning (every output file is named once, here)."""
    if name not in renamed:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    import warnings

    warnings.warn(f"{module}.{name} is deprecated; use ckmerge_ray.results.{renamed[name]}",
                  DeprecationWarning, stacklevel=3)
    return globals()[renamed[name]]


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file, fsync and rename. The file gets the mode
    a plain open() would give it (mkstemp's is 0o600: `give_default_modes`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        give_default_modes(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json_atomic(path: Path, obj: Dict) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


# What a write to a full, over-quota or read-only disk raises (safetensors reports its own).
WRITE_ERRORS = (OSError, SafetensorError)


def output_error(e: Exception, what: str, out: Path, then: Optional[str] = None) -> OutputError:
    """The `OutputError` for `what` (a file or folder of the run in `out`) that could not be
    written: a full disk, a quota, a read-only mount (`e`, one of `WRITE_ERRORS`). Writes are
    atomic, so what the run wrote before is intact, and once the disk is fixed the user does
    `then` (default: resume the run, `resume_hint`)."""
    if isinstance(e, OSError):
        reason = f"{e.strerror or e}" + (f": {e.filename}" if e.filename else "")
    else:
        reason = str(e)
    return OutputError(f"cannot write {what} ({reason}); everything the run wrote before is "
                       f"intact: free space, then {then or f'resume it ({resume_hint(out)})'}")


@contextmanager
def writing(what: str, out: Path, then: Optional[str] = None) -> Iterator[None]:
    """Around writes of `what`: a `WRITE_ERRORS` becomes the run's `output_error`."""
    try:
        yield
    except WRITE_ERRORS as e:
        raise output_error(e, what, out, then) from e


def resume_hint(out: Path, python: bool = False) -> str:
    """The command that resumes the run in `out`: ``ckmerge-ray tune --resume OUT``, or
    ``tune-window`` for a window's run (run.json says which; tune if it cannot be read), with
    the Python call too when `python`."""
    try:
        window = "window" in json.loads((Path(out) / RUN_FILE).read_text())
    except (OSError, ValueError):
        window = False
    command, call = ("tune-window", "tune_window") if window else ("tune", "tune_merge")
    return f"ckmerge-ray {command} --resume {out}" + (
        f" (Python: {call}(..., resume=True))" if python else "")


def rows_to_table(rows: List[Dict]) -> pa.Table:
    """A pyarrow table of trial rows; columns are the union of the rows' keys, in first-seen order."""
    columns: List[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    return pa.Table.from_pylist([{c: row.get(c) for c in columns} for row in rows])


def read_rows(path: Path) -> List[Dict]:
    """The rows of a trials table on disk, or [] when there is none yet. The file is read once
    and parsed from memory: the run replaces it by rename after every trial, and
    ``pq.read_table(path)`` opens a path twice (schema, then pages), so a rename in between
    paired one file's footer with the next one's pages ("Page was smaller than expected")."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    return pq.read_table(pa.BufferReader(data)).to_pylist()


def write_table_atomic(path: Path, rows: List[Dict]) -> pa.Table:
    table = rows_to_table(rows)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    write_bytes_atomic(path, sink.getvalue().to_pybytes())
    return table


def export_merged(
    earlier: StoredCheckpoint,
    later: StoredCheckpoint,
    lam: float,
    config_json: bytes,
    extra_files: List[Path],
    dest: Path,
    progress: Optional[Callable[[str], None]] = None,
    revert: Optional[Callable[[Dict], Dict]] = None,
) -> Path:
    """Write the merge at λ as a Hugging Face model directory (see `export_weighted`)."""
    return export_weighted([earlier, later], [1.0 - lam, lam], config_json, extra_files, dest,
                           progress, revert)


def export_weighted(
    checkpoints: Sequence[StoredCheckpoint],
    weights: Sequence[float],
    config_json: bytes,
    extra_files: List[Path],
    dest: Path,
    progress: Optional[Callable[[str], None]] = None,
    revert: Optional[Callable[[Dict], Dict]] = None,
) -> Path:
    """Write Σ wᵢ·Θᵢ (`merge.weighted_state_dict`: two nonzero weights by the pair's lerp, more
    in fp64, one rounding) as a Hugging Face model directory (sharded safetensors + index).
    Weights that are not k finite numbers ≥ 0 summing to 1 raise ConfigError first.

    Shards come from the object store one shard index at a time, so memory stays bounded by a
    shard of each checkpoint with a nonzero weight. `revert` maps each shard's model-named
    tensors back to the checkpoint's own names and layout (`CheckpointInfo.revert_names`), so
    the directory loads with `from_pretrained`. The directory is built under a temporary name
    beside `dest`, given the modes a plain mkdir / open would have (`give_default_modes`) and
    renamed into place (`publish.swap_in`), so `dest` is replaced only after the new one is
    complete; what a killed export left behind is first put right by `recover_published`.
    """
    from ckmerge_ray.families import check_weights

    weights = check_weights(weights, len(checkpoints))  # ConfigError: before anything is written
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    recover_published(dest)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}-tmp-"))
    used = [(c, float(w)) for c, w in zip(checkpoints, weights) if w != 0.0]
    try:
        n = len(checkpoints[-1].refs)
        weight_map, total = {}, 0
        for i, refs in enumerate(zip(*(c.refs for c, _ in used))):
            shards = [shard_tensors(s) for s in ray.get(list(refs))]
            merged = weighted_state_dict(shards, [w for _, w in used])
            if revert is not None:  # back to the file's names and layout (save_pretrained's)
                merged = revert(merged)
            fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            save_file(merged, str(tmp / fname), metadata={"format": "pt"})
            _fsync_file(tmp / fname)
            for name, t in merged.items():
                weight_map[name] = fname
                total += t.numel() * t.element_size()
            del shards, merged
            if progress:
                progress(f"exported shard {i + 1}/{n} of the merged model")
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_bytes(config_json)
        for f in extra_files:
            (tmp / f.name).write_bytes(f.read_bytes())  # a Path or a storage.Location
        give_default_modes(tmp)  # mkdtemp's 0o700, and save_file's 0o600 shards
        swap_in(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


# --- a tune run's result ------------------------------------------------------------------


@dataclass
class TuneMergeResult:
    """What a tuning run produced; everything here is also on disk under `output_dir`."""

    best_lambda: float
    best_score: float
    endpoint_scores: Dict[float, float]  # {0.0: score of Θ(t-1), 1.0: score of Θ(t)}
    mode: str  # "min" or "max": how scores compare
    table: pa.Table  # one row per trial, also in trials.parquet
    output_dir: Path
    best_model_path: Optional[Path]
    result_grid: Any  # ray.tune.ResultGrid
    summary: Dict = field(default_factory=dict)

    def gain_over(self, lam: float) -> float:
        """How much better the best merge is than the endpoint at λ (positive = better)."""
        diff = self.endpoint_scores[lam] - self.best_score
        return diff if self.mode == "min" else -diff


def format_result(result: TuneMergeResult) -> str:
    """The final table: every λ with its score and gain over both endpoints."""
    e0, e1 = result.endpoint_scores[0.0], result.endpoint_scores[1.0]
    sign = 1 if result.mode == "min" else -1
    lines = [f"{'λ':>8}  {'score':>10}  {'gain vs λ=0':>12}  {'gain vs λ=1':>12}  acquisition"]
    for r in sorted(result.table.to_pylist(), key=lambda r: r[LAMBDA]):
        if r["status"] != "ok":
            lines.append(f"{r[LAMBDA]:8.4f}  {'failed':>10}  {'':>12}  {'':>12}  {r['acquisition']}")
            continue
        g0, g1 = sign * (e0 - r["score"]), sign * (e1 - r["score"])
        mark = "  <- best" if r[LAMBDA] == result.best_lambda else ""
        lines.append(f"{r[LAMBDA]:8.4f}  {r['score']:10.5f}  {g0:+12.5f}  {g1:+12.5f}  "
                     f"{r['acquisition']}{mark}")
    lines.append(
        f"best λ={result.best_lambda:.4f} score={result.best_score:.5f}; gain over Θ(t) "
        f"{result.gain_over(1.0):+.5f}, over Θ(t-1) {result.gain_over(0.0):+.5f}"
    )
    if result.best_model_path:
        lines.append(f"best model: {result.best_model_path}")
    return "\n".join(lines)


def load_result(output_dir: str | os.PathLike, log: Optional[Callable[[str], None]] = None) -> TuneMergeResult:
    """A finished run, read back from its directory (summary.json and trials.parquet)."""
    out = Path(output_dir)
    summary = json.loads((out / SUMMARY_FILE).read_text())
    best = summary.get("best_model_path")
    result = TuneMergeResult(
        best_lambda=summary["best_lambda"], best_score=summary["best_score"],
        endpoint_scores={float(k): v for k, v in summary["endpoint_scores"].items()},
        mode=summary["mode"], table=rows_to_table(read_rows(out / TRIALS_FILE)), output_dir=out,
        best_model_path=Path(best) if best else None, result_grid=None, summary=summary,
    )
    if log:
        log(format_result(result))
    return result
