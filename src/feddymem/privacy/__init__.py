"""Privacy: noisy uploads with an accountant, and the attacks that measure what uploads leak."""
