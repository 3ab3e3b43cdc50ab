"""A run's inputs, checked before any work, then stored once.

`discover_checkpoints` finds a run's checkpoints in its folder, oldest first.
`tune_merge`, `compare_merges` and `sweep_trajectory` all start the same way: read the headers of
a window of checkpoints (oldest first) and validate each against the newest and against the
model class; parse and prepare the objective on the newest checkpoint's tokenizer. Every check
that can fail on bad input runs here, before Ray starts or anything is put into the object store.
Then `WindowStore` puts each checkpoint into the store at most once, all with the newest
checkpoint's shard plan, so shard i of every checkpoint holds the same tensors.
"""

from __future__ import annotations

import filecmp
import inspect
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from ckmerge_ray.checkpoints import (
    CheckpointInfo, check_remote_code, load_checkpoint_info, plan_shards, tokenizer_files,
    validate_pair,
)
from ckmerge_ray.checkpoints.hf import (
    PICKLE_INDEX, PICKLE_SINGLE, SAFE_INDEX, SAFE_SINGLE, read_index,
)
from ckmerge_ray.config import CheckpointConfig, SearchConfig
from ckmerge_ray.errors import CheckpointError, ConfigError, ObjectiveError
from ckmerge_ray.model import convert_to_model
from ckmerge_ray.naming import describe
from ckmerge_ray.objectives import HeldoutLoss, Objective, parse_objective
from ckmerge_ray.storage import discover_children, is_uri, locate
from ckmerge_ray.store import StoredCheckpoint, put_checkpoint

Log = Callable[[str], None]
# HF Trainer's checkpoint-<step>, torchtitan's step-<N>, and step<N> / step_<N> / iter_<N> /
# global_step<N> layouts.
CHECKPOINT_NAME = re.compile(r"^(?:checkpoint-|step[-_]?|iter_|global_step)(\d+)$")
DEFAULT_SEQ_LEN = inspect.signature(HeldoutLoss).parameters["seq_len"].default


def discover_checkpoints(source: str | os.PathLike | Sequence[str | os.PathLike],
                         include_final: bool = False, log: Optional[Log] = None
                         ) -> List[Tuple[int, Path | str]]:
    """(step, directory) of each checkpoint, oldest first: a local Path, or a URI string.

    A single directory (or URI prefix, e.g. ``s3://bucket/run``) holding subdirectories named
    ``checkpoint-<step>``, ``step-<N>``, ``step<N>``, ``step_<N>``, ``iter_<N>`` or
    ``global_step<N>`` gives those, sorted by the number (so step 900 comes before step 1000).
    A model saved at its top (Trainer's final ``save_model``) is not one of them: it is
    reported to `log`, and added as the last point only with `include_final` and only when its
    weight files differ from the last checkpoint's (transformers saves the last step as a
    checkpoint too; compared for local folders only, `same_weights`). Its step is ``global_step`` of a ``trainer_state.json`` beside it (which
    ``trainer.save_state()`` writes), else ``max_steps`` of the last checkpoint's, else one
    more than the last checkpoint's. A list of checkpoint directories is
    taken in the order given; their step is read from the name when it has one, else it is
    the position in the list.
    """
    if isinstance(source, (str, os.PathLike)):
        source = [source]
    if len(source) == 1:
        try:
            root = locate(source[0], what="checkpoint directory")
        except CheckpointError as e:
            raise ConfigError(str(e)) from e
        found = [(step, loc.local_path or loc.uri) for step, loc in
                 discover_children(root, CHECKPOINT_NAME)]
        has_root_model = (root / "config.json").exists()
        if found and has_root_model:
            found = _with_root_model(root, found, include_final, log)
        if found or not has_root_model:
            if len(found) < 2:
                seen = [c.name for c in root.listdir()][:8]
                raise ConfigError(
                    f"found {len(found)} checkpoint(s) in {root}; a sweep needs at least two "
                    f"subdirectories named checkpoint-<step>, step-<N> or iter_<N> (saw: "
                    f"{seen}), or a list of checkpoint directories")
            steps = [s for s, _ in found]
            if len(set(steps)) != len(steps):
                raise ConfigError(f"two checkpoints in {root} have the same step: "
                                  f"{sorted((s, str(p)) for s, p in found)}")
            return found
    out = []
    for i, p in enumerate(source):
        m = CHECKPOINT_NAME.match(locate(p, must_exist=False).name)
        out.append((int(m.group(1)) if m else i, p if is_uri(p) else Path(p)))
    return out


