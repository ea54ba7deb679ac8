"""Memory: nearest-item search, K-means, memory-reduce and server aggregation (pure torch + FAISS)."""
