"""Multi-host tests of a sharded fleet in network namespaces (``pytest -m fleet``)."""
