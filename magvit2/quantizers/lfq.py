"""Lookup-free quantization (LFQ, MAGVIT-v2) with an exact entropy loss that never builds an N x 2^K tensor.

Index order. Channel d of a token gives bit b_d = [z_d > 0] (z_d == 0 gives bit 0, code -1) and the index is
least significant bit first: idx = sum_d b_d 2^d. Sub-token splitting (subtokens.py) slices the same bits LSB
first, so sub-token 1 of a [6, 12] factorization is idx & 63 = channels 0..5.

Factorization trick. The reference scores every code c in {-1,+1}^K with logit 2 z.c / tau and takes
p = softmax over the 2^K codes. The logit is a sum over channels, so the softmax is a product of per-channel
two-way softmaxes:
    p(c) = prod_d exp(2 z_d c_d / tau) / (exp(2 z_d / tau) + exp(-2 z_d / tau)) = prod_d sigmoid(4 c_d z_d / tau).
Hence (i) a token's entropy is the sum of its K Bernoulli entropies, and (ii) the batch-mean distribution over
codes, split into the low bits A and high bits B, is p_bar[b, a] = (1/N) sum_n P_B[n, b] P_A[n, a] = (P_B^T P_A / N),
where P_A (N x 2^|A|) and P_B (N x 2^|B|) are each token's joint over one half of the bits: one matmul with 2^K
outputs. Flattened row-major, p_bar[b * 2^|A| + a] is exactly p_bar[idx].

eps. The reference computes the sample entropy from log_softmax(logits / tau + eps): adding one constant to every
logit leaves log_softmax unchanged, so eps has no effect there and the Bernoulli sum is exact. It computes the
codebook entropy as -sum p_bar log(p_bar + eps); we hold p_bar itself, so we apply eps the same way. Both terms and
their gradients match the dense formula to rounding (tests/test_lfq.py checks rel err <= 1e-5 in float64).

Distributed. codebook_entropy="local" (the original's) computes H_codebook over each process's own tokens, so it
is capped at ln(N_local). With codebook_entropy="global" and torch.distributed initialized, the unnormalized p_bar
(and the token count) is summed over processes before the entropy, so H_codebook is that of the global batch: a
different objective. The sum's backward is again a sum over processes, so each process gets
world_size x its local partial derivative, and DDP's gradient averaging then yields exactly the gradient of the
global codebook entropy. Every process must call forward in training mode the same number of times (it is a
collective). In eval mode the codebook entropy is local only (no collective, so evaluating on one rank is safe).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .base import QuantizerOutput, _distributed

MAX_BITS = 30  # the codebook entropy holds 2^K floats (4 GiB at K = 30)


# ----------------------------------------------------------------------------------------------- index <-> bits


def indices_to_bits(indices: Tensor, bits: int) -> Tensor:
    """(...) integer indices -> (..., bits) bool, bit d = (idx >> d) & 1 (LSB first)."""
    if indices.is_floating_point() or indices.is_complex():
        raise ValueError(f"indices must be an integer tensor, got dtype {indices.dtype}")
    shifts = torch.arange(bits, device=indices.device, dtype=torch.int64)
    return ((indices.long().unsqueeze(-1) >> shifts) & 1).bool()


def bits_to_indices(bitmask: Tensor) -> Tensor:
    """(..., K) bool or 0/1 -> (...) int64, idx = sum_d b_d 2^d (LSB first)."""
    k = bitmask.shape[-1]
    if k > 62:
        raise ValueError(f"bitmask has {k} bits in its last dim; int64 indices hold at most 62")
    weights = torch.ones((), dtype=torch.int64, device=bitmask.device) << torch.arange(
        k, device=bitmask.device, dtype=torch.int64
    )
    return (bitmask.to(torch.int64) * weights).sum(-1)


def bits_to_codes(bitmask: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """(..., K) bits -> (..., K) codes in {-1, +1}."""
    return bitmask.to(dtype) * 2 - 1


# ----------------------------------------------------------------------------------------------- entropy


def _check_flat(z_flat: Tensor, tau: float) -> None:
    if z_flat.ndim != 2 or z_flat.shape[0] == 0 or z_flat.shape[1] == 0:
        raise ValueError(f"z_flat must be (N tokens, K bits) with N, K >= 1, got shape {tuple(z_flat.shape)}")
    if z_flat.shape[1] > MAX_BITS:
        raise ValueError(f"z_flat has K = {z_flat.shape[1]} bits; the entropy needs 2^K floats, use K <= {MAX_BITS}")
    if not tau > 0:
        raise ValueError(f"tau must be > 0 (the reference uses 0.01), got {tau}")


def _entropy_dtype(z: Tensor) -> Tensor:
    # float32 at least, even when the encoder ran in bf16/fp16: 2^K probabilities of size ~1/N do not survive bf16.
    return z if z.dtype == torch.float64 else z.float()


def _bernoulli_entropy(x: Tensor) -> Tensor:
    """Entropy (nats) of a Bernoulli with logit x, as p softplus(-x) + (1-p) softplus(x): both terms are >= 0, so
    there is no cancellation when the bit is nearly certain (|x| large, the usual case at tau = 0.01)."""
    return torch.sigmoid(x) * F.softplus(-x) + torch.sigmoid(-x) * F.softplus(x)


def _joint(p1: Tensor, p0: Tensor) -> Tensor:
    """Per-token joint over k independent bits: p1, p0 (N, k) = P(bit = 1), P(bit = 0) -> (N, 2^k), LSB first."""
    joint = p1.new_ones(p1.shape[0], 1)
    for d in range(p1.shape[1]):
        # appending the bit-1 half after the bit-0 half puts bit d at weight 2^d
        joint = torch.cat([joint * p0[:, d : d + 1], joint * p1[:, d : d + 1]], dim=1)
    return joint


def _codebook_counts(x: Tensor) -> Tensor:
    """Sum over tokens of p(code | token), (2^K,) indexed LSB first, from per-bit logits x (N, K)."""
    ka = x.shape[1] // 2  # A = low bits, B = high bits
    p1, p0 = torch.sigmoid(x), torch.sigmoid(-x)  # sigmoid(-x), not 1 - sigmoid(x): keeps tiny p0 accurate
    pa, pb = _joint(p1[:, :ka], p0[:, :ka]), _joint(p1[:, ka:], p0[:, ka:])
    return (pb.T @ pa).flatten()  # [b, a] -> b * 2^|A| + a = idx


class _AllReduceSum(torch.autograd.Function):
    """Differentiable all-reduce (sum). torch.distributed.nn.functional.all_reduce does the same but is deprecated
    (FutureWarning on every call in torch 2.14); the backward sums the incoming gradients over processes."""

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:  # noqa: D102
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # noqa: D102
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def codebook_probs(z_flat: Tensor, tau: float = 0.01) -> Tensor:
    """Local batch-mean code distribution p_bar (2^K,), LSB-first index order (no all-reduce)."""
    _check_flat(z_flat, tau)
    with torch.autocast(device_type=z_flat.device.type, enabled=False):
        x = 4.0 * _entropy_dtype(z_flat) / tau
        return _codebook_counts(x) / x.shape[0]


def entropy_terms(z_flat: Tensor, tau: float = 0.01, eps: float = 1e-5, sync: bool = True) -> tuple[Tensor, Tensor]:
    """Exact (H_sample, H_codebook) in nats for z_flat (N, K), as the reference's dense softmax over 2^K codes.

    H_sample = mean over tokens of H(p(.|z_n)) = mean_n sum_d H_bernoulli(sigmoid(4 z_nd / tau)).
    H_codebook = -sum_c p_bar(c) log(p_bar(c) + eps), p_bar = mean over tokens (over all processes when `sync` and
    torch.distributed is initialized) of p(c|z_n). Computed in float32 (float64 if given) with autocast off.
    """
    _check_flat(z_flat, tau)
    with torch.autocast(device_type=z_flat.device.type, enabled=False):
        x = 4.0 * _entropy_dtype(z_flat) / tau  # logit of P(channel quantizes to +1)
        h_sample = _bernoulli_entropy(x).sum(1).mean()
        counts = _codebook_counts(x)
        n = x.new_full((1,), float(x.shape[0]))
        if sync and _distributed():
            packed = _AllReduceSum.apply(torch.cat([counts, n]))  # one collective for counts and token count
            counts, n = packed[:-1], packed[-1:].detach()
        p_bar = counts / n
        h_codebook = -(p_bar * torch.log(p_bar + eps)).sum()
    return h_sample, h_codebook


def dense_entropy_terms(z_flat: Tensor, tau: float = 0.01, eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """The reference's formula with the full N x 2^K matrix (tests and benchmarks only: 4.3 GB at K=18, N=4096)."""
    _check_flat(z_flat, tau)
    k = z_flat.shape[1]
    codes = bits_to_codes(indices_to_bits(torch.arange(2**k, device=z_flat.device), k), z_flat.dtype)
    logits = 2 * z_flat @ codes.T  # = -||z - c||^2 + const
    probs = torch.softmax(logits / tau, dim=-1)
    log_probs = torch.log_softmax(logits / tau + eps, dim=-1)
    h_sample = -(probs * log_probs).sum(-1).mean()
    avg = probs.mean(0)
    h_codebook = -(avg * torch.log(avg + eps)).sum()
    return h_sample, h_codebook


