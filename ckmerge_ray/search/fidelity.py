"""Multi-fidelity screening: a cheap score first, the full evaluation only for competitive λ.

Ray Tune's ASHA over two fidelities. A trial reports its score on a small document subset at
training iteration 1 and its full score at iteration 2. At iteration 1, ASHA stops the trial
unless its cheap score is in the best `keep` fraction of the cheap scores recorded so far.
The initial points (the endpoints and λ = 0) always go on to the full evaluation: the gain of a
merge is measured against them, and they set the cheap-score bar for the trials after them.
"""

from __future__ import annotations

from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from ckmerge_ray.search import search_record


class ScreeningScheduler(ASHAScheduler):
    """ASHA with `max_t=2` (screen, full), keeping the best `keep` fraction at the screen."""

    def __init__(self, metric: str, mode: str, keep: float = 0.5):
        if not 0 < keep < 1:
            raise ValueError(f"screen_keep must be in (0, 1), got {keep}")
        super().__init__(time_attr="training_iteration", metric=metric, mode=mode, max_t=2,
                         grace_period=1, reduction_factor=1.0 / keep)
        self.keep = keep

    def on_trial_result(self, tune_controller, trial, result):
        action = super().on_trial_result(tune_controller, trial, result)  # records the score
        initial = search_record(trial.config)["acquisition"] == "initial"
        if initial and result.get("fidelity") == "screen":
            return TrialScheduler.CONTINUE
        return action
