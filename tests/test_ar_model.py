"""Factorized AR generator: parameter counts, causality, init, overfitting, cached sampling, 2D RoPE."""
import math
import time

import pytest
import torch

from magvit2.models.ar import PRESETS, ARConfig, FactorizedAR, count_params
from magvit2.models.llama import KVCache, apply_rope, rope_2d_angles
from magvit2.models.sampling import filter_logits

NO_DROP = dict(class_dropout=0.0, embed_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0)
PAPER_COUNTS = {"B": 343.6e6, "L": 804.4e6, "XL": 1486.7e6}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one intra-op thread is faster, and 2 threads on a shared 2-core box oversubscribe badly
    (measured 200 training steps: 6 s with 1 thread vs 100 s with 2 while other processes ran)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(bits=(3, 5), n_intra=1, grid=4, **kw) -> ARConfig:
    return ARConfig(bits=bits, dim=64, n_inter=2, n_intra=n_intra, n_heads=4, grid=grid, num_classes=10,
                    **{**NO_DROP, **kw})


def split(idx: torch.Tensor, bits) -> torch.Tensor:
    """LSB-first split of token indices into sub-tokens (independent of the quantizer package)."""
    out, shift = [], 0
    for k in bits:
        out.append((idx >> shift) & ((1 << k) - 1))
        shift += k
    return torch.stack(out, dim=-1)


def random_model(cfg: ARConfig, seed=0, dtype=torch.float32) -> FactorizedAR:
    """Model with non-zero heads (zero heads would make every logit test vacuous), in eval mode."""
    torch.manual_seed(seed)
    m = FactorizedAR(cfg).to(dtype)
    for h in m.heads:
        torch.nn.init.normal_(h.weight, 0.0, 0.5)
    for blk in [*m.inter, *m.intra]:  # sharp attention, so positions (RoPE, cache slots) matter
        torch.nn.init.normal_(blk.attention.wqkv.weight, 0.0, 0.3)
    return m.eval()


def random_sub(cfg: ARConfig, batch: int, seed=1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 2 ** sum(cfg.bits), (batch, cfg.seq_len), generator=g)
    return split(idx, cfg.bits)


@pytest.mark.parametrize("size", ["B", "L", "XL"])
def test_param_counts_match_paper(size):
    cfg = ARConfig(bits=(6, 12), num_classes=1000, **PRESETS[size])
    with torch.device("meta"):
        model = FactorizedAR(cfg)
    n_module = sum(p.numel() for p in model.parameters())
    n = count_params(cfg)
    dev = (n - PAPER_COUNTS[size]) / PAPER_COUNTS[size]
    print(f"{size}: {n} params ({n / 1e6:.4f}M), paper {PAPER_COUNTS[size] / 1e6}M, deviation {dev * 100:+.4f}%")
    assert n_module == n
    assert model.class_emb.weight.shape[0] == 1001
    assert abs(dev) < 0.005
    assert round(n / 1e5) == round(PAPER_COUNTS[size] / 1e5)  # equal at the paper's 0.1M precision


def test_count_params_tracks_config_changes():
    for kw in [dict(bits=(9, 9)), dict(bits=(18,)), dict(bits=(6, 6, 6), n_intra=0), dict(multiple_of=64)]:
        cfg = ARConfig(dim=128, n_inter=2, n_heads=4, num_classes=7, **kw)
        with torch.device("meta"):
            assert sum(p.numel() for p in FactorizedAR(cfg).parameters()) == count_params(cfg)


@pytest.mark.parametrize("bits,n_intra", [((3, 5), 1), ((2, 3, 3), 2)])
def test_inter_causality(bits, n_intra):
    cfg = tiny(bits, n_intra)
    m = random_model(cfg)
    sub, labels = random_sub(cfg, 2), torch.tensor([3, 7])
    t = 6
    sub2 = sub.clone()
    sub2[:, t] = (sub2[:, t] + 1) % torch.tensor(cfg.vocab_sizes)
    a, b = m(sub, labels), m(sub2, labels)
    for la, lb in zip(a, b):
        torch.testing.assert_close(la[:, :t], lb[:, :t], rtol=0, atol=1e-6)
        assert (la[:, t + 1] - lb[:, t + 1]).abs().max() > 1e-3  # the next position does see token t
    # h_t (inter) does not see token t: the first sub-token's logits at t are unchanged (later sub-tokens at t
    # see earlier sub-tokens of t through the intra blocks, checked in test_intra_causality)
    torch.testing.assert_close(a[0][:, t], b[0][:, t], rtol=0, atol=1e-6)


