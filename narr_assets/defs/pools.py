"""Endpoint pools: one classification step per endpoint at a time, across runs and processes.

Each `openai` experiment's classification step is in its endpoint's Dagster pool
(`ExperimentConfig.pool`, e.g. `narr-endpoint-localhost-1234-v1`). A step holds one of the
pool's slots while it runs, and a pool has one slot, so two runs on one endpoint - two
backfill runs, a backfill and `narr run`, two `narr` processes - take turns and the endpoint
never sees more than one step's `run.concurrency` requests in flight. A waiting step says so
in the run's log ("Step blocked by limit for pool ...") and starts when the slot frees.

Who sets the limit: `narr` sets one slot on every pool its experiments use that has no
limit yet (`ensure_pool_limits`); the `dagster.yaml` narr and the code location write gives
any other pool the same default (`narr_assets/dagster_home.py`). A limit changed in the UI
(Deployment > Concurrency) or with `dagster instance concurrency set POOL N` is kept.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import dagster as dg
from dagster._core.errors import DagsterExecutionInterruptedError, raise_execution_interrupts
from dagster._core.execution.plan.active import ActiveExecution
from dagster._core.execution.plan.instance_concurrency_context import InstanceConcurrencyContext

# Slots per endpoint pool: one step (its `run.concurrency` requests) at a time.
POOL_LIMIT = 1


def pools_of(assets: Iterable[dg.AssetsDefinition]) -> list[str]:
    """The pools the assets' steps claim, sorted.

    Args:
        assets: Asset definitions (e.g. `Definitions.assets`).

    Returns:
        Each pool name once.
    """
    return sorted({a.op.pool for a in assets if isinstance(a, dg.AssetsDefinition) and a.op.pool})


def ensure_pool_limits(instance: dg.DagsterInstance, pools: Iterable[str]) -> list[str] | None:
    """Give each pool without a limit on the instance `POOL_LIMIT` slots.

    Args:
        instance: The Dagster instance.
        pools: Pool names.

    Returns:
        The pools set now; None when the instance's storage cannot enforce pools (a schema
        older than Dagster's concurrency tables: `dagster instance migrate` adds them).
    """
    storage = instance.event_log_storage
    if not storage.supports_global_concurrency_limits:
        return None
    limited = {limit.name for limit in storage.get_pool_limits()}
    new = sorted(set(pools) - limited)
    for pool in new:
        storage.set_concurrency_slots(pool, POOL_LIMIT)
    return new


def free_slots_of_ended_runs(instance: dg.DagsterInstance, still_working: Callable[[dg.DagsterRun], bool]) -> list[str]:
    """Free the pool slots (and places in the queue) that runs which have ended still hold.

    A run frees its slot when its step ends, but a run whose process was killed (`kill -9`,
    a power cut) never does, and the pool would stay blocked for good. Dagster's daemon frees
    them (`run_monitoring.free_slots_after_run_end_seconds`) only where a daemon runs; `narr`
    runs this after marking the runs of dead `narr` processes failed.

    Args:
        instance: The Dagster instance.
        still_working: Whether an ended run's process may still be running its step (a run
            marked canceled in the UI while its `narr` process drains its requests).

    Returns:
        The ids of the runs whose slots were freed.
    """
    storage = instance.event_log_storage
    if not storage.supports_global_concurrency_limits:
        return []
    holders = storage.get_concurrency_run_ids()
    if not holders:
        return []
    runs = {r.run_id: r for r in instance.get_runs(filters=dg.RunsFilter(run_ids=sorted(holders)))}
    freed = []
    for run_id in sorted(holders):
        run = runs.get(run_id)
        if run is None or (run.is_finished and not still_working(run)):
            storage.free_concurrency_slots_for_run(run_id)
            freed.append(run_id)
    return freed


_DAGSTER_INTERVAL = InstanceConcurrencyContext.interval_to_next_pending_claim_check  # kept for the test


def _interval_to_next_pending_claim_check(self: InstanceConcurrencyContext) -> float:
    """Seconds until the earliest blocked claim is due to be tried again (never negative)."""
    if not self._pending_claims:
        return 0.0
    now = time.time()
    due = [ready_at - now for ready_at in self._pending_timeouts.values()]
    return max(0.0, min(due)) if due else 0.0


def _terminated(claims: InstanceConcurrencyContext) -> bool:
    run = claims._instance.get_run_by_id(claims._run_id)
    return run is not None and run.status in (dg.DagsterRunStatus.CANCELING, dg.DagsterRunStatus.CANCELED)


def _stopped_waiting(active: ActiveExecution, claims: InstanceConcurrencyContext, why: str) -> str:
    pools = sorted({str(active.get_step_by_key(key).pool) for key in claims.pending_claim_steps()})
    return f"{why} while waiting for pool {', '.join(pools)} (another run holds its slot); nothing was sent"


def _sleep_til_ready(self: ActiveExecution) -> None:
    """Dagster's wait for a retry or a pool slot, which a signal or a termination now ends."""
    claims = self._instance_concurrency_context
    waiting = claims is not None and claims.has_pending_claims()
    if claims is not None and waiting and _terminated(claims):
        raise DagsterExecutionInterruptedError(_stopped_waiting(self, claims, "terminated"))
    sleep_s = self.sleep_interval()
    if sleep_s <= 0:
        return
    try:
        with raise_execution_interrupts():  # raises at once for a signal received before
            time.sleep(sleep_s)
    except DagsterExecutionInterruptedError:
        if claims is None or not waiting:
            raise
        raise DagsterExecutionInterruptedError(_stopped_waiting(self, claims, "interrupted")) from None


def patch_pool_wait() -> None:
    """Make a run waiting for a pool slot sleep between tries, and stop when asked to.

    Two flaws of Dagster 1.13's in-process executor (every narr and `dagster dev` run here),
    both only while a step waits for a slot, which before endpoint pools never happened:

    - it sleeps `interval_to_next_pending_claim_check()` seconds between tries, which returns
      `min([0, ...])`, never more than 0, so a run waiting hours for an endpoint's slot burns
      a whole core (dagster-io/dagster#20367 set out to fix it). The replacement returns the
      real time to the next try (1 s, growing to 15 s).
    - the wait holds Ctrl-C, SIGTERM and a termination from the UI until the step has its
      slot, which may be hours later. Now a signal ends the wait at once, as it would end a
      step, and so does a termination (the run is checked before each sleep).

    Dagster's claims, their order and its log lines ("Step blocked by limit for pool ...")
    are unchanged. Idempotent.
    """
    InstanceConcurrencyContext.interval_to_next_pending_claim_check = _interval_to_next_pending_claim_check  # type: ignore[method-assign]
    ActiveExecution.sleep_til_ready = _sleep_til_ready  # type: ignore[method-assign]
