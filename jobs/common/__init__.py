"""Shared parts of both jobs: configuration, errors, files, logging, threads, devices, URLs, the embedder
and the question-set format."""
