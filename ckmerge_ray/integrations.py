"""The training side of a watch: `CkmergeCallback`, a `transformers.TrainerCallback` that marks
each checkpoint complete once the Trainer has written all of it, for `ckmerge-ray watch --marker
ckmerge_complete` to pick up; optionally it also submits a Ray job per new pair.

    from transformers import Trainer
    from ckmerge_ray.integrations import CkmergeCallback

    trainer = Trainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer,
                      callbacks=[CkmergeCallback()])
    # elsewhere, while it trains:
    #   ckmerge-ray watch OUTPUT_DIR --marker ckmerge_complete --objective loss:heldout.jsonl

Trainer calls ``on_save`` after ``_save_checkpoint`` has returned: the weights, tokenizer,
optimizer, scheduler, RNG state and ``trainer_state.json`` (written last) are on disk, and old
checkpoints beyond ``save_total_limit`` are already deleted. Writing the marker is one small
file (a temporary file renamed into place), so the training step is not slowed; the callback
never reads a checkpoint. Other trainers: point ``watch`` at the checkpoint folder (complete =
files whole and unchanged between two polls), or write a marker file of your own last.
"""

from __future__ import annotations

import logging
import os
import shlex
import threading
import time
from typing import Any, Dict, List, Optional, Sequence

from transformers import TrainerCallback

from ckmerge_ray.errors import ConfigError

logger = logging.getLogger(__name__)

MARKER = "ckmerge_complete"  # the file CkmergeCallback writes into each finished checkpoint


def write_marker(checkpoint_dir: str, step: int, name: str = MARKER) -> str:
    """Write `name` into `checkpoint_dir` atomically (JSON: step and wall time). Returns its path."""
    from pathlib import Path

    from ckmerge_ray.results import write_json_atomic  # the one atomic writer

    path = os.path.join(checkpoint_dir, name)
    write_json_atomic(Path(path), {"step": step, "time": time.time()})
    return path


class CkmergeCallback(TrainerCallback):
    """Marks each saved checkpoint complete (``marker`` file), and optionally submits a Ray job
    that tunes the pair (previous checkpoint, new checkpoint).

    Args:
        marker: the file name written into ``checkpoint-<step>/`` after each save (default
            ``ckmerge_complete``); give ``watch`` the same name with ``--marker``.
        submit: optional, submit one Ray job per new pair instead of (or beside) a running
            watch: a dict with ``address`` (the dashboard, ``http://HEAD:8265``), ``args``
            (``ckmerge-ray tune`` options, e.g. ``["--objective", "loss:/data/heldout.jsonl"]``),
            ``output`` (a folder; each pair's run goes to ``OUTPUT/<earlier>-<later>``) and
            optional ``runtime_env``. The submission runs in a background thread, so a slow or
            unreachable head never blocks training; its outcome is kept in `submitted`.
            With token authentication, the job client reads the token as the Ray CLI does
            (``RAY_AUTH_TOKEN`` / ``RAY_AUTH_TOKEN_PATH`` / ``~/.ray/auth_token``, with
            ``RAY_AUTH_MODE=token``). This path is not covered by the test suite.

    Only the main process (``state.is_world_process_zero``) writes or submits anything.
    """

    def __init__(self, marker: str = MARKER, submit: Optional[Dict[str, Any]] = None):
        if not marker or os.sep in marker:
            raise ConfigError(f"marker must be a file name, got {marker!r}")
        if submit is not None and not {"address", "args", "output"} <= set(submit):
            raise ConfigError("submit needs 'address', 'args' and 'output' (see the docstring), "
                             f"got {sorted(submit)}")
        self.marker, self.submit = marker, submit
        self.previous: Optional[str] = None  # the last checkpoint marked complete
        self.submitted: List[Dict[str, Any]] = []  # {"pair", "job_id"} or {"pair", "error"}
        self._threads: List[threading.Thread] = []

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return control
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if not os.path.isdir(folder):  # a save elsewhere (hyperparameter search run dirs)
            return control
        write_marker(folder, state.global_step, self.marker)
        if self.submit is not None and self.previous is not None \
                and os.path.isdir(self.previous):
            t = threading.Thread(target=self._submit, args=(self.previous, folder), daemon=True)
            t.start()
            self._threads.append(t)
        self.previous = folder
        return control

    def job_entrypoint(self, earlier: str, later: str) -> str:
        """The shell command of the job that tunes (earlier, later)."""
        out = os.path.join(self.submit["output"],
                           f"{os.path.basename(earlier)}-{os.path.basename(later)}")
        return shlex.join(["ckmerge-ray", "tune", earlier, later, *self.submit["args"],
                           "--output", out])

    def _submit(self, earlier: str, later: str) -> None:
        pair = (earlier, later)
        try:
            from ray.job_submission import JobSubmissionClient

            client = JobSubmissionClient(self.submit["address"])
            job_id = client.submit_job(entrypoint=self.job_entrypoint(earlier, later),
                                       runtime_env=self.submit.get("runtime_env"))
            self.submitted.append({"pair": pair, "job_id": job_id})
        except Exception as e:  # noqa: BLE001 - never break training over a submission
            self.submitted.append({"pair": pair, "error": f"{type(e).__name__}: {e}"})
            logger.warning("ckmerge-ray: could not submit the job for %s -> %s: %s: %s",
                           *pair, type(e).__name__, e)

    def wait(self, timeout: Optional[float] = None) -> Sequence[Dict[str, Any]]:
        """Wait for the background submissions (e.g. at the end of training); returns them."""
        for t in self._threads:
            t.join(timeout)
        return self.submitted
