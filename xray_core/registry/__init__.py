"""Registry: model versions as verified checkpoints on disk and rows in the catalogue, the champion
pointer (compare-and-set) and the audit trail of decisions.

May import: ``xray_core.model`` (to rebuild a head), ``data`` (the catalogue), ``io``, ``settings``,
``errors``, ``faults``. Never the pipeline or the reports.
"""
