"""Objectives that fail for real, for fault tests. Ray pickles this module by value (see
`ship_by_value`), so workers need not import the tests package."""

from __future__ import annotations

import os

from ckmerge_ray.objectives import HeldoutLoss


class FailsFirstN(HeldoutLoss):
    """Raises on the first `n` evaluations of the run, counted across all workers through
    exclusive-create token files in `token_dir`, then scores normally."""

    def __init__(self, path, token_dir, n=1, **kwargs):
        super().__init__(path, **kwargs)
        self.token_dir, self.n = str(token_dir), n

    def evaluate(self, model, device):
        for k in range(self.n):
            try:
                os.close(os.open(os.path.join(self.token_dir, f"fail-{k}"), os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                continue
            raise RuntimeError(f"injected failure {k} in worker {os.getpid()}")
        return super().evaluate(model, device)


class AlwaysNaN(HeldoutLoss):
    """Returns NaN: a diverged model or a broken metric."""

    def evaluate(self, model, device):
        out = super().evaluate(model, device)
        return {**out, "score": float("nan")}


class AlwaysRaises(HeldoutLoss):
    def evaluate(self, model, device):
        raise ValueError("objective is broken")


def ship_by_value() -> None:
    import sys

    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class KillsItsWorkerOnce(HeldoutLoss):
    """SIGKILLs its own worker process in the middle of the run's first evaluation (a real
    process death, as an OOM kill or a lost node would cause); later evaluations score."""

    def __init__(self, path, token_dir, **kwargs):
        super().__init__(path, **kwargs)
        self.token_dir = str(token_dir)

    def evaluate(self, model, device):
        import signal

        try:
            os.close(os.open(os.path.join(self.token_dir, "killed"), os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return super().evaluate(model, device)
        os.kill(os.getpid(), signal.SIGKILL)


class FillsTheDisk(HeldoutLoss):
    """Fills a small filesystem during an evaluation, as another process writing to a shared
    disk would, when the test has armed it: `token_dir`/fill.json holds ``{"leave": bytes,
    "skip": n, "repeat": bool}``; the evaluation after `skip` more grows a ballast file until
    only `leave` bytes are free (every evaluation from then on with `repeat`), so the writes
    that follow (journal, table, best/) meet a real ENOSPC. Evaluations are counted in
    `token_dir`/evaluations."""

    def __init__(self, path, token_dir, ballast, **kwargs):
        super().__init__(path, **kwargs)
        self.token_dir, self.ballast = str(token_dir), str(ballast)

    def evaluate(self, model, device):
        import json

        out = super().evaluate(model, device)
        with open(os.path.join(self.token_dir, "evaluations"), "a") as f:
            f.write("1\n")
        armed = os.path.join(self.token_dir, "fill.json")
        if os.path.exists(armed):
            plan = json.load(open(armed))
            if plan.get("skip", 0) > 0:
                plan["skip"] -= 1
                json.dump(plan, open(armed, "w"))
            else:
                if not plan.get("repeat"):
                    os.unlink(armed)
                fill(self.ballast, plan["leave"])
        return out


def fill(ballast, leave: int) -> None:
    """Resize `ballast` so that its filesystem has `leave` bytes free (to the page)."""
    st = os.statvfs(os.path.dirname(ballast))
    have = os.path.getsize(ballast) if os.path.exists(ballast) else 0
    size = max(have + st.f_bavail * st.f_frsize - leave, 0)
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        if size < have:
            os.ftruncate(fd, size)
        elif size > 0:
            os.posix_fallocate(fd, 0, size)
    finally:
        os.close(fd)


class HangsOnNode(HeldoutLoss):
    """Records every evaluation's start and finish with the node it ran on (files in
    `token_dir`), adds that node to the metrics (``node_id``), and on the node named in
    `token_dir`/doomed hangs in every evaluation that starts there after one has finished there
    (touching `token_dir`/hanging), so the test can remove that node while its trials run."""

    def __init__(self, path, token_dir, **kwargs):
        super().__init__(path, **kwargs)
        self.token_dir = str(token_dir)

    def evaluate(self, model, device):
        import time
        import uuid

        import ray

        node = ray.get_runtime_context().get_node_id()
        tag = f"{node}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        open(os.path.join(self.token_dir, f"started-{tag}"), "w").close()
        doomed_file = os.path.join(self.token_dir, "doomed")
        doomed = open(doomed_file).read().strip() if os.path.exists(doomed_file) else None
        if node == doomed and any(n.startswith(f"finished-{node}")
                                  for n in os.listdir(self.token_dir)):
            open(os.path.join(self.token_dir, "hanging"), "w").close()
            time.sleep(600)  # the test removes this node meanwhile
        out = super().evaluate(model, device)
        open(os.path.join(self.token_dir, f"finished-{tag}"), "w").close()
        return {**out, "node_id": node}


def take_token(token_dir, name: str) -> bool:
    """Create `token_dir`/`name` if it does not exist yet; whether this call created it."""
    try:
        os.close(os.open(os.path.join(str(token_dir), name), os.O_CREAT | os.O_EXCL))
        return True
    except FileExistsError:
        return False


def next_count(token_dir, prefix: str) -> int:
    """A counter shared by every process: the first k with `prefix`-k not yet taken."""
    k = 0
    while not take_token(token_dir, f"{prefix}-{k}"):
        k += 1
    return k


class KillsWorkersAtRandom(HeldoutLoss):
    """SIGKILLs its own worker process at seeded random moments of chosen trial attempts, for
    the soak test: in the middle of a merge (after some of its shards, leaving the resident
    model half-merged), during an evaluation (after a random delay), or after the evaluation is
    journaled and before Tune hears of it. Attempts are numbered across workers by their
    merges (token files in `token_dir`; an attempt answered from the journal merges nothing);
    every kill leaves a ``killed-<phase>-<attempt>`` token. Hooks the merge and `tune.report`
    of the worker process that unpickles it (the plan is unpickled on workers only)."""

    PHASES = ("merge", "merge", "evaluate", "report")

    def __init__(self, path, token_dir, seed, first=2, last=38, **kwargs):
        import random

        super().__init__(path, **kwargs)
        self.token_dir = str(token_dir)
        rng = random.Random(seed)
        attempts = sorted(rng.sample(range(first, last, 3), len(self.PHASES)))  # 3 apart
        phases = list(self.PHASES)
        rng.shuffle(phases)
        self.plan = {k: (phase, rng.random()) for k, phase in zip(attempts, phases)}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._hook()

    def _hook(self) -> None:
        import signal

        import ray.tune

        import ckmerge_ray.trial as trial

        if getattr(trial, "_soak_state", None) is not None:  # hooked already in this process
            trial._soak_state["objective"] = self
            return
        state = trial._soak_state = {"objective": self, "phase": None, "u": 0.0, "attempt": -1,
                                     "shards_left": None}
        real_merge, real_report = trial.merge_into_model, ray.tune.report

        def die(phase):
            take_token(self.token_dir, f"killed-{phase}-{state['attempt']}")
            os.kill(os.getpid(), signal.SIGKILL)

        def merge(plan, tensors, lam, cache=None):
            k = next_count(self.token_dir, "attempt")
            phase, u = state["objective"].plan.get(k, (None, 0.0))
            state.update(phase=phase, u=u, attempt=k, shards_left=None)
            if phase == "merge":
                n = len(plan.later.refs)
                state["shards_left"] = 1 + int(u * (n - 1)) if n > 1 else 0
            return real_merge(plan, tensors, lam, cache)

        def per_shard(real):
            def merge_one(*args, **kwargs):
                if state["shards_left"] == 0:
                    die("merge")
                if state["shards_left"] is not None:
                    state["shards_left"] -= 1
                return real(*args, **kwargs)
            return merge_one

        def report(metrics, *args, **kwargs):
            if state["phase"] == "report" and not metrics.get("from_journal"):
                die("report")  # journaled, not yet reported
            return real_report(metrics, *args, **kwargs)

        trial.merge_into_model = merge
        trial.merge_buffers_into_ = per_shard(trial.merge_buffers_into_)
        trial.merge_shard_into_ = per_shard(trial.merge_shard_into_)
        ray.tune.report = report

    def evaluate(self, model, device):
        import threading

        import ckmerge_ray.trial as trial

        state = getattr(trial, "_soak_state", None)
        if state and state["phase"] == "evaluate":
            state["phase"] = None
            kill = threading.Timer(state["u"] * 0.3, lambda: (
                take_token(self.token_dir, f"killed-evaluate-{state['attempt']}"),
                os.kill(os.getpid(), 9)))
            kill.daemon = True
            kill.start()
        return super().evaluate(model, device)


class CountsAndHangs(HeldoutLoss):
    """Appends every finished evaluation's score to `log` and hangs (sleeps 600 s, for the test
    to kill the driver) in evaluation number `hang_at` (0: never), once every other started
    evaluation is in the run's journal (`journal`, files matching `pattern`): an evaluation
    killed between its last line and its journal record would (rightly) be computed again on
    resume, and a count of finished evaluations would race with the kill. Touches
    `log`.hang when it hangs. Its settings travel with it to the workers, which need not
    share the driver's environment."""

    def __init__(self, path, log, hang_at, journal, pattern, **kwargs):
        super().__init__(path, **kwargs)
        self.log, self.hang_at = str(log), int(hang_at)
        self.journal, self.pattern = str(journal), pattern

    def evaluate(self, model, device):
        import time
        from pathlib import Path

        log = Path(self.log)
        n = len(list(log.parent.glob("started-*")))
        (log.parent / f"started-{n}-{os.getpid()}").touch()
        if n + 1 == self.hang_at:
            deadline = time.time() + 120
            while (len(list(Path(self.journal).glob(self.pattern))) < n
                   and time.time() < deadline):
                time.sleep(0.05)
            Path(self.log + ".hang").touch()
            time.sleep(600)
        out = super().evaluate(model, device)
        with open(log, "a") as f:
            f.write(f"{out['score']!r}\n")
        return out
