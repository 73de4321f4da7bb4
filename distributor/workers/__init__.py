"""Worker kinds started by the supervisor; one module per kind."""