def _with_root_model(root, found: List[Tuple[int, Path | str]], include_final: bool,
                     log: Optional[Log]) -> List[Tuple[int, Path | str]]:
    """`found` (the subfolder checkpoints), and the model at `root` last if `include_final`
    and it is not the last checkpoint's weights again."""
    last_step, last = found[-1]
    if include_final and same_weights(root, locate(last, what="checkpoint directory")):
        if log:
            log(f"{root} holds a model of its own (Trainer's final save_model) with the same "
                f"weight files as {Path(str(last)).name}: not a new point, left out")
        return found
    step, known = final_step(root), True
    if step is None or step <= last_step:
        step = final_step(locate(last, what="checkpoint directory"), "max_steps")
        known = False
    if step is None or step <= last_step:
        step = last_step + 1
    if include_final:
        if log:
            log(f"{root} holds a model of its own (Trainer's final save_model): included as the "
                f"last point, step {step}" + ("" if known else " (no trainer_state.json beside "
                                               "it: step taken from the last checkpoint's "
                                               "max_steps, or assumed just after it)"))
        return [*found, (step, root.local_path or root.uri)]
    if log:
        log(f"{root} also holds a model of its own (Trainer's final save_model): not part of "
            f"the trajectory of its {len(found)} checkpoint folder(s); include_final=True "
            "(CLI: --include-final) adds it as the last point")
    return found


def final_step(root, key: str = "global_step") -> Optional[int]:
    """`key` (``global_step``, ``max_steps``) of the trainer_state.json in `root` (a
    Location), or None."""
    state = root / "trainer_state.json"
    try:
        return int(json.loads(state.read_bytes())[key]) if state.exists() else None
    except (CheckpointError, ValueError, KeyError, TypeError):
        return None


def same_weights(a, b) -> bool:
    """Whether model directories `a` and `b` (Locations) hold the same weight files, byte for
    byte: the safetensors or pickle files `a`'s index or single file names. Local folders
    only (False for URIs: reading two remote checkpoints whole to find out is not worth it)."""
    if not (a.is_local and b.is_local):
        return False
    first = next((n for n in (SAFE_INDEX, SAFE_SINGLE, PICKLE_INDEX, PICKLE_SINGLE)
                  if (a / n).exists()), None)  # the file transformers would load (weight_files)
    if first is None:
        return False
    names = [first]
    if first.endswith(".index.json"):
        try:
            names += sorted(set(read_index(a, first).values()))
        except CheckpointError:
            return False
    return all((b.local_path / n).is_file() and
               filecmp.cmp(a.local_path / n, b.local_path / n, shallow=False) for n in names)


def printer(enabled: bool) -> Log:
    """The progress log of a run: ``[ckmerge] ...`` lines on stdout, or nothing."""
    def log(msg: str) -> None:
        if enabled:
            print(f"[ckmerge] {msg}", flush=True)
    return log


def load_window(paths: Sequence[str | os.PathLike], checkpoint: CheckpointConfig,
                log: Optional[Log] = None) -> List[CheckpointInfo]:
    """Read every checkpoint's headers, convert their names to the model's with transformers'
    own conversion (`naming.py`) and validate each against the newest, before any tensor.

    Raises CheckpointError (missing files, code that may not run, tensors unknown to the model,
    mismatched names, shapes, dtypes or architecture) and ConfigError (a checkpoint listed twice).
    """
    infos = [load_checkpoint_info(p, allow_pickle=checkpoint.allow_pickle,
                                  format=checkpoint.format, model_config=checkpoint.model_config)
             for p in paths]
    if len({str(i.path) for i in infos}) != len(infos):
        raise ConfigError("the same checkpoint is listed twice")
    if len({i.name for i in infos}) != len(infos):
        raise ConfigError(f"two checkpoints share the name {_first_repeat([i.name for i in infos])!r}"
                          ": tables and logs tell checkpoints apart by their folder names")
    code_dir = check_remote_code(infos[-1], checkpoint.trust_remote_code)
    for info in infos[:-1]:
        validate_pair(info, infos[-1])  # the stored names first: the clearest message
    check_order([i.name for i in infos])  # after: two runs' checkpoints are not "out of order"
    convert_to_model(infos, code_dir, checkpoint.name_map)
    for info in infos[:-1]:
        validate_pair(info, infos[-1])
    for info in infos if log is not None else ():
        other = ", ".join(f"{g} ({n})" for g, n in info.non_tensors.items())
        for line in (f"{info.format} checkpoint, weights in {info.path}" if
                     info.format == "dcp" else "", info.renaming.describe(),
                     other and f"not tensors, not read: {other}", describe(info.conversion)):
            if line:
                log(f"{info.name}: {line}")
    return infos


