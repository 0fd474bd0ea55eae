"""Training backends: where the one training entrypoint runs. Only the launcher differs."""
