"""Analyzer service: a real HTTP sink for the log distributor.

It counts packets/messages, deduplicates by ``(emitter_id, packet_id)`` and can
inject faults (delay, errors, stalls) so tests, demos and benchmarks exercise
the distributor against something that behaves like a real downstream.
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
