"""Server-side checks of a client's upload: nothing malformed, huge or non-finite reaches the server's
K-means (memory banks) or its average (generator parameters of the FedAvg/FedProx baselines)."""

from __future__ import annotations

import torch

from feddymem.memory.reduce import MemoryBank


def payload_bytes(payload: MemoryBank | dict[str, torch.Tensor] | torch.Tensor | None) -> int:
    """Bytes of what crosses the client boundary: a memory bank, a parameter dict or a tensor."""
    if payload is None:
        return 0
    if isinstance(payload, MemoryBank):
        return payload.nbytes
    tensors = payload.values() if isinstance(payload, dict) else [payload]
    return sum(t.element_size() * t.nelement() for t in tensors)


class UploadRejected(Exception):
    """An upload the server refuses; the message names the client and the reason."""


def validate_upload(client_id: int, bank: object, *, dim: int, max_items: int, max_bytes: int) -> MemoryBank:
    """Return ``bank`` if it is a well-formed memory upload, else raise :class:`UploadRejected`."""

    def reject(reason: str) -> UploadRejected:
        return UploadRejected(f"upload of client {client_id} rejected: {reason}")

    if not isinstance(bank, MemoryBank):
        raise reject(f"expected a memory bank, got {type(bank).__name__}")
    items, weights = bank.items, bank.weights
    if not isinstance(items, torch.Tensor) or not isinstance(weights, torch.Tensor):
        raise reject("items and weights must be tensors")
    if items.dtype != torch.float32 or weights.dtype != torch.float32:
        raise reject(f"dtype must be float32, got items {items.dtype} and weights {weights.dtype}")
    if items.dim() != 2 or items.shape[1] != dim:
        raise reject(f"items must be (M, {dim}), got {tuple(items.shape)}")
    if not 1 <= items.shape[0] <= max_items:
        raise reject(f"{items.shape[0]} items, allowed 1 to {max_items}")
    if weights.shape != (items.shape[0],):
        raise reject(f"weights must be ({items.shape[0]},), got {tuple(weights.shape)}")
    if not torch.isfinite(items).all() or not torch.isfinite(weights).all():
        raise reject("non-finite values (NaN or inf)")
    if (weights <= 0).any():
        raise reject("weights must be positive")
    if bank.nbytes > max_bytes:
        raise reject(f"{bank.nbytes} bytes, limit {max_bytes}")
    return bank


def validate_parameters(
    client_id: int, params: object, *, reference: dict[str, torch.Tensor], max_bytes: int
) -> dict[str, torch.Tensor]:
    """Return ``params`` if it has exactly ``reference``'s names, shapes and dtypes and finite values."""

    def reject(reason: str) -> UploadRejected:
        return UploadRejected(f"upload of client {client_id} rejected: {reason}")

    if not isinstance(params, dict) or not all(isinstance(v, torch.Tensor) for v in params.values()):
        raise reject(f"expected a dict of tensors, got {type(params).__name__}")
    if set(params) != set(reference):
        raise reject(
            f"parameter names differ: missing {sorted(set(reference) - set(params))}, "
            f"unexpected {sorted(set(params) - set(reference))}"
        )
    for name, value in params.items():
        if value.shape != reference[name].shape or value.dtype != reference[name].dtype:
            raise reject(
                f"'{name}' is {tuple(value.shape)} {value.dtype}, "
                f"expected {tuple(reference[name].shape)} {reference[name].dtype}"
            )
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise reject(f"non-finite values (NaN or inf) in '{name}'")
    size = payload_bytes(params)
    if size > max_bytes:
        raise reject(f"{size} bytes, limit {max_bytes}")
    return params
