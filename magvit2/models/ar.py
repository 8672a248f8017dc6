"""Factorized class-conditional AR generator (Open-MAGVIT2): inter blocks over positions, intra blocks over sub-tokens.

A token index in [0, 2^K) is split LSB-first into M sub-tokens with bits (k1, ..., kM); the model takes the
sub-tokens (B, T, M) directly. It owns its factorization: split() / merge() go between indices and sub-tokens.

Architecture choices (the parameter counts of B / L / XL in the paper, 343.6M / 804.4M / 1486.7M, pin them down):
- inter input [class, e_0, ..., e_{T-2}], e_t = sum_j E_j(s_{j,t}); class table num_classes + 1 rows (last = null).
- intra input per position t: [h_t, E_1(s_{1,t}), ..., E_{M-1}(s_{M-1,t})] reusing the SAME tables E_j as the inter
  input (a separate intra table would add 64 * dim and make XL 1486.8M), h_t fed raw (no norm in between).
- one RMSNorm shared by all heads (after the intra blocks, or after the inter blocks when n_intra = 0).
- 2D RoPE in the inter blocks. class_rope="zero" (the original's): the class slot's table row is 0, which zeroes its
  q and k, and the intra blocks use the first M rows of the same table (slot 0 zeroed, slot j >= 1 rotated as grid
  position j-1: the identity for M = 2), as the original does. class_rope="identity": the class slot is not rotated
  and the intra blocks have no positional encoding (slots told apart by content and the causal mask).
- Embedding dropout on the inter input only (the original's); intra_embed_dropout=True also drops the intra
  blocks' sub-token inputs.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..quantizers.subtokens import merge_subtokens, split_indices
from .llama import Block, KVCache, RMSNorm, block_params, ffn_hidden, rope_table
from .sampling import check_sampling_args, guide, per_subtoken, sample


def subtoken_loss(logits: list[Tensor], sub: Tensor, accuracy: bool = True) -> tuple[Tensor, dict]:
    """Sum over sub-tokens of the mean cross-entropy; loss_j and, with `accuracy`, acc_j (j from 1), detached. A
    function, so a training loop can apply it to the output of a DDP-wrapped model (whose forward syncs the
    gradients). The accuracy is an argmax over every logit (4096-way for k6_12's second sub-token), a visible share
    of a training step on CPU: loops ask for it on logging steps only."""
    total, logs = 0.0, {}
    for j, lg in enumerate(logits):
        target = sub[..., j]
        ce = F.cross_entropy(lg.flatten(0, 1).float(), target.flatten())
        total = total + ce
        logs[f"loss_{j + 1}"] = ce.detach()
        if accuracy:
            logs[f"acc_{j + 1}"] = (lg.detach().argmax(-1) == target).float().mean()
    return total, logs


@dataclass
class ARConfig:
    bits: tuple[int, ...] = (6, 12)
    dim: int = 1024
    n_inter: int = 24
    n_intra: int = 2
    n_heads: int = 16
    num_classes: int = 1000  # class table has num_classes + 1 rows; row num_classes = null class (CFG)
    grid: int = 16  # tokens form a grid x grid image, sequence length grid * grid
    class_dropout: float = 0.1
    embed_dropout: float = 0.1
    resid_dropout: float = 0.1
    ffn_dropout: float = 0.1
    attn_dropout: float = 0.0
    rope_base: float = 10000.0
    class_rope: str = "zero"  # "zero" (original) | "identity"; see the module docstring
    intra_embed_dropout: bool = False  # original: no dropout on the intra blocks' sub-token inputs
    norm_eps: float = 1e-5
    multiple_of: int = 256

    def __post_init__(self):
        self.bits = tuple(int(b) for b in self.bits)  # accept lists (e.g. from Hydra)
        if not self.bits or any(b < 1 for b in self.bits):
            raise ValueError(f"bits={self.bits} must be a non-empty sequence of positive sub-token widths")
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 4:
            raise ValueError(f"dim={self.dim}, n_heads={self.n_heads}: dim must be n_heads x a multiple of 4 "
                             f"(2D RoPE splits the head dim into row and column pairs)")
        for name in ("n_inter", "n_intra"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if self.n_inter < 1:
            raise ValueError(f"n_inter={self.n_inter} must be >= 1")
        if self.class_rope not in ("zero", "identity"):
            raise ValueError(f"class_rope={self.class_rope!r}: use 'zero' (the original's) or 'identity'")
        if self.class_rope == "zero" and len(self.bits) > self.grid * self.grid + 1:
            raise ValueError(f"class_rope='zero' rotates the M={len(self.bits)} intra slots by the first M RoPE rows, "
                             f"but grid={self.grid} has only {self.grid ** 2 + 1}: use class_rope='identity'")
        if self.grid < 1 or self.num_classes < 1:
            raise ValueError(f"grid={self.grid} and num_classes={self.num_classes} must be >= 1")
        for name in ("class_dropout", "embed_dropout", "resid_dropout", "ffn_dropout", "attn_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1)")

    @property
    def seq_len(self) -> int:
        return self.grid * self.grid

    @property
    def vocab_sizes(self) -> tuple[int, ...]:
        return tuple(2 ** b for b in self.bits)


# The paper's sizes (with bits (6, 12) and 1000 classes: 343.6M, 804.4M, 1486.7M parameters).
PRESETS: dict[str, dict] = {
    "B": dict(dim=1024, n_inter=24, n_intra=2, n_heads=16),
    "L": dict(dim=1280, n_inter=36, n_intra=3, n_heads=20),
    "XL": dict(dim=1536, n_inter=48, n_intra=4, n_heads=24),
}


def count_params(cfg: ARConfig) -> int:
    """Analytic parameter count (no module construction)."""
    d, vocab = cfg.dim, sum(cfg.vocab_sizes)
    blocks = (cfg.n_inter + cfg.n_intra) * block_params(d, ffn_hidden(d, cfg.multiple_of))
    # class table + sub-token tables + heads + shared final norm
    return blocks + (cfg.num_classes + 1) * d + vocab * d + d * vocab + d


class FactorizedAR(nn.Module):
    def __init__(self, cfg: ARConfig):
        super().__init__()
        self.cfg = cfg
        d, hidden = cfg.dim, ffn_hidden(cfg.dim, cfg.multiple_of)
        drops = dict(attn_dropout=cfg.attn_dropout, resid_dropout=cfg.resid_dropout, ffn_dropout=cfg.ffn_dropout)
        self.class_emb = nn.Embedding(cfg.num_classes + 1, d)
        self.tok_emb = nn.ModuleList(nn.Embedding(v, d) for v in cfg.vocab_sizes)
        self.embed_drop = nn.Dropout(cfg.embed_dropout)
        self.inter = nn.ModuleList(Block(d, cfg.n_heads, hidden, cfg.norm_eps, **drops) for _ in range(cfg.n_inter))
        self.intra = nn.ModuleList(Block(d, cfg.n_heads, hidden, cfg.norm_eps, **drops) for _ in range(cfg.n_intra))
        self.norm = RMSNorm(d, cfg.norm_eps)
        self.heads = nn.ModuleList(nn.Linear(d, v, bias=False) for v in cfg.vocab_sizes)
        cos, sin = rope_table(cfg.grid, d // cfg.n_heads, cfg.rope_base, cfg.class_rope)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, 0.02)
        for h in self.heads:  # zero heads: uniform predictions at init
            nn.init.zeros_(h.weight)

    # ---- pieces -------------------------------------------------------------------------------------------------
    @property
    def num_subtokens(self) -> int:
        return len(self.cfg.bits)

    def split(self, indices: Tensor) -> Tensor:
        """Token indices (B, T) -> sub-tokens (B, T, M) of this model's factorization bits."""
        return split_indices(indices, self.cfg.bits)

    def merge(self, sub: Tensor) -> Tensor:
        """Sub-tokens (B, T, M) -> token indices (B, T): the inverse of split()."""
        return merge_subtokens(sub, self.cfg.bits)

    def _check_labels(self, labels: Tensor, batch: int | None = None) -> None:
        if labels.dim() != 1 or (batch is not None and labels.shape[0] != batch):
            raise ValueError(f"labels must have shape (B,) matching the batch, got {tuple(labels.shape)}")
        if labels.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
        bad = labels.numel() and labels.device.type != "meta" and (labels < 0).any() | (labels > self.cfg.num_classes).any()
        if bad:
            raise ValueError(f"labels must lie in [0, {self.cfg.num_classes}] ({self.cfg.num_classes} = null class)")

    def _check_sub(self, sub: Tensor) -> None:
        M, T = self.num_subtokens, self.cfg.seq_len
        if sub.dim() != 3 or sub.shape[1] != T or sub.shape[2] != M:
            raise ValueError(f"sub must have shape (B, T={T}, M={M}) (grid {self.cfg.grid}^2 tokens, bits "
                             f"{self.cfg.bits}), got {tuple(sub.shape)}")
        if sub.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"sub must be an integer tensor of sub-token indices, got {sub.dtype}")
        if sub.numel() and sub.device.type != "meta":
            vmax = torch.tensor(self.cfg.vocab_sizes, device=sub.device)
            if (sub < 0).any() or (sub >= vmax).any():
                raise ValueError(f"sub-token j must lie in [0, 2^k_j) for bits {self.cfg.bits}")

    def _embed_tokens(self, sub: Tensor) -> Tensor:
        """e = sum_j E_j(sub[..., j]) for sub (..., M) -> (..., dim)."""
        return sum(emb(sub[..., j]) for j, emb in enumerate(self.tok_emb))

    def _rope(self, start: int, length: int) -> tuple[Tensor, Tensor]:
        return self.rope_cos[start:start + length], self.rope_sin[start:start + length]

    def _intra(self, h: Tensor, prev: Tensor) -> Tensor:
        """Intra stack on [h, E_1(prev_1), ..., E_n(prev_n)]; h (N, dim), prev (N, n) -> normed (N, n+1, dim)."""
        drop = self.embed_drop if self.cfg.intra_embed_dropout else (lambda e: e)
        slots = [h[:, None]] + [drop(self.tok_emb[j](prev[:, j]))[:, None] for j in range(prev.shape[1])]
        x = torch.cat(slots, dim=1)
        rope = self._rope(0, x.shape[1]) if self.cfg.class_rope == "zero" else None
        for blk in self.intra:
            x = self._block(blk, x, rope)
        return self.norm(x)

    # ---- training -----------------------------------------------------------------------------------------------
    # Activation checkpointing (trainer.ar.activation_checkpointing): each block's activations are recomputed in the
    # backward instead of kept, for memory (L / XL on one GPU). The same math: torch's checkpoint restores the RNG
    # state before recomputing, so the dropout masks are the forward's. Training forward only (never in generate).
    activation_checkpointing: bool = False

    def _block(self, blk: nn.Module, x: Tensor, rope) -> Tensor:
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(blk, x, rope, use_reentrant=False)
        return blk(x, rope)

    def forward(self, sub: Tensor, labels: Tensor) -> list[Tensor]:
        """Teacher forcing. sub (B, T, M) int, labels (B,) -> M logits tensors (B, T, 2^k_j)."""
        self._check_sub(sub)
        self._check_labels(labels, sub.shape[0])
        B, T, M = sub.shape
        if self.training and self.cfg.class_dropout > 0:
            drop = torch.rand(B, device=labels.device) < self.cfg.class_dropout
            labels = labels.masked_fill(drop, self.cfg.num_classes)
        x = torch.cat([self.class_emb(labels)[:, None], self._embed_tokens(sub[:, :-1])], dim=1)
        x = self.embed_drop(x)
        rope = self._rope(0, T)
        for blk in self.inter:
            x = self._block(blk, x, rope)
        if not self.intra:  # ablation: independent heads on norm(h_t)
            hn = self.norm(x)
            return [head(hn) for head in self.heads]
        out = self._intra(x.reshape(B * T, -1), sub[..., :-1].reshape(B * T, M - 1)).view(B, T, M, -1)
        return [head(out[:, :, j]) for j, head in enumerate(self.heads)]

    def loss(self, sub: Tensor, labels: Tensor) -> tuple[Tensor, dict]:
        """Sum over sub-tokens of the mean cross-entropy; logs loss_j / acc_j (j from 1), detached."""
        return subtoken_loss(self(sub, labels), sub)

    # ---- sampling -----------------------------------------------------------------------------------------------
    def _inter_step(self, x: Tensor, t: int | Tensor, caches: list[KVCache] | None) -> Tensor:
        """h for input slot t. x (N, t+1, dim) (whole prefix, no cache) or (N, 1, dim) (cached; t a 0-d tensor:
        the static path, same shapes at every t) -> (N, dim)."""
        if torch.is_tensor(t):
            rope = self.rope_cos[t].view(1, -1), self.rope_sin[t].view(1, -1)
        else:
            rope = self._rope(0, t + 1) if caches is None else self._rope(t, 1)
        for i, blk in enumerate(self.inter):
            x = blk(x, rope) if caches is None else blk(x, rope, caches[i], t)
        return x[:, -1]

    def _intra_step(self, e: Tensor, j: int, caches: list[KVCache]) -> Tensor:
        """Slot j of the intra sequence with the intra KV caches: e (N, dim) is h_t for j = 0, else E_j of the
        sub-token just drawn -> normed (N, dim). One pass per sub-token instead of re-running slots 0..j."""
        rope = self._rope(j, 1) if self.cfg.class_rope == "zero" else None
        x = e[:, None]
        for blk, cache in zip(self.intra, caches):
            x = blk(x, rope, cache, j)
        return self.norm(x)[:, 0]

    @torch.no_grad()
    def generate(self, labels: Tensor, cfg_scale: Sequence[float] | float = 1.0,
                 temperature: Sequence[float] | float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 generator: torch.Generator | None = None, use_cache: bool | str = True,
                 uniforms: Tensor | None = None) -> Tensor:
        """Sample sub-tokens (B, T, M) for class labels (B,).

        CFG (any cfg_scale != 1) doubles the batch with the null class and uses logits uncond + s_j (cond - uncond);
        temperature_j divides the guided logits; top_k / top_p filter afterwards. use_cache=False recomputes the
        whole prefix every step (reference path; same draws for the same generator state). use_cache="static":
        preallocated caches read whole with a mask, so every step has the same shapes; compile_sampling() compiles
        that step (and CUDA-graphs it on a GPU). uniforms (B, T*M):
        sub-token j of position t is drawn by inverse CDF at uniforms[:, t*M + j] (generator unused), so each
        sample's draws depend on its own uniforms only (per-sample seeds, sampling split over processes).
        """
        self._check_labels(labels)
        M, T, d = self.num_subtokens, self.cfg.seq_len, self.cfg.dim
        scales = per_subtoken(cfg_scale, M, "cfg_scale")
        temps = per_subtoken(temperature, M, "temperature")
        check_sampling_args(top_k, top_p, temps)
        use_cfg = any(s != 1.0 for s in scales)
        B = labels.shape[0]
        if uniforms is not None and tuple(uniforms.shape) != (B, T * M):
            raise ValueError(f"uniforms must have shape (B, T*M) = ({B}, {T * M}), got {tuple(uniforms.shape)}")
        cls = torch.cat([labels, torch.full_like(labels, self.cfg.num_classes)]) if use_cfg else labels
        N = cls.shape[0]
        device = self.class_emb.weight.device
        if use_cache not in (True, False, "static"):
            raise ValueError(f"use_cache={use_cache!r}: use True, False or 'static'")
        static = use_cache == "static"
        caches = self._caches(N, device) if static else None
        if use_cache is True:
            caches = [KVCache(N, self.cfg.n_heads, T, d // self.cfg.n_heads, device) for _ in self.inter]
        inter_step, intra = (self._compiled if static and self._compiled else (self._inter_step, self._intra))
        # the dynamic path also caches the intra blocks' keys / values: M intra passes per position, not M(M+1)/2
        intra_caches = [KVCache(N, self.cfg.n_heads, M, d // self.cfg.n_heads, device) for _ in self.intra] \
            if use_cache is True else None
        positions = torch.arange(T, device=device)  # static: each step's pos is a view of it (no host copy)
        out = torch.zeros(B, T, M, dtype=torch.long, device=device)
        seq = self.class_emb(cls)[:, None]  # inter inputs so far (only kept whole without a cache)
        was_training = self.training
        self.eval()
        try:
            for t in range(T):
                pos = positions[t] if static else t
                h = inter_step(seq if caches is None else seq[:, -1:], pos, caches)
                chosen = torch.zeros(N, 0, dtype=torch.long, device=device)
                hn = self.norm(h) if not self.intra else None
                for j in range(M):
                    if hn is not None:
                        x = hn
                    elif intra_caches is not None:
                        x = self._intra_step(h if j == 0 else self.tok_emb[j - 1](chosen[:, -1]), j, intra_caches)
                    else:
                        x = intra(h, chosen)[:, -1]
                    logits = self.heads[j](x)
                    if use_cfg:
                        logits = guide(logits, scales[j])
                    u = None if uniforms is None else uniforms[:, t * M + j]
                    s = sample(logits, temps[j], top_k, top_p, generator, u)
                    out[:, t, j] = s
                    chosen = torch.cat([chosen, s.repeat(2)[:, None] if use_cfg else s[:, None]], dim=1)
                e = self._embed_tokens(chosen)[:, None]
                seq = torch.cat([seq, e], dim=1) if caches is None else e
        finally:
            self.train(was_training)
        return out

    _compiled: tuple | None = None  # (inter step, intra stack) compiled for use_cache="static"
    _graph_caches: dict | None = None  # CUDA graphs: caches kept at fixed addresses across generate() calls

    def _caches(self, n: int, device) -> list[KVCache]:
        """Preallocated caches for the static path, in the dtype the step writes (autocast's, else the model's)."""
        dt = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else self.norm.weight.dtype
        if self._graph_caches is not None and (n, dt) in self._graph_caches:
            return self._graph_caches[(n, dt)]
        caches = [KVCache(n, self.cfg.n_heads, self.cfg.seq_len, self.cfg.dim // self.cfg.n_heads, device)
                  for _ in self.inter]
        for c in caches:
            c.allocate(dt, device)
        if self._graph_caches is not None:  # a captured graph writes into these very buffers
            for c in caches:
                torch._dynamo.mark_static_address(c.k), torch._dynamo.mark_static_address(c.v)
            self._graph_caches[(n, dt)] = caches
        return caches

    def compile_sampling(self, cuda_graphs: bool = False) -> None:
        """torch.compile the static-cache sampler's inter step (one graph for every position) and intra stack (one
        per sub-token); cuda_graphs=True also captures them as CUDA graphs (mode reduce-overhead): CUDA only."""
        if cuda_graphs and self.class_emb.weight.device.type != "cuda":
            raise RuntimeError("compile_sampling(cuda_graphs=True) needs the model on a CUDA device; "
                               "use cuda_graphs=False (torch.compile only) elsewhere")
        mode = "reduce-overhead" if cuda_graphs else None
        self._compiled = (torch.compile(self._inter_step, mode=mode, dynamic=False),
                          torch.compile(self._intra, mode=mode, dynamic=False))
        self._graph_caches = {} if cuda_graphs else None
