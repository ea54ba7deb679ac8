"""Memory: nearest-item search, K-means, memory-reduce (with its privacy noise) and server aggregation
(pure torch + FAISS)."""
