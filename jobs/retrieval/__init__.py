"""Retrieval over the store, where the two jobs meet: dense, BM25 and fused retrievers, query rewriting, and
the retrieval check (hit@k, MRR)."""