@pytest.mark.parametrize("bits,n_intra", [((3, 5), 1), ((2, 3, 3), 2)])
def test_intra_causality(bits, n_intra):
    cfg = tiny(bits, n_intra)
    m = random_model(cfg)
    sub, labels = random_sub(cfg, 2), torch.tensor([1, 2])
    t, M = 9, len(bits)
    base = m(sub, labels)
    for j in range(M):  # change sub-token j (0-based) at position t
        sub2 = sub.clone()
        sub2[:, t, j] = (sub2[:, t, j] + 1) % cfg.vocab_sizes[j]
        out = m(sub2, labels)
        for i in range(j + 1):  # logits for sub-tokens 0..j at t must not see sub-token j
            torch.testing.assert_close(out[i][:, t], base[i][:, t], rtol=0, atol=1e-6)
        for i in range(j + 1, M):  # later sub-tokens at t must see it
            assert (out[i][:, t] - base[i][:, t]).abs().max() > 1e-3


def test_independent_heads_without_intra():
    cfg = tiny((3, 5), n_intra=0)
    m = random_model(cfg)
    sub, labels = random_sub(cfg, 2), torch.tensor([1, 2])
    t = 5
    sub2 = sub.clone()
    sub2[:, t, 0] = (sub2[:, t, 0] + 1) % 8
    a, b = m(sub, labels), m(sub2, labels)
    torch.testing.assert_close(a[1][:, t], b[1][:, t], rtol=0, atol=0)
    # contrast: with intra blocks, sub-token 2 does depend on sub-token 1 of the same position
    m1 = random_model(tiny((3, 5), n_intra=1))
    a, b = m1(sub, labels), m1(sub2, labels)
    assert (a[1][:, t] - b[1][:, t]).abs().max() > 1e-3


@pytest.mark.parametrize("bits,n_intra", [((3, 5), 1), ((3, 5), 0), ((6, 12), 1)])
def test_zero_heads_give_uniform_loss(bits, n_intra):
    cfg = tiny(bits, n_intra)
    torch.manual_seed(0)
    m = FactorizedAR(cfg)
    for h in m.heads:
        assert torch.count_nonzero(h.weight) == 0
    loss, logs = m.loss(random_sub(cfg, 3), torch.tensor([0, 4, 10]))  # 10 = null class is a valid input
    assert loss.item() == pytest.approx(sum(bits) * math.log(2), rel=1e-6)
    for j, k in enumerate(bits, start=1):
        assert logs[f"loss_{j}"].item() == pytest.approx(k * math.log(2), rel=1e-6)
        assert not logs[f"loss_{j}"].requires_grad and f"acc_{j}" in logs


