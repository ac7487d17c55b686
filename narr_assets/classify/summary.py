"""What one engine run did, for the asset's metadata, `run_log` and the caller's errors."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RunSummary:
    """What one engine run did; every count is for this run only."""

    experiment: str
    config_hash: str
    batches: list[str] = field(default_factory=list)
    narratives: int = 0
    calls_ok: int = 0
    attempts: int = 0
    transient_errors: int = 0
    reused: int = 0
    skipped: int = 0
    not_sent: int = 0  # longer than run.max_input_chars: a `rejected` row, no request
    rejected: int = 0  # requests the server refused (HTTP 400/413/422): `rejected` rows
    written_batches: list[str] = field(default_factory=list)
    up_to_date_batches: list[str] = field(default_factory=list)
    failed_batches: dict[str, str] = field(default_factory=dict)
    status_counts: dict[str, int] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    journal_corrupt_lines: int = 0
    active_seconds: float = 0.0
    # Why the run stopped early on request (a signal, a Dagster termination), or None.
    stopped: str | None = None

    @property
    def calls_per_second(self) -> float:
        return self.calls_ok / self.active_seconds if self.active_seconds > 0 else 0.0
