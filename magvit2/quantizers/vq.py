"""Classic vector quantization at LFQ's codebook size, for the LFQ-vs-VQ ablation.

Cosine-similarity VQ as in ViT-VQGAN: encoder outputs and codes are l2-normalized low-dimensional vectors, the
nearest code is the one with the largest dot product, and the decoder gets the (unit-norm) code. The lookup is
chunked over codes and tokens, so memory stays at token_chunk x chunk similarities even for 2^18 codes.

distance="euclidean" is the plain VQ of VQGAN (Esser et al. 2021), the ablation's baseline: raw (not normalized)
vectors, nearest code by L2 distance, codes initialized uniform(-1/C, 1/C) as there; run it with restart_dead=false.

Dead codes: a code unused for `dead_after` consecutive training steps (usage summed over processes) is re-initialized
every `restart_every` steps from a pool of recent encoder outputs (plus a little noise); the new rows come from rank
0 so every process keeps the same codebook.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .base import QuantizerOutput, _distributed


def _default_chunks(device: torch.device) -> tuple[int, int]:
    # (codes, tokens) per block. CPU: a 4 MB block stays in cache (measured 2-4x faster than 64 MB blocks at
    # 2^18 codes, dim 8). GPU: 256 MB blocks keep the number of kernel launches small.
    return (32768, 2048) if device.type == "cuda" else (2048, 512)


@torch.no_grad()
def nearest_code(z: Tensor, codebook: Tensor, chunk: int | None = None, token_chunk: int | None = None) -> Tensor:
    """argmax_c <z_n, codebook_c> for z (N, D), codebook (C, D) -> (N,) int64, holding at most
    token_chunk x chunk similarities at a time (ties go to the lower index). None = a per-device default."""
    default_chunk, default_tokens = _default_chunks(z.device)
    chunk, token_chunk = chunk or default_chunk, token_chunk or default_tokens
    codebook_t = codebook.T.contiguous()  # (D, C): contiguous column blocks, measured ~1.7x faster on CPU
    out = torch.empty(z.shape[0], dtype=torch.int64, device=z.device)
    for t0 in range(0, z.shape[0], token_chunk):
        zt = z[t0 : t0 + token_chunk]
        best = torch.full((zt.shape[0],), -torch.inf, dtype=zt.dtype, device=z.device)
        best_idx = torch.zeros(zt.shape[0], dtype=torch.int64, device=z.device)
        for c0 in range(0, codebook.shape[0], chunk):
            sim = zt @ codebook_t[:, c0 : c0 + chunk]
            val = sim.amax(dim=1)  # ~3x cheaper than max(dim=1) with indices on CPU
            rows = (val > best).nonzero().squeeze(1)
            # the running best improves ever more rarely (~1/block), so argmax runs on few rows
            best_idx[rows] = sim[rows].argmax(dim=1) + c0
            best[rows] = val[rows]
        out[t0 : t0 + token_chunk] = best_idx
    return out


class VQ(nn.Module):
    """Cosine-similarity vector quantizer with dead-code restart.

    loss = MSE(sg(z), e) (codebook) + commit_weight * MSE(z, sg(e)) (commitment), on l2-normalized vectors.
    """

    def __init__(
        self,
        codebook_size: int = 2**18,
        dim: int = 8,
        commit_weight: float = 0.25,
        restart_dead: bool = True,
        dead_after: int = 1000,
        chunk: int | None = None,
        token_chunk: int | None = None,
        restart_every: int = 100,
        pool_size: int = 65536,
        restart_noise: float = 0.05,
        distance: str = "cosine",
    ):
        super().__init__()
        for name, value in [("codebook_size", codebook_size), ("dim", dim), ("dead_after", dead_after),
                            ("chunk", chunk or 1), ("token_chunk", token_chunk or 1), ("restart_every", restart_every),
                            ("pool_size", pool_size)]:
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"VQ {name} must be an int >= 1{' or None (auto)' if 'chunk' in name else ''}, "
                                 f"got {value!r}")
        if distance not in ("cosine", "euclidean"):
            raise ValueError(f"VQ distance must be 'cosine' (l2-normalized codes) or 'euclidean' (VQGAN's), "
                             f"got {distance!r}")
        self.distance = distance
        self.codebook_size = codebook_size
        self.dim = dim
        self.commit_weight = commit_weight
        self.restart_dead = restart_dead
        self.dead_after = dead_after
        self.chunk = chunk
        self.token_chunk = token_chunk
        self.restart_every = restart_every
        self.restart_noise = restart_noise
        init = (F.normalize(torch.randn(codebook_size, dim), dim=1) if distance == "cosine"
                else torch.empty(codebook_size, dim).uniform_(-1 / codebook_size, 1 / codebook_size))
        self.embedding = nn.Parameter(init)
        # training steps since each code was last selected (anywhere in the global batch)
        self.register_buffer("steps_unused", torch.zeros(codebook_size, dtype=torch.int32))
        # Recent normalized encoder outputs (per process) to restart from. A plain attribute, not a buffer: it is a
        # cache (refilled within a few steps after resume) and DDP would otherwise broadcast it every step.
        self.pool_size = pool_size
        self._pool: Tensor | None = None
        self._pool_ptr = 0
        self._pool_count = 0
        self._steps = 0  # training steps seen by this process (restart cadence only; python int: no device sync)
        self.last_restarted = 0

    def extra_repr(self) -> str:
        return f"codebook_size={self.codebook_size}, dim={self.dim}, distance={self.distance}"

    def normalized_codebook(self) -> Tensor:
        """The codes the decoder gets: unit-norm (cosine) or as learned (euclidean)."""
        e = self.embedding.float()
        return F.normalize(e, dim=1) if self.distance == "cosine" else e

    def _nearest(self, z: Tensor, codebook: Tensor) -> Tensor:
        if self.distance == "cosine":
            return nearest_code(z, codebook, self.chunk, self.token_chunk)
        # argmin |z - c|^2 = argmax <[z, 1], [c, -|c|^2 / 2]>: the same chunked max-dot-product search
        half_norm = -0.5 * codebook.pow(2).sum(1, keepdim=True)
        return nearest_code(torch.cat([z, z.new_ones(z.shape[0], 1)], 1), torch.cat([codebook, half_norm], 1),
                            self.chunk, self.token_chunk)

    def forward(self, z: Tensor) -> QuantizerOutput:
        if z.ndim != 4 or z.shape[1] != self.dim:
            raise ValueError(f"VQ expects z of shape (B, {self.dim}, H, W) (channels = dim), got {tuple(z.shape)}")
        b, _, h, w = z.shape
        track = self.training and torch.is_grad_enabled()
        if track and self.restart_dead and self._steps > 0 and self._steps % self.restart_every == 0:
            self._restart()  # before the lookup, so revived codes can be chosen at once and the graph sees one codebook
        with torch.autocast(device_type=z.device.type, enabled=False):  # argmax over 2^18 codes needs fp32
            zn = rearrange(z, "b d h w -> (b h w) d").float()
            zn = F.normalize(zn, dim=1) if self.distance == "cosine" else zn
            codebook = self.normalized_codebook()
            idx = self._nearest(zn.detach(), codebook.detach())
            e = codebook[idx]  # gradient reaches only the selected rows
            codebook_loss = F.mse_loss(e, zn.detach())
            commit = F.mse_loss(zn, e.detach())
            q = zn + (e - zn).detach()  # straight-through to the encoder
        codes = rearrange(q, "(b h w) d -> b d h w", b=b, h=h, w=w).to(z.dtype)
        indices = idx.view(b, h, w)
        loss = codebook_loss + self.commit_weight * commit

        used = torch.zeros(self.codebook_size, device=z.device).index_fill_(0, idx, 1.0)
        stats = {"commit": commit.detach(), "codebook": codebook_loss.detach(), "unique_codes": used.sum()}
        if track:
            self._track_usage(used, zn.detach())
        stats["dead_codes"] = (self.steps_unused >= self.dead_after).float().mean()
        stats["restarted"] = z.new_tensor(float(self.last_restarted), dtype=torch.float32)
        return QuantizerOutput(codes, indices, loss, stats)

    @torch.no_grad()
    def _track_usage(self, used: Tensor, zn: Tensor) -> None:
        if _distributed():
            dist.all_reduce(used, op=dist.ReduceOp.MAX)
        self.steps_unused.add_(1).masked_fill_(used > 0, 0)
        self._steps += 1
        self._push_pool(zn)

    @torch.no_grad()
    def _push_pool(self, zn: Tensor) -> None:
        size = self.pool_size
        if self._pool is None or self._pool.device != zn.device:
            self._pool, self._pool_ptr, self._pool_count = zn.new_zeros(size, self.dim), 0, 0
        m = min(zn.shape[0], size)
        rows = zn[torch.randperm(zn.shape[0], device=zn.device)[:m]]
        slots = (self._pool_ptr + torch.arange(m, device=zn.device)) % size
        self._pool[slots] = rows
        self._pool_ptr = (self._pool_ptr + m) % size
        self._pool_count = min(self._pool_count + m, size)

    @torch.no_grad()
    def _restart(self) -> None:
        dead = self.steps_unused >= self.dead_after  # identical on all processes (usage was all-reduced)
        n_dead = int(dead.sum())
        self.last_restarted = n_dead
        if n_dead == 0 or self._pool is None or self._pool_count == 0:
            return
        pool = self._pool.to(self.embedding.device)
        pick = torch.randint(0, self._pool_count, (n_dead,), device=pool.device)
        rows = pool[pick] + self.restart_noise * torch.randn(n_dead, self.dim, device=pool.device)
        rows = (F.normalize(rows, dim=1) if self.distance == "cosine" else rows).to(self.embedding.dtype)
        if _distributed():
            dist.broadcast(rows, src=0)
        self.embedding.data[dead] = rows
        self.steps_unused[dead] = 0

    @torch.no_grad()
    def indices_to_codes(self, indices: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """(B, H, W) indices -> (B, dim, H, W) codes (what the decoder gets)."""
        if indices.ndim != 3 or indices.is_floating_point():
            raise ValueError(f"indices must be an integer (B, H, W) tensor, got {indices.dtype} {tuple(indices.shape)}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.codebook_size):
            raise ValueError(f"indices must lie in [0, {self.codebook_size})")
        return self.normalized_codebook()[indices].to(dtype).movedim(-1, 1)
