"""Llama building blocks for the AR generator: RMSNorm, SwiGLU, attention with 2D RoPE and a static KV cache.

RoPE convention (real arithmetic, interleaved pairs): the head dim is split into head_dim / 2 rotation pairs
(x[2i], x[2i+1]); the first half of the pairs is rotated by the row index, the second half by the column index,
each half with frequencies base^(-2i / (head_dim / 2)). A pair rotated by angle a at the query and b at the key
contributes a term depending only on a - b, so scores depend only on (row, column) differences.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def ffn_hidden(dim: int, multiple_of: int = 256) -> int:
    """SwiGLU width: int(8 dim / 3) rounded up to a multiple of `multiple_of` (Llama / LlamaGen)."""
    hidden = int(8 * dim / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def rope_2d_angles(rows: Tensor, cols: Tensor, head_dim: int, base: float = 10000.0) -> Tensor:
    """Rotation angles (N, head_dim / 2) for tokens at integer grid positions (rows[n], cols[n])."""
    if head_dim % 4:
        raise ValueError(f"head_dim={head_dim}: 2D RoPE needs a multiple of 4 (two axes x pairs); change dim/n_heads")
    axis_dim = head_dim // 2  # dims rotated by each axis
    freqs = base ** (-torch.arange(0, axis_dim, 2, dtype=torch.float64, device=rows.device) / axis_dim)
    ang_r = rows.to(torch.float64)[:, None] * freqs
    ang_c = cols.to(torch.float64)[:, None] * freqs
    return torch.cat([ang_r, ang_c], dim=-1)


def rope_table(grid: int, head_dim: int, base: float = 10000.0, class_row: str = "zero") -> tuple[Tensor, Tensor]:
    """cos, sin (grid*grid + 1, head_dim/2): row 0 for the class slot, row i >= 1 for token i-1 (the inter sequence
    [class, e_0, ..., e_{T-2}] uses the first T rows; the original's table has all T + 1).

    Input slot i >= 1 holds token i-1 and is rotated by that token's (row, col). Slot 0 (the class embedding) has no
    grid position: class_row="zero" (the original's, LlamaGen's layout) gives it cos = sin = 0, which zeroes the
    class slot's q and k; class_row="identity" gives it angle 0, a position-free prefix whose q and k stay live.
    """
    if class_row not in ("zero", "identity"):
        raise ValueError(f"class_row={class_row!r}: use 'zero' (the original's) or 'identity'")
    T = grid * grid
    tok = torch.arange(T)
    ang = rope_2d_angles(tok // grid, tok % grid, head_dim, base)
    cos, sin = ang.cos().float(), ang.sin().float()
    first = torch.zeros(1, head_dim // 2) if class_row == "zero" else torch.ones(1, head_dim // 2)
    return torch.cat([first, cos]), torch.cat([torch.zeros(1, head_dim // 2), sin])


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x[..., 2i], x[..., 2i+1]) of x (..., L, head_dim) by angles given as cos/sin (L, head_dim/2)."""
    x2 = x.unflatten(-1, (-1, 2))
    x0, x1 = x2[..., 0], x2[..., 1]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalize in float32 for stability under bf16 autocast.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), no biases, dropout on the output."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class KVCache:
    """Static per-layer cache (B, heads, T_max, head_dim); `update` writes positions [pos, pos+n) in place.

    The buffers are allocated on the first write, with that write's dtype (bf16 under autocast, else the model's),
    or up front by `allocate` (the static path, whose compiled step must not allocate)."""

    def __init__(self, batch: int, heads: int, max_len: int, head_dim: int, device=None):
        self.shape, self.device = (batch, heads, max_len, head_dim), device
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    def allocate(self, dtype: torch.dtype, device=None) -> None:
        self.k = torch.zeros(self.shape, dtype=dtype, device=self.device or device)
        self.v = torch.zeros_like(self.k)

    def update(self, pos: int | Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """pos an int: returns the prefix [0, pos+n). pos a 0-d tensor (static decode of one position): returns the
        whole buffers, so every step has the same shapes (one compiled graph / CUDA graph for all positions); the
        caller masks the keys past pos."""
        if self.k is None:
            self.allocate(k.dtype, k.device)
        if torch.is_tensor(pos):
            self.k.index_copy_(2, pos.view(1), k)
            self.v.index_copy_(2, pos.view(1), v)
            return self.k, self.v
        n = k.shape[2]
        self.k[:, :, pos:pos + n] = k
        self.v[:, :, pos:pos + n] = v
        return self.k[:, :, :pos + n], self.v[:, :, :pos + n]


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int, attn_dropout: float = 0.0, resid_dropout: float = 0.0):
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"dim={dim} is not divisible by n_heads={n_heads}; pick n_heads dividing dim")
        self.n_heads, self.head_dim = n_heads, dim // n_heads
        self.wqkv = nn.Linear(dim, 3 * dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.attn_dropout = attn_dropout
        self.resid_drop = nn.Dropout(resid_dropout)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None,
                cache: KVCache | None = None, pos: int | Tensor = 0) -> Tensor:
        """x (B, L, dim). Without a cache: causal self-attention over the L positions. With a cache: the L new
        positions start at `pos` and attend to the cached prefix plus themselves (causally); a 0-d tensor `pos`
        (static decode, L = 1) attends over the whole cache with the keys past pos masked out."""
        B, L, _ = x.shape
        if torch.is_tensor(pos) and L != 1:
            raise ValueError(f"a tensor pos (static decode) takes one position at a time, got L={L}")
        q, k, v = self.wqkv(x).view(B, L, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(pos, k, v)
        p = self.attn_dropout if self.training else 0.0
        if torch.is_tensor(pos):
            mask = torch.arange(k.shape[2], device=x.device).view(1, -1) <= pos
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        elif cache is None or pos == 0:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        elif L == 1:  # one new query sees the whole cached prefix: no mask needed
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        else:
            S = k.shape[2]
            mask = torch.ones(L, S, dtype=torch.bool, device=x.device).tril(S - L)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        return self.resid_drop(self.wo(out.transpose(1, 2).reshape(B, L, -1)))


class Block(nn.Module):
    """Pre-norm Llama block: x + attn(norm(x)), then + ffn(norm(x))."""

    def __init__(self, dim: int, n_heads: int, hidden: int, norm_eps: float = 1e-5, attn_dropout: float = 0.0,
                 resid_dropout: float = 0.0, ffn_dropout: float = 0.0):
        super().__init__()
        self.attention_norm = RMSNorm(dim, norm_eps)
        self.attention = Attention(dim, n_heads, attn_dropout, resid_dropout)
        self.ffn_norm = RMSNorm(dim, norm_eps)
        self.feed_forward = FeedForward(dim, hidden, ffn_dropout)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None,
                cache: KVCache | None = None, pos: int | Tensor = 0) -> Tensor:
        x = x + self.attention(self.attention_norm(x), rope, cache, pos)
        return x + self.feed_forward(self.ffn_norm(x))


def block_params(dim: int, hidden: int) -> int:
    """Parameters of one Block: qkv + out projections, three SwiGLU matrices, two norm weights."""
    return 4 * dim * dim + 3 * dim * hidden + 2 * dim
