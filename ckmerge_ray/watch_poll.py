"""When a checkpoint of a run still training is complete: the polls of `watch_trajectory`.

The watch polls a run directory (local or a URI) for ``checkpoint-<step>/``-style folders (the
names `inputs.discover_checkpoints` knows). A checkpoint is read only once it is *complete*:

- with ``marker="NAME"``: the file NAME exists in the folder (the trainer's word that it is
  done; HF Trainer writes ``trainer_state.json`` last, and `integrations.CkmergeCallback`
  writes a marker after every save), and its format's files are all there;
- otherwise: every file its format names is present and whole as far as the headers tell
  (the safetensors index and each file's header against the file's size; DCP's ``.metadata``,
  written last, and every ``.distcp`` it names), and nothing in the folder changed (sizes and
  modification times, or ETags) between two polls.

Checkpoints become ready in step order: one still being written holds up later ones until it
has not changed for `STALLED_POLLS` polls while a later one is complete (then it is skipped).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ckmerge_ray.checkpoints import CheckpointInfo, load_checkpoint_info
from ckmerge_ray.config import CheckpointConfig
from ckmerge_ray.errors import CheckpointError
from ckmerge_ray.inputs import Log
from ckmerge_ray.storage import Location, discover_children
from ckmerge_ray.store import StoredCheckpoint

STALLED_POLLS = 3  # an incomplete checkpoint unchanged this long no longer holds up later ones


@dataclass
class SeenCheckpoint:
    """A checkpoint folder the watch has seen; `info`/`stored` once it is read."""

    step: int
    location: Location
    fingerprint: Optional[tuple] = None  # at the last poll that found its files all there
    state: Any = None  # what the last poll saw (unchanged for `stalled` polls: stalled)
    stalled: int = 0
    complete: bool = False
    first_whole: Optional[float] = None  # wall time of the first poll that found it whole
    complete_at: Optional[float] = None  # wall time it was declared complete
    info: Optional[CheckpointInfo] = None
    stored: Optional[StoredCheckpoint] = None
    plan: Optional[List[List[str]]] = None

    def intact(self) -> bool:
        """Its files are as when it was read (True if it was not read yet)."""
        try:
            if self.info is not None:
                self.info.check_unchanged("after it was stored")
            return True
        except CheckpointError:
            return False


def checkpoint_state(loc: Location, marker: Optional[str], checkpoint: CheckpointConfig,
                     required: Sequence[str] = ()) -> Tuple[Optional[tuple], str]:
    """(fingerprint of the folder, "") when every file the checkpoint's format names is there
    and whole as far as its headers tell, the `required` files (the tokenizer files the
    previous checkpoint had) exist, and so does the marker, if one is named; else (None, why
    not). Reads headers only."""
    if marker is not None and not (loc / marker).exists():
        return None, f"no {marker} yet"
    try:
        before = loc.fingerprint()
        load_checkpoint_info(loc, allow_pickle=checkpoint.allow_pickle, format=checkpoint.format,
                             model_config=checkpoint.model_config)
        if loc.fingerprint() != before:
            return None, "files changed while their headers were read"
    except CheckpointError as e:
        return None, str(e)
    missing = [n for n in required if not (loc / n).exists()]
    if missing:
        return None, f"no {', '.join(missing)} yet (the previous checkpoint has them)"
    return before, ""


class Poller:
    """The checkpoint folders under `root` and how far each is. `completed` (checkpoint name ->
    step, wall times first found whole and declared complete) is kept for the watch's summary;
    `required` is set by the watch to the tokenizer files of the last checkpoint it read."""

    def __init__(self, root: Location, pattern, marker: Optional[str],
                 checkpoint: CheckpointConfig, log: Log, completed: Dict[str, Dict]):
        self.root, self.pattern, self.marker = root, pattern, marker
        self.checkpoint, self.log, self.completed = checkpoint, log, completed
        self.seen: Dict[str, SeenCheckpoint] = {}
        self.required: List[str] = []

    def rule(self) -> str:
        """What makes a checkpoint complete here, for the log."""
        return (f"with {self.marker}" if self.marker else
                "(complete: files all there and unchanged between two polls)")

    def ready(self, frontier: Optional[int]) -> List[SeenCheckpoint]:
        """Checkpoints after step `frontier` newly complete, in step order. One still being
        written holds up later ones until it has not changed for `STALLED_POLLS` polls
        (abandoned: skipped)."""
        after = lambda step: frontier is None or step > frontier  # noqa: E731
        if self.root.is_local and not self.root.local_path.is_dir():
            return []  # not created yet (or gone): nothing to poll
        for step, loc in discover_children(self.root, self.pattern):
            if loc.uri not in self.seen and after(step):
                self.seen[loc.uri] = SeenCheckpoint(step, loc)
                self.log(f"found {loc.name}")
        pending = sorted((c for c in self.seen.values() if not c.complete and after(c.step)),
                         key=lambda c: c.step)
        for c in pending:
            self.poll(c)
        out = []
        for i, c in enumerate(pending):
            if c.complete:
                out.append(c)
            elif not any(d.complete for d in pending[i + 1:]) or c.stalled < STALLED_POLLS:
                break
            else:  # passed over for good once a later pair moves the frontier past it
                self.log(f"skipping {c.location.name}: incomplete and unchanged for "
                         f"{c.stalled} polls while a later checkpoint is complete")
        return out

    def poll(self, c: SeenCheckpoint) -> None:
        """Look at one checkpoint: complete now (marker, or whole and unchanged since the
        previous poll)?"""
        try:
            fp, why = checkpoint_state(c.location, self.marker, self.checkpoint, self.required)
        except CheckpointError as e:  # vanished while being looked at
            fp, why = None, str(e)
        state = fp if fp is not None else why
        c.stalled = c.stalled + 1 if state == c.state else 0
        c.state = state
        if fp is None:
            if why and c.stalled == 0:
                self.log(f"{c.location.name} not complete yet: {why}")
            c.fingerprint, c.first_whole = None, None
            return
        if c.first_whole is None or fp != c.fingerprint:
            c.first_whole = time.time()
        if self.marker is not None or fp == c.fingerprint:
            c.complete, c.complete_at = True, time.time()
            self.completed[c.location.name] = {"step": c.step, "first_whole_at": c.first_whole,
                                               "complete_at": c.complete_at}
            self.log(f"{c.location.name} is complete"
                     + (f" ({self.marker} present)" if self.marker else " (unchanged since the "
                        "previous poll)"))
        c.fingerprint = fp
