"""Confirmation over seeds (search.confirm) as a searcher that wraps another (the shape of Ray's Repeater and
ConcurrencyLimiter): it hands out the wrapped searcher's trials; once that searcher has no more and every
trial it handed out has ended, the finished trials the confirm rule selects (results.front_trials: pareto,
pareto_density or top K, and the best dense trial unless the dense pretraining is the baseline) train
again with seeds + 1, ..., as further trials whose params name the trial they repeat under `confirms`
(core.trials.replica; schedulers never stop those). Its state is saved in Ray's experiment snapshots beside
the wrapped searcher's (Ray's protocol for wrappers: get_state/set_state), so a resumed search hands out no
seed twice.
"""
from __future__ import annotations

__all__ = ["ConfirmSearch"]

from ray.tune.search import Searcher

from gatetune.core import trials as T
from gatetune.core.dotted import get_dotted, trial_config


class ConfirmSearch(Searcher):
    """searcher: the study searcher (or the ladder that wraps it: it has base and ending too); seeds: each selected config's seeds in all (its own + seeds - 1 replicas);
    front: search.confirm.front; baseline: also confirm the best dense trial."""

    def __init__(self, searcher: Searcher, *, seeds: int, front: str, baseline: bool):
        super().__init__(metric=searcher.metric, mode=searcher.mode)
        self.searcher, self.seeds, self.front, self.baseline = searcher, seeds, front, baseline
        self.handed: dict[str, dict] = {}          # trial id -> params of each search trial handed out
        self.ended: dict[str, dict] = {}           # trial id -> {status, top1, macs_ratio, density, ...}
        self.replicas: list[dict] | None = None    # the replicas' params, once decided
        self.handed_out = 0

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return self.searcher.set_search_properties(metric, mode, config, **spec)

    def suggest(self, trial_id: str):
        if self.replicas is None:
            params = self.searcher.suggest(trial_id)
            if params is not Searcher.FINISHED:
                if params is not None and not T.is_pretrain(params):
                    self.handed[trial_id] = params
                return params
            if len(self.ended) < len(self.handed):
                return None   # the front is known once every search trial has ended
            self.replicas = self._replicas()
        if self.handed_out < len(self.replicas):
            self.handed_out += 1
            return self.replicas[self.handed_out - 1]
        return Searcher.FINISHED

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self.searcher.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self.searcher.on_trial_complete(trial_id, result=result, error=error)
        params = self.handed.get(trial_id)
        if params is None or trial_id in self.ended:   # a replica, the dense pretraining, or told already
            return
        result = result or {}
        config = trial_config(self.searcher.base, T.config_params(params))
        gate = get_dotted(config, "gating.gate")
        self.ended[trial_id] = {"trial_id": trial_id, "status": self.searcher.ending(params, result, error).value,
                                **{k: result.get(k) for k in ("top1", "macs_ratio", "density")},
                                "target_density": get_dotted(config, "gating.density"),
                                "gated_layers": ",".join(map(str, gate)) if isinstance(gate, list) else str(gate)}

    def _replicas(self) -> list[dict]:
        import pandas as pd

        from gatetune import results
        chosen = results.front_trials(pd.DataFrame(list(self.ended.values())), self.front, baseline=self.baseline)
        base_seed = self.searcher.base.get("seed", 0)
        out = []
        for origin in chosen:
            params = self.handed[origin]
            start = {T.STARTED_FROM: params[T.STARTED_FROM]} if params.get(T.STARTED_FROM) else {}
            seed = params.get("seed", base_seed)
            out += [{**T.replica(params, origin, seed + i), **start} for i in range(1, self.seeds)]
        return out

    # Ray's protocol for a searcher that wraps another (SearchGenerator.save_to_dir: each object with a
    # `searcher` attribute gives get_state() into search_gen_state-*.json; the innermost saves itself).
    def get_state(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "searcher"}

    def set_state(self, state: dict) -> None:
        self.__dict__.update({k: v for k, v in state.items() if k != "searcher"})
