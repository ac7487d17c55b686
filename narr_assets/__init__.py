"""narr_assets: classify death-investigation narratives with LLMs on Dagster."""
