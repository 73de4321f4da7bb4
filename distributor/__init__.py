"""Log distributor: routes whole log packets to weighted analyzers by message count."""

__version__ = "0.1.0"