def check_order(names: Sequence[str]) -> None:
    """Checkpoints named by their step (CHECKPOINT_NAME) must come oldest first: λ (or the
    last weight) belongs to the newest. Raises ConfigError naming the two out of order; names
    without a step are not checked."""
    matches = [CHECKPOINT_NAME.match(n) for n in names]
    if not all(matches):
        return
    steps = [(n, int(m.group(1))) for n, m in zip(names, matches)]
    for (a, sa), (b, sb) in zip(steps, steps[1:]):
        if sa == sb:
            raise ConfigError(f"{a} and {b} are both step {sa}: checkpoints of one run, of "
                              "different steps, oldest first")
        if sa > sb:
            raise ConfigError(
                f"checkpoints go oldest first (the later one is Θ(t), weighted by λ), but {a} "
                f"(step {sa}) is listed before {b} (step {sb}): swap them")


def _first_repeat(names: List[str]) -> str:
    return next(n for i, n in enumerate(names) if n in names[:i])


def code_dir_of(info: CheckpointInfo, checkpoint: CheckpointConfig) -> Optional[str]:
    """Where trial workers import the model's own code from (None: a built-in architecture)."""
    return check_remote_code(info, checkpoint.trust_remote_code)


def prepare_objective(spec: str | Objective, options: Optional[Mapping[str, Any]],
                      later: CheckpointInfo, search: SearchConfig, log: Log,
                      checkpoint: Optional[CheckpointConfig] = None) -> Objective:
    """The objective, parsed and prepared (data read and tokenized) on the run's tokenizer
    (`tokenizer_dir`; its own code only with ``checkpoint.trust_remote_code``), checked against
    the model (`fit_to_model`) and the screening stage. Raises ObjectiveError, ConfigError or
    CheckpointError (a ``checkpoint.tokenizer`` that holds no tokenizer)."""
    checkpoint = checkpoint or CheckpointConfig()
    options = dict(options or {})
    objective = fit_to_model(parse_objective(spec, **options), spec, options, later.config, log)
    if search.screen_limit is not None:
        check_screen_limit(objective, search.screen_limit)
    objective.trust_remote_code = checkpoint.trust_remote_code
    objective.prepare(tokenizer_dir(later, checkpoint.tokenizer))
    check_vocabulary(objective, later)
    log(f"objective {objective!r} ready ({objective.mode}imize)")
    return objective


def tokenizer_dir(info: CheckpointInfo, tokenizer: Optional[str] = None) -> Path:
    """A local directory with the run's tokenizer files: `tokenizer` (a directory or URI,
    ``CheckpointConfig.tokenizer``) when given, else the checkpoint's own folder. A local one is
    used as it is; from a URI (or a given folder without tokenizer_config.json), its few small
    files and the checkpoint's config.json are copied to a temporary directory, removed at exit
    (the weights are never staged). Raises
    CheckpointError for a `tokenizer` that is missing or holds no tokenizer files."""
    source = info.model_dir if tokenizer is None else tokenizer_location(tokenizer)
    if source.is_local and (tokenizer is None or (source / "tokenizer_config.json").exists()):
        return source.local_path  # else AutoTokenizer needs config.json beside it: staged
    import atexit
    import shutil
    import tempfile

    local = Path(tempfile.mkdtemp(prefix="ckmerge-tokenizer-"))
    atexit.register(shutil.rmtree, local, ignore_errors=True)
    for f in [info.model_dir / "config.json", *tokenizer_files(source)]:
        (local / f.name).write_bytes(f.read_bytes())
    return local


def tokenizer_location(tokenizer: str):
    """The Location of a tokenizer given apart from the checkpoints; CheckpointError when it
    does not exist or holds none of the files ``tokenizer.save_pretrained`` writes."""
    loc = locate(tokenizer, what="tokenizer directory")
    if not any(f.name != "generation_config.json" for f in tokenizer_files(loc)):
        raise CheckpointError(f"tokenizer directory {loc.uri} holds no tokenizer files "
                              "(tokenizer.json, tokenizer_config.json, ...: what "
                              "tokenizer.save_pretrained writes)")
    return loc


def run_tokenizer_files(info: CheckpointInfo, checkpoint: CheckpointConfig) -> List:
    """The tokenizer and generation files to ship beside a merged model of `info`'s run: the
    checkpoint's own, and those of ``checkpoint.tokenizer`` (which win by name) when given."""
    files = {f.name: f for f in tokenizer_files(info.model_dir)}
    if checkpoint.tokenizer is not None:
        files.update({f.name: f for f in tokenizer_files(tokenizer_location(checkpoint.tokenizer))})
    return list(files.values())


# Config fields that bound a model's positions, in the order transformers' own code reads them.
CONTEXT_KEYS = ("n_positions", "max_position_embeddings", "n_ctx", "seq_length")


