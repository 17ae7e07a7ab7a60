"""Candidate retrieval and ranking: a vector index over item vectors, item metadata, and the
pure ranking logic (`Retriever`) that the retrieval deployment wraps."""
