"""Evaluate: metrics with patient-clustered intervals and the promotion policy.

Pure numerics and pure decisions over arrays and dicts: no files, no catalogue, no torch. May import
only ``settings`` and ``errors``.
"""
