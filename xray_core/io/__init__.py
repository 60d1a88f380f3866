"""I/O: storage backends (local folders or any fsspec URL) and atomic file helpers.

The bottom layer: may import only ``settings``, ``errors`` and ``faults``.
"""
