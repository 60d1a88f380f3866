"""Model: the frozen densenet161 backbone, its preprocessing, the feature cache, the trainable head
and Grad-CAM heatmaps.

May import: ``xray_core.data`` (decoding images), ``io``, ``settings``, ``errors``, ``faults``. Never
the evaluation, registry, pipeline or reports: a model knows nothing of promotion.
"""
