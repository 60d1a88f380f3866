"""The ``xray`` command line: the top layer (xray_cli → flows → xray_core → db).

It sits above ``flows`` because ``xray retrain``/``ingest``/``predict`` run the Prefect flows, while
``xray_core`` must stay importable and testable without Prefect.
"""
