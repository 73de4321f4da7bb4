"""The data-port side: HTTP/1.1 framing, the packet contract, rate limits and the ingest hot path.

May import delivery/, wal/ and the base modules (config, shared_table, logs); never workers/, control/ or tools/.
"""
