import pytest
import torch

from feddymem.federation.upload import UploadRejected, validate_parameters, validate_upload
from feddymem.memory.reduce import MemoryBank


def _bank(items, weights=None):
    return MemoryBank(items, torch.ones(items.shape[0]) if weights is None else weights, 3)


def check(bank):
    return validate_upload(4, bank, dim=8, max_items=100, max_bytes=3000)


def test_good_upload_passes():
    bank = _bank(torch.randn(10, 8))
    assert check(bank) is bank


@pytest.mark.parametrize(
    ("bank", "reason"),
    [
        ("not a bank", "expected a memory bank, got str"),
        (_bank(torch.randn(10, 8).double(), torch.ones(10)), "dtype must be float32"),
        (_bank(torch.randn(10, 7)), r"items must be \(M, 8\)"),
        (_bank(torch.randn(0, 8)), "0 items, allowed 1 to 100"),
        (_bank(torch.randn(101, 8)), "101 items"),
        (_bank(torch.full((10, 8), float("nan"))), "non-finite"),
        (_bank(torch.randn(10, 8), torch.zeros(10)), "weights must be positive"),
        (_bank(torch.randn(10, 8), torch.ones(9)), r"weights must be \(10,\)"),
        (_bank(torch.randn(99, 8)), "bytes, limit 3000"),
    ],
)
def test_bad_uploads_are_rejected_naming_the_client(bank, reason):
    with pytest.raises(UploadRejected, match=f"upload of client 4 rejected: .*{reason}"):
        check(bank)


def test_parameter_upload_must_match_the_reference():
    reference = {"w": torch.zeros(3, 2), "b": torch.zeros(3)}
    good = {"w": torch.ones(3, 2), "b": torch.ones(3)}
    assert validate_parameters(1, good, reference=reference, max_bytes=1000) is good
    for bad, reason in [
        ({"w": torch.ones(3, 2)}, r"parameter names differ: missing \['b'\]"),
        ({"w": torch.ones(2, 2), "b": torch.ones(3)}, r"'w' is \(2, 2\)"),
        ({"w": torch.full((3, 2), float("inf")), "b": torch.ones(3)}, "non-finite values .* in 'w'"),
        ([1, 2], "expected a dict of tensors, got list"),
    ]:
        with pytest.raises(UploadRejected, match=f"upload of client 1 rejected: {reason}"):
            validate_parameters(1, bad, reference=reference, max_bytes=1000)
    with pytest.raises(UploadRejected, match="36 bytes, limit 10"):
        validate_parameters(1, good, reference=reference, max_bytes=10)
