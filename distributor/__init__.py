"""Log distributor: routes whole log packets to weighted analyzers by message count.

Layers, each importing only those below it: control/ and tools/ -> supervisor -> workers/ -> ingest/
-> delivery/ and wal/ -> config, shared_table, logs. docs/architecture.md has the map.
"""

__version__ = "0.1.0"