def test_tiny_model_overfits_fixed_batch():
    cfg = tiny((3, 5), n_intra=1)
    torch.manual_seed(0)
    m = FactorizedAR(cfg).train()
    sub, labels = random_sub(cfg, 8, seed=3), torch.arange(8)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
    uniform = sum(cfg.bits) * math.log(2)
    t0 = time.perf_counter()
    for _ in range(200):
        loss, _ = m.loss(sub, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    print(f"overfit: final loss {loss.item():.4f} vs uniform {uniform:.4f} in {time.perf_counter() - t0:.1f}s")
    assert loss.item() < 0.2 * uniform


def test_class_dropout_only_in_training():
    cfg = tiny(class_dropout=0.5)
    m = random_model(cfg)
    sub, labels = random_sub(cfg, 64), torch.zeros(64, dtype=torch.long)
    null = m(sub, torch.full_like(labels, cfg.num_classes))[0][:, 0]
    cond = m(sub, labels)[0][:, 0]
    torch.testing.assert_close(m(sub, labels)[0][:, 0], cond)  # eval: no dropout
    m.train()
    torch.manual_seed(0)
    first = m(sub, labels)[0][:, 0]  # position 0 sees only the class embedding
    is_null = (first - null).abs().amax(-1) < 1e-5
    is_cond = (first - cond).abs().amax(-1) < 1e-5
    assert (is_null | is_cond).all() and 16 < is_null.sum() < 48


@pytest.mark.parametrize("bits,n_intra", [((3, 5), 1), ((3, 5), 0), ((2, 3, 3), 2), ((2, 3, 3), 0)])
def test_cached_sampling_equals_uncached(bits, n_intra):
    cfg = tiny(bits, n_intra)
    m = random_model(cfg, dtype=torch.float64)  # float64: the two paths differ only by ~1e-15
    labels = torch.tensor([0, 3, 9, 10])
    kw = dict(cfg_scale=[1.5, 2.5, 3.0][:len(bits)], temperature=[1.3, 0.9, 1.1][:len(bits)], top_k=6, top_p=0.9)
    a = m.generate(labels, generator=torch.Generator().manual_seed(5), use_cache=True, **kw)
    b = m.generate(labels, generator=torch.Generator().manual_seed(5), use_cache=False, **kw)
    c = m.generate(labels, generator=torch.Generator().manual_seed(6), use_cache=True, **kw)
    assert a.shape == (4, cfg.seq_len, len(bits)) and a.dtype == torch.long
    assert torch.equal(a, b)
    assert not torch.equal(a, c)  # the seed matters
    for j, v in enumerate(cfg.vocab_sizes):
        assert a[..., j].min() >= 0 and a[..., j].max() < v


@pytest.mark.parametrize("bits,n_intra", [((3, 5), 1), ((2, 3, 3), 0)])
def test_cached_steps_match_teacher_forcing(bits, n_intra):
    """Step-by-step cached inter passes + intra on the true sub-tokens reproduce forward()'s logits."""
    cfg = tiny(bits, n_intra)
    m = random_model(cfg, dtype=torch.float64)
    sub, labels = random_sub(cfg, 3), torch.tensor([0, 5, 10])
    ref = m(sub, labels)
    caches = [KVCache(3, cfg.n_heads, cfg.seq_len, cfg.dim // cfg.n_heads) for _ in m.inter]
    x = m.class_emb(labels)[:, None]
    with torch.no_grad():
        for t in range(cfg.seq_len):
            h = m._inter_step(x, t, caches)
            for j in range(len(bits)):
                feat = m.norm(h) if n_intra == 0 else m._intra(h, sub[:, t, :j])[:, -1]
                torch.testing.assert_close(m.heads[j](feat), ref[j][:, t], rtol=1e-9, atol=1e-9)
            x = m._embed_tokens(sub[:, t])[:, None]


@pytest.mark.parametrize("bits", [(3, 5), (2, 3, 3), (2, 2, 2, 2)])
def test_intra_kv_cache_draws_the_tokens_of_the_recomputed_intra(bits):
    """The dynamic path's intra KV cache (one intra pass per sub-token) draws the same tokens in float32 as
    recomputing the intra slots (the static path, which has no intra cache), and its features match the full
    intra stack's."""
    cfg = tiny(bits, n_intra=2)
    m = random_model(cfg)
    labels = torch.tensor([0, 3, 9, 10, 1, 2])
    kw = dict(cfg_scale=[1.5, 2.5, 3.0, 1.2][:len(bits)], temperature=1.0)
    for seed in range(3):
        a = m.generate(labels, generator=torch.Generator().manual_seed(seed), use_cache=True, **kw)
        b = m.generate(labels, generator=torch.Generator().manual_seed(seed), use_cache="static", **kw)
        assert torch.equal(a, b), seed
    h, prev = torch.randn(5, cfg.dim), random_sub(cfg, 5)[:, 0]
    caches = [KVCache(5, cfg.n_heads, len(bits), cfg.dim // cfg.n_heads) for _ in m.intra]
    with torch.no_grad():
        full = m._intra(h, prev[:, :-1])
        for j in range(len(bits)):
            e = h if j == 0 else m.tok_emb[j - 1](prev[:, j - 1])
            torch.testing.assert_close(m._intra_step(e, j, caches), full[:, j], rtol=1e-5, atol=1e-6)


def test_generate_draws_from_model_distribution():
    """With a single position (grid 1) the first sub-token is drawn from softmax(guided logits / T)."""
    cfg = tiny((3, 5), n_intra=1, grid=1)
    m = random_model(cfg)
    n, scale, temp = 4000, 2.0, 1.5
    labels = torch.full((n,), 4)
    s = m.generate(labels, cfg_scale=scale, temperature=temp, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        h = m.class_emb(torch.tensor([4, cfg.num_classes]))  # slot 0 after the inter blocks
        x = h[:, None]
        for blk in m.inter:
            x = blk(x, m._rope(0, 1))
        lg = m.heads[0](m._intra(x[:, 0], torch.zeros(2, 0, dtype=torch.long))[:, 0])
    p = ((lg[1] + scale * (lg[0] - lg[1])) / temp).softmax(-1)
    freq = torch.bincount(s[:, 0, 0], minlength=8).float() / n
    assert (freq - p).abs().max() < 0.03


def test_filter_logits_top_k_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]]))
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.75)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.76)).tolist() == [[False, False, False, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.1)).tolist() == [[False, True, True, True]]


