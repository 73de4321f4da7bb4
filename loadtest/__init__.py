"""Load, stress and benchmark tooling (targets 127.0.0.1 only)."""
