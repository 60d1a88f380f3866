"""Pipeline: the retrain recipe written once (``cycle``) over its steps (embed, train,
evaluate, decide, promote; the features of a split's rows in ``features``), the one-retrain-at-a-time lock, and batch prediction.

Executors run it: direct calls for ``xray retrain --local`` and tests, Prefect tasks in ``flows/``.
May import every other ``xray_core`` package; nothing in ``xray_core`` imports the pipeline except
the CLI-facing report of status.
"""
