"""Worker kinds started by the supervisor; one module per kind.

May import ingest/, delivery/, wal/ and the base modules; never the supervisor, control/ or tools/.
"""
