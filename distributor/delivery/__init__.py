"""The delivery side: routing, per-analyzer queues and senders, analyzer health and the analyzer set.

May import only the base modules (config, shared_table, logs); never ingest/, workers/, control/ or tools/.
"""
