"""The write-ahead log: per-worker segment files, acknowledgement sidecars, replay, and operator tools.

May import only the standard library, orjson and the base modules (config, shared_table, logs).
"""
