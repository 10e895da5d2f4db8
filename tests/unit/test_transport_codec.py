import pytest
import torch

from bimdist.distributed.transport import DATA, END, Message, PeerError, pack, parse_header, unpack


def test_pack_roundtrip_mixed_dtypes():
    tensors = [torch.randn(3, 5, 7).to(torch.bfloat16), torch.randint(0, 49, (3, 49), dtype=torch.int16),
               torch.randint(0, 255, (3, 1, 28, 28), dtype=torch.uint8), torch.randn(2, 3)]
    header, payload = pack(Message(DATA, 17, tensors), torch.device("cpu"))
    assert header.dtype == torch.int64 and payload.dtype == torch.uint8
    kind, step, reason, specs, nbytes = parse_header(header)
    assert (kind, step, reason) == (DATA, 17, 0) and nbytes == payload.numel()
    out = unpack(specs, payload)
    for a, b in zip(tensors, out):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def test_end_message_has_no_payload():
    header, payload = pack(Message(END, 5, reason=3), torch.device("cpu"))
    kind, step, reason, specs, nbytes = parse_header(header)
    assert (kind, step, reason, specs, nbytes, payload.numel()) == (END, 5, 3, [], 0, 0)


def test_foreign_header_is_rejected():
    with pytest.raises(PeerError, match="not a bimdist"):
        parse_header(torch.zeros(64, dtype=torch.int64))
