"""Data: what arrives and what the catalogue knows about it.

Scanning sources (folders, manifests), decoding and validating images, labels, ingest into the
content-addressed store with quarantine, patient-grouped splits, a run's frozen split (``snapshot``:
``SplitData``, its fingerprints), the catalogue queries, the doctor
(catalogue and files checked against each other after a crash or a full disk), and the synthetic
X-ray generator used by tests and benchmarks.

May import: ``xray_core.io``, ``settings``, ``errors``, ``faults`` and ``db``. Never the model, the
evaluation, the registry, the pipeline or the reports.
"""
