"""Sub-token factorization of LFQ indices: LSB-first slices, round trips, validation."""

import pytest
import torch

from magvit2.quantizers import LFQ, merge_subtokens, split_indices, validate_bits

SPLITS = [[18], [6, 12], [9, 9], [12, 6], [6, 6, 6], [3, 6, 9]]


@pytest.mark.parametrize("bits", SPLITS)
def test_split_merge_round_trip(bits):
    g = torch.Generator().manual_seed(sum(b * 31**i for i, b in enumerate(bits)))
    idx = torch.randint(0, 2**18, (4, 16, 16), generator=g)
    idx[0, 0, :3] = torch.tensor([0, 2**18 - 1, 2**17])  # extremes
    sub = split_indices(idx, bits)
    assert sub.shape == (4, 16, 16, len(bits)) and sub.dtype == torch.int64
    for j, k in enumerate(bits):  # each sub-token within its own vocabulary
        assert int(sub[..., j].min()) >= 0 and int(sub[..., j].max()) < 2**k
    assert torch.equal(merge_subtokens(sub, bits), idx)


@pytest.mark.parametrize("bits", SPLITS)
def test_split_matches_python_bit_arithmetic(bits):
    idx = torch.randint(0, 2**18, (200,), generator=torch.Generator().manual_seed(1))
    sub = split_indices(idx, bits)
    for n, i in enumerate(idx.tolist()):
        expected, offset = [], 0
        for k in bits:  # independent: python ints, string slicing of the binary expansion (LSB first)
            lsb_first = format(i, "018b")[::-1]
            expected.append(int(lsb_first[offset : offset + k][::-1], 2))
            offset += k
        assert sub[n].tolist() == expected


def test_k6_12_is_reference_split():
    idx = torch.randint(0, 2**18, (1000,), generator=torch.Generator().manual_seed(2))
    sub = split_indices(idx, [6, 12])
    assert torch.equal(sub[:, 0], idx & 63)
    assert torch.equal(sub[:, 1], idx >> 6)


def test_subtoken_one_is_the_first_channels_of_lfq():
    # with LSB-first indices, sub-token 1 of [6, 12] is determined by latent channels 0..5 only
    lfq = LFQ(bits=18)
    z = torch.randn(2, 18, 4, 4)
    z2 = z.clone()
    z2[:, 6:] = torch.randn(2, 12, 4, 4)
    s, s2 = split_indices(lfq(z).indices, [6, 12]), split_indices(lfq(z2).indices, [6, 12])
    assert torch.equal(s[..., 0], s2[..., 0])
    assert not torch.equal(s[..., 1], s2[..., 1])


def test_validate_bits():
    validate_bits([6, 12], 18)
    validate_bits((9, 9), 18)
    with pytest.raises(ValueError, match=r"\[6, 6\].*12.*18"):
        validate_bits([6, 6], 18)
    with pytest.raises(ValueError, match="18"):
        validate_bits([0, 18], 18)
    with pytest.raises(ValueError, match="18"):
        validate_bits([-3, 21], 18)
    with pytest.raises(ValueError):
        validate_bits([], 18)
    with pytest.raises(ValueError):
        validate_bits([6.0, 12.0], 18)


def test_bad_inputs():
    with pytest.raises(ValueError, match="integer"):
        split_indices(torch.zeros(3), [6, 12])
    with pytest.raises(ValueError, match="last dim"):
        merge_subtokens(torch.zeros(3, 3, dtype=torch.int64), [6, 12])
    with pytest.raises(ValueError):
        split_indices(torch.zeros(3, dtype=torch.int64), [0, 18])