# ----------------------------------------------------------------------------------------------- module


class LFQ(nn.Module):
    """Lookup-free quantizer: each of the K latent channels is a sign bit, 2^K implicit codes, no codebook.

    loss = commit_weight * MSE(z, sign(z)) + entropy_weight * (sample_weight * H_sample - codebook_weight * H_codebook)
    (low per-token entropy = confident bits; high codebook entropy = all codes used).
    The entropy terms are computed in every mode (cheap: one 2^(K/2) x N x 2^(K/2) matmul) so evaluation can log
    them; they are all-reduced only in training mode with grad enabled (codebook_entropy="global"), never in eval.
    """

    def __init__(
        self,
        bits: int = 18,
        commit_weight: float = 0.25,
        entropy_weight: float = 0.1,
        sample_weight: float = 1.0,
        codebook_weight: float = 1.0,
        tau: float = 0.01,
        eps: float = 1e-5,
        codebook_entropy: str = "local",
    ):
        super().__init__()
        if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= MAX_BITS:
            raise ValueError(f"bits must be an int in [1, {MAX_BITS}] (the reference uses 18), got {bits!r}")
        if not tau > 0:
            raise ValueError(f"tau must be > 0 (the reference uses 0.01), got {tau}")
        if codebook_entropy not in ("local", "global"):
            raise ValueError(f"codebook_entropy={codebook_entropy!r}: use 'local' (the original's, per process) or "
                             f"'global' (all-reduced over processes)")
        if eps < 0:
            raise ValueError(f"eps must be >= 0 (the reference uses 1e-5), got {eps}")
        self.bits = bits
        self.dim = bits
        self.codebook_size = 2**bits
        self.commit_weight = commit_weight
        self.entropy_weight = entropy_weight
        self.sample_weight = sample_weight
        self.codebook_weight = codebook_weight
        self.tau = tau
        self.eps = eps
        self.codebook_entropy = codebook_entropy

    def extra_repr(self) -> str:
        return (f"bits={self.bits}, tau={self.tau}, entropy_weight={self.entropy_weight}, "
                f"codebook_entropy={self.codebook_entropy}")

    def forward(self, z: Tensor) -> QuantizerOutput:
        if z.ndim != 4 or z.shape[1] != self.dim:
            raise ValueError(f"LFQ expects z of shape (B, {self.dim}, H, W) (channels = bits), got {tuple(z.shape)}")
        bitmask = z > 0
        q = bits_to_codes(bitmask, z.dtype)
        codes = z + (q - z).detach()  # straight-through: value q, gradient identity to z
        indices = bits_to_indices(bitmask.movedim(1, -1))
        commit = F.mse_loss(z.float(), q.float())

        # The entropy terms are also computed (without grad, locally) when they do not enter the loss, for logging.
        with_grad = self.entropy_weight != 0 and torch.is_grad_enabled()
        with torch.set_grad_enabled(with_grad):
            h_sample, h_codebook = entropy_terms(
                rearrange(z, "b k h w -> (b h w) k"),
                self.tau,
                self.eps,
                sync=self.codebook_entropy == "global" and self.training and with_grad,
            )
        entropy = self.sample_weight * h_sample - self.codebook_weight * h_codebook
        loss = self.commit_weight * commit + self.entropy_weight * entropy

        used = torch.zeros(self.codebook_size, device=z.device).index_fill_(0, indices.flatten(), 1.0)
        stats = {
            "commit": commit,
            "entropy_sample": h_sample,
            "entropy_codebook": h_codebook,
            "entropy_aux": entropy,
            "unique_codes": used.sum(),  # distinct codes in this batch (no device sync, unlike torch.unique)
        }
        return QuantizerOutput(codes, indices, loss, {k: v.detach() for k, v in stats.items()})

    def indices_to_codes(self, indices: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """(B, H, W) indices -> (B, K, H, W) codes in {-1, +1} (what the decoder gets)."""
        if indices.ndim != 3:
            raise ValueError(f"indices must be (B, H, W), got shape {tuple(indices.shape)}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.codebook_size):
            raise ValueError(f"indices must lie in [0, {self.codebook_size}) for bits={self.bits}")
        return bits_to_codes(indices_to_bits(indices, self.bits), dtype).movedim(-1, 1)
