"""Monitor: watching a model between retrains.

``reference`` (a compact summary of the features a model was trained on, saved beside its head),
``ood`` and ``scores`` (per-film out-of-distribution scores against that reference, and the flag:
a conformal p-value against calibration films at most XRAY_OOD_ALPHA) and ``drift`` (batch tests:
MMD with a patient-level permutation test on embeddings, a KS test on predicted probabilities, a BBSE
prevalence estimate).

May import: ``data``, ``model``, ``evaluate``, ``registry``, ``io``, ``settings``, ``errors``,
``faults``. Never the pipeline or the reports: they call the monitor, not the other way round.
Nothing here imports Prefect; events are emitted by ``flows/``.
"""
