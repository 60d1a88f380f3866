"""Pipeline: the retrain recipe written once (``recipe``: the steps in order, each over typed values),
how its steps run (``executor``: the options declared beside each step, the direct executor), the run
around it (``cycle``: the lock, the reports, a failure's audit row), the steps' work (``steps``,
``embed``, ``guards``, ``rescore``; the features of a split's rows in ``features``), batch prediction,
and retention (``retention``: what ``xray gc`` keeps and deletes).

Executors run it: direct calls for ``xray retrain --local`` and tests, Prefect tasks in ``flows/``.
May import every other ``xray_core`` package; nothing in ``xray_core`` imports the pipeline (the
report renders a ``RunResult`` from ``xray_core.results``).
"""