def model_context(config: Mapping[str, Any]) -> Optional[int]:
    """The longest sequence the model's config allows, or None if it names none."""
    return next((int(config[k]) for k in CONTEXT_KEYS if isinstance(config.get(k), int)), None)


def fit_to_model(objective: Objective, spec, options: Dict, config: Mapping[str, Any],
                 log: Log) -> Objective:
    """Held-out windows (or lm-eval requests) no longer than the model's context: a `seq_len`
    the user did not set is clamped to it, announced; one the user set is refused, naming the
    sizes (a model with learned positions fails every trial otherwise: IndexError)."""
    context = model_context(config)
    if context is None:
        return objective
    key = next(k for k in CONTEXT_KEYS if isinstance(config.get(k), int))
    if isinstance(objective, HeldoutLoss) and objective.seq_len > context:
        if isinstance(spec, str) and "seq_len" not in options and objective.seq_len == \
                DEFAULT_SEQ_LEN:
            log(f"seq_len: the default {objective.seq_len} is longer than the model's context "
                f"({key}={context}); using seq_len={context}")
            return parse_objective(spec, **{**options, "seq_len": context})
        raise ObjectiveError(
            f"seq_len={objective.seq_len} is longer than the model's context ({key}={context} "
            f"in config.json): pass seq_len <= {context}")
    max_length = getattr(objective, "max_length", None)
    if max_length is not None and max_length > context:
        raise ObjectiveError(f"max_length={max_length} is longer than the model's context "
                             f"({key}={context} in config.json): pass max_length <= {context}")
    return objective


def check_vocabulary(objective: Objective, later: CheckpointInfo) -> None:
    """Every token id the objective will feed must have a row in the model's embedding."""
    vocab = later.config.get("vocab_size")
    if not isinstance(vocab, int):
        return
    windows = getattr(objective, "windows", None)
    if windows is not None and len(windows) and int(windows.max()) >= vocab:
        raise ObjectiveError(
            f"the held-out text tokenizes to ids up to {int(windows.max())}, but the model's "
            f"vocabulary has {vocab} entries (vocab_size in {later.model_dir / 'config.json'}): the "
            "tokenizer has tokens the embedding was not resized for")
    tokenizer = getattr(objective, "tokenizer", None)
    if tokenizer is not None and len(tokenizer) > vocab:
        raise ObjectiveError(
            f"the tokenizer of {later.model_dir} has {len(tokenizer)} tokens but the model's vocabulary "
            f"has {vocab} entries (vocab_size in config.json): the tokenizer has tokens the "
            "embedding was not resized for")


def check_screen_limit(objective: Objective, screen_limit: float) -> None:
    """The cheap stage must be an objective of its own kind, and cheaper than the full one."""
    objective.with_limit(screen_limit)  # raises for objectives without a subset
    full = getattr(objective, "limit", None)
    if full is not None and type(full) is type(screen_limit) and screen_limit >= full:
        raise ConfigError(f"screen_limit={screen_limit} is not smaller than the objective's own "
                          f"limit={full}: screening would cost as much as the full evaluation")


class WindowStore:
    """Puts the checkpoints of a window into the object store, each at most once.

    All use the newest checkpoint's shard plan (`checkpoints.plan_shards`). Non-float tensors
    (integer buffers) must be equal across the window: they cannot be interpolated. `release(k)`
    drops this store's reference to checkpoint k, so Ray frees it once no trial holds it.
    """

    def __init__(self, infos: Sequence[CheckpointInfo], checkpoint: CheckpointConfig, log: Log):
        self.infos = list(infos)
        self.plan = plan_shards(self.infos[-1], checkpoint.max_shard_bytes)
        self.log = log
        self.puts = {info.name: 0 for info in self.infos}
        self.object_ids: Dict[str, List[str]] = {}
        self._stored: Dict[int, StoredCheckpoint] = {}
        self._reference: Dict = {}

    def get(self, k: int) -> StoredCheckpoint:
        """Checkpoint k (oldest first), read and put on first use."""
        if k not in self._stored:
            info = self.infos[k]
            self._stored[k] = put_checkpoint(info, self.plan, reference=self._reference,
                                             progress=self.log)
            self.puts[info.name] += 1
            self.object_ids[info.name] = self._stored[k].object_ids
        return self._stored[k]

    def all(self) -> List[StoredCheckpoint]:
        return [self.get(k) for k in range(len(self.infos))]

    def release(self, k: int) -> None:
        self._stored.pop(k, None)

    def summary(self) -> Dict:
        """The object-store record of summary.json: puts and object IDs per checkpoint."""
        return {"shards_per_checkpoint": len(self.plan), "puts_per_checkpoint": self.puts,
                "object_ids": self.object_ids}
