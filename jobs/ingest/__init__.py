"""The ingest job, a pipeline: source -> documents -> chunks -> embeddings -> store (``python -m jobs.ingest``)."""
