"""Privacy: the accountant, and the attacks that measure what uploads leak (the noise itself is
:mod:`feddymem.memory.noise`, beside the memory-reduce it protects)."""
