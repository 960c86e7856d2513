"""Tools around the jobs: the benchmark, retrieval tuning, the local model server, model preparation."""
