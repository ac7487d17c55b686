"""The Dagster layer: every asset, check, sensor and resource, and nothing else.

- `ingest.py`      source file, ingest assets and checks, the source sensor, `batch_partitions`
- `experiment.py`  one experiment file -> its classifications, metrics and checks
- `comparison.py`  leaderboard, report and exports across experiments
- `resources.py`   the `settings` and `duckdb` resources
- `metadata.py`    the markdown tables and run summaries shown in the UI

Library modules never import from here; `narr_assets/definitions.py` merges the pieces.
Modules with asset bodies do not use `from __future__ import annotations`: Dagster reads the
parameter annotations (context, config, resources) when the decorator runs and rejects
string annotations for the context.
"""
