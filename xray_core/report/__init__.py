"""Report: what people read. The retrain run report (markdown and self-contained HTML from Jinja2
templates), the data behind its figures, ``xray status``, and the CLI's text rendering.

May import: ``data``, ``model``, ``evaluate``, ``registry``, ``io``, ``settings``, ``errors``. Never
the pipeline: the pipeline calls the report, not the other way round.
"""
