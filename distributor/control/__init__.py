"""The control plane: health and readiness, admin API, Prometheus export, ``status`` and ``admin`` CLIs.

The top layer: may import the supervisor and everything below it; nothing below imports it.
"""