def test_rope_2d_relative_positions():
    torch.manual_seed(0)
    hd = 16
    q, k = torch.randn(hd, dtype=torch.float64), torch.randn(hd, dtype=torch.float64)

    def score(r1, c1, r2, c2):
        ang = rope_2d_angles(torch.tensor([r1, r2]), torch.tensor([c1, c2]), hd)
        rq = apply_rope(q[None], ang[:1].cos(), ang[:1].sin())[0]
        rk = apply_rope(k[None], ang[1:].cos(), ang[1:].sin())[0]
        return (rq @ rk).item()

    s = score(2, 3, 5, 1)
    for dr, dc in [(0, 0), (4, 0), (0, 7), (-2, 9), (11, -3)]:
        assert score(2 + dr, 3 + dc, 5 + dr, 1 + dc) == pytest.approx(s, abs=1e-10)
    # rows and columns are distinct axes: swapping them (or changing a difference) changes the score
    assert abs(score(3, 2, 1, 5) - s) > 1e-3
    assert abs(score(2, 3, 5, 2) - s) > 1e-3
    assert abs(score(2, 3, 4, 1) - s) > 1e-3
    # rotation preserves norms
    ang = rope_2d_angles(torch.tensor([7]), torch.tensor([4]), hd)
    assert apply_rope(q[None], ang.cos(), ang.sin()).norm().item() == pytest.approx(q.norm().item())


def test_bad_inputs_raise():
    cfg = tiny()
    m = random_model(cfg)
    sub, labels = random_sub(cfg, 2), torch.tensor([1, 2])
    with pytest.raises(ValueError, match="sub"):
        m(sub[:, :-1], labels)
    with pytest.raises(ValueError, match="sub-token"):
        m(sub + 100, labels)
    with pytest.raises(ValueError, match="labels"):
        m(sub, torch.tensor([1, 11]))
    with pytest.raises(ValueError, match="cfg_scale"):
        m.generate(labels, cfg_scale=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="temperature"):
        m.generate(labels, temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        m.generate(labels, top_p=1.5)
    with pytest.raises(ValueError, match="n_heads"):
        ARConfig(dim=64, n_heads=5)
    with pytest.raises(ValueError, match="bits"):
        ARConfig(bits=())


def test_per_row_uniforms_make_each_draw_independent_of_its_batch():
    """generate(uniforms=...): a sample's draws depend on its own uniforms only (split sampling, per-item seeds)."""
    torch.manual_seed(0)
    m = FactorizedAR(ARConfig(bits=(3, 5), dim=32, n_inter=2, n_intra=1, n_heads=2, num_classes=4, grid=3)).eval()
    for p in m.heads.parameters():
        p.data.normal_(0, 0.5)  # non-uniform predictions
    T, M = 9, 2
    u = torch.rand(3, T * M, dtype=torch.float64)
    kw = dict(cfg_scale=[2.0, 1.5], temperature=0.9, top_k=20)
    both = m.generate(torch.tensor([0, 2, 3]), uniforms=u, **kw)
    alone = m.generate(torch.tensor([2]), uniforms=u[1:2], **kw)
    assert torch.equal(both[1:2], alone)
    other = m.generate(torch.tensor([2]), uniforms=torch.rand(1, T * M, dtype=torch.float64), **kw)
    assert not torch.equal(other, alone)
    with pytest.raises(ValueError, match=r"uniforms must have shape \(B, T\*M\) = \(1, 18\)"):
        m.generate(torch.tensor([2]), uniforms=u)
