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
