"""Experiment trackers: a job's `integrations` log its run to W&B or MLflow (`base.py`)."""
