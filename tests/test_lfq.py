"""LFQ: the factorized entropy equals the reference's dense softmax formula; index/bit conventions; the module."""

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from magvit2.quantizers import LFQ, VQ, Quantizer, QuantizerOutput, bits_to_indices, dense_entropy_terms
from magvit2.quantizers import entropy_terms, indices_to_bits
from magvit2.quantizers.lfq import codebook_probs

REPO = Path(__file__).resolve().parents[1]
TAU, EPS = 0.01, 1e-5


def reference_dense(z, tau=TAU, eps=EPS):
    """Independent dense computation: enumerate all 2^K codes in python, LSB-first, exactly as the reference does
    (sample entropy from log_softmax(logits / tau + eps), codebook entropy with log(avg + eps)).
    Returns (H_sample, H_codebook, p (N, 2^K))."""
    k = z.shape[1]
    codes = torch.tensor([[1.0 if (i >> d) & 1 else -1.0 for d in range(k)] for i in range(2**k)], dtype=z.dtype)
    logits = 2 * torch.einsum("nk,ck->nc", z, codes)
    p = torch.softmax(logits / tau, -1)
    h_sample = -(p * torch.log_softmax(logits / tau + eps, -1)).sum(-1).mean()
    avg = p.mean(0)
    return h_sample, -(avg * torch.log(avg + eps)).sum(), p


# Saturated bits (|4 z / tau| >> 1) give entropies ~1e-40 that no dense float64 formula resolves (log_softmax rounds
# 1 - 1e-40 to 1): below this absolute floor both formulas are "zero"; above it we require rel err <= 1e-5.
ATOL_VALUE, ATOL_GRAD = 1e-12, 1e-10


@pytest.mark.parametrize("k", [4, 8, 12])
@pytest.mark.parametrize("n", [1, 7, 256])
@pytest.mark.parametrize("scale", [0.001, 0.01, 1.0])
def test_entropy_terms_equal_dense_formula(k, n, scale):
    g = torch.Generator().manual_seed(1000 * k + 10 * n + int(1 / scale))
    z = (torch.randn(n, k, generator=g, dtype=torch.float64) * scale).requires_grad_()
    fact = entropy_terms(z, TAU, EPS, sync=False)
    dense = reference_dense(z)[:2]
    lib_dense = dense_entropy_terms(z, TAU, EPS)
    for a, b, c in zip(fact, dense, lib_dense):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=ATOL_VALUE)
        torch.testing.assert_close(c, b, rtol=1e-12, atol=0.0)  # the library's dense helper is the same formula
        ga, = torch.autograd.grad(a, z, retain_graph=True)
        gb, = torch.autograd.grad(b, z, retain_graph=True)
        torch.testing.assert_close(ga, gb, rtol=1e-5, atol=ATOL_GRAD)
    if scale <= 0.01:  # make sure these cases compare real numbers, not two zeros
        assert fact[0] > 0.1 and fact[1] > 0.1


def test_float32_path_close_to_float64_dense():
    z64 = torch.randn(256, 12, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 0.01
    z32 = z64.float().requires_grad_()
    z64.requires_grad_()
    fact, dense = entropy_terms(z32, TAU, EPS, sync=False), reference_dense(z64)[:2]
    for a, b in zip(fact, dense):
        assert a.dtype == torch.float32
        assert abs(a.double() - b).item() <= 1e-5 * abs(b).item()
        ga, = torch.autograd.grad(a, z32, retain_graph=True)
        gb, = torch.autograd.grad(b, z64, retain_graph=True)
        assert (ga.double() - gb).norm() <= 1e-4 * gb.norm()


def test_codebook_distribution_is_lsb_first_and_argmax_is_the_lfq_index():
    z = torch.randn(64, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 0.02
    *_, p = reference_dense(z)
    torch.testing.assert_close(codebook_probs(z, TAU), p.mean(0), rtol=1e-10, atol=1e-14)
    out = LFQ(bits=8)(z.T.reshape(1, 8, 8, 8))  # token n at (h, w) = divmod(n, 8)
    assert torch.equal(out.indices.flatten(), p.argmax(1))


def test_entropy_math_stays_float32_under_autocast():
    z = torch.randn(512, 10, generator=torch.Generator().manual_seed(5)) * 0.01
    plain = entropy_terms(z, TAU, EPS, sync=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = entropy_terms(z, TAU, EPS, sync=False)
    for a, b in zip(auto, plain):
        assert a.dtype == torch.float32
        assert torch.equal(a, b)  # a bf16 matmul inside would change the codebook entropy
    h_bf16 = entropy_terms(z.bfloat16(), TAU, EPS, sync=False)
    assert h_bf16[1].dtype == torch.float32
    torch.testing.assert_close(h_bf16[1], entropy_terms(z.bfloat16().float(), TAU, EPS, sync=False)[1])


def test_bits_indices_codes_round_trip():
    # hand example: z = (+, -, +, +, 0) -> bits 1,0,1,1,0 -> idx = 1 + 4 + 8 = 13 (LSB first); z == 0 -> -1
    lfq = LFQ(bits=5)
    z = torch.tensor([0.3, -0.2, 1.0, 0.01, 0.0]).view(1, 5, 1, 1)
    out = lfq(z)
    assert out.indices.item() == 13
    assert out.codes.flatten().tolist() == [1.0, -1.0, 1.0, 1.0, -1.0]
    assert indices_to_bits(torch.tensor(13), 5).tolist() == [True, False, True, True, False]
    assert bits_to_indices(torch.tensor([1, 0, 1, 1, 0])).item() == 13

    idx = torch.randint(0, 2**18, (3, 5, 7), generator=torch.Generator().manual_seed(6))
    assert torch.equal(bits_to_indices(indices_to_bits(idx, 18)), idx)
    lfq18 = LFQ(bits=18)
    codes = lfq18.indices_to_codes(idx)
    assert codes.shape == (3, 18, 5, 7) and set(codes.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(lfq18(codes).indices, idx)  # codes -> quantize -> same indices


def test_forward_straight_through_and_loss():
    lfq = LFQ(bits=6).train()
    z = (torch.randn(2, 6, 4, 4, generator=torch.Generator().manual_seed(7)) * 0.05).requires_grad_()
    out = lfq(z)
    assert isinstance(out, QuantizerOutput)
    assert torch.equal(out.codes.detach(), torch.where(z > 0, 1.0, -1.0))
    assert out.indices.shape == (2, 4, 4) and out.indices.dtype == torch.int64
    assert torch.equal(lfq.indices_to_codes(out.indices), out.codes.detach())

    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, 6).double()
    hs, hc, _ = reference_dense(flat)
    commit = ((z.detach() - torch.where(z > 0, 1.0, -1.0)) ** 2).mean()
    expected = 0.25 * commit + 0.1 * (hs - hc)
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.stats["entropy_codebook"].double(), hc, rtol=1e-5, atol=1e-7)
    assert all(not v.requires_grad and v.ndim == 0 for v in out.stats.values())
    assert out.stats["unique_codes"].item() == len(set(out.indices.flatten().tolist()))

    (g_st,) = torch.autograd.grad(out.codes.sum(), z, retain_graph=True)
    assert torch.equal(g_st, torch.ones_like(z))  # straight-through: identity gradient
    (g_loss,) = torch.autograd.grad(out.loss, z)
    assert g_loss.abs().sum() > 0


@pytest.mark.parametrize("make", [lambda: LFQ(bits=6), lambda: VQ(codebook_size=64, dim=4),
                                  lambda: VQ(codebook_size=64, dim=4, distance="euclidean", restart_dead=False)],
                         ids=["lfq", "vq", "vq_plain"])
def test_quantizers_satisfy_the_protocol(make):
    """What base.Quantizer writes down, for each arm: dims, dtypes, the loss, the stats, indices_to_codes."""
    q = make().train()
    assert isinstance(q, Quantizer) and isinstance(q, torch.nn.Module)
    assert isinstance(q.dim, int) and isinstance(q.codebook_size, int)
    z = torch.randn(2, q.dim, 3, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64,
                    requires_grad=True)
    out = q(z)
    assert isinstance(out, QuantizerOutput)
    assert out.codes.shape == z.shape and out.codes.dtype == z.dtype
    assert out.indices.shape == (2, 3, 5) and out.indices.dtype == torch.int64
    assert 0 <= int(out.indices.min()) and int(out.indices.max()) < q.codebook_size
    assert out.loss.ndim == 0 and out.loss.requires_grad
    assert out.stats and all(v.ndim == 0 and not v.requires_grad for v in out.stats.values())
    assert "commit" in out.stats and "unique_codes" in out.stats
    codes = q.indices_to_codes(out.indices, torch.float64)
    assert codes.dtype == torch.float64
    torch.testing.assert_close(codes, out.codes.detach(), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=rf"\(B, {q.dim}, H, W\)"):
        q(torch.randn(1, q.dim + 1, 2, 2))
    with pytest.raises(ValueError, match=rf"\[0, {q.codebook_size}\)"):
        q.indices_to_codes(torch.full((1, 2, 2), q.codebook_size))


def test_the_protocol_refuses_what_lacks_its_members():
    assert not isinstance(torch.nn.Conv2d(4, 4, 1), Quantizer)  # forward, but no dim / codebook_size / indices_to_codes
    lfq = LFQ(bits=4)
    del lfq.codebook_size
    assert not isinstance(lfq, Quantizer)


def test_entropy_weight_zero_keeps_stats_without_graph():
    lfq = LFQ(bits=6, entropy_weight=0.0)
    z = (torch.randn(1, 6, 3, 3) * 0.05).requires_grad_()
    out = lfq(z)
    commit = ((z.detach() - torch.where(z > 0, 1.0, -1.0)) ** 2).mean()
    torch.testing.assert_close(out.loss.detach(), 0.25 * commit)
    assert out.stats["entropy_codebook"] > 0


def test_bad_inputs():
    with pytest.raises(ValueError, match="bits"):
        LFQ(bits=0)
    with pytest.raises(ValueError, match="tau"):
        LFQ(tau=0)
    with pytest.raises(ValueError, match=r"\(B, 18, H, W\)"):
        LFQ(bits=18)(torch.randn(1, 16, 2, 2))
    with pytest.raises(ValueError, match="z_flat"):
        entropy_terms(torch.randn(4, 3, 2), TAU, EPS, False)
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        LFQ(bits=6).indices_to_codes(torch.full((1, 2, 2), 64))


PROBE = r"""
import re, torch
torch.set_num_threads(1)
from magvit2.quantizers import entropy_terms
def status(key):
    return int(re.search(key + r":\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
def reset_peak():  # writing 5 to clear_refs resets VmHWM (peak RSS) to the current RSS (Linux >= 4.0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
z = (torch.randn(4096, 18) * 0.01).requires_grad_()
torch.ones(1) @ torch.ones(1)  # load the BLAS library before the baseline
reset_peak()
base = status("VmRSS")
hs, hc = entropy_terms(z, 0.01, 1e-5, sync=False)
(hs - hc).backward()
used = status("VmHWM") - base
finite = bool(torch.isfinite(z.grad).all()) and bool(z.grad.abs().sum() > 0)
hs, hc = float(hs), float(hc)
reset_peak()
base = status("VmRSS")
control = torch.ones(150_000_000)  # 600 MB: proves the probe sees allocations of that size
print(used, status("VmHWM") - base, hs, hc, finite)
"""


def test_k18_n4096_forward_backward_bounded_memory():
    t0 = time.time()
    res = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    used, control, hs, hc, finite = res.stdout.split()
    dense_bytes = 4096 * 2**18 * 4  # one N x 2^K float32 matrix: 4.3 GB
    print(f"K=18 N=4096 fwd+bwd peak RSS delta {int(used) / 2**20:.1f} MiB "
          f"(dense matrix {dense_bytes / 2**30:.1f} GiB), {time.time() - t0:.1f}s incl. start-up")
    assert int(used) < 500 * 2**20
    assert int(control) > 550 * 2**20
    assert finite == "True"
    assert 0 < float(hs) <= float(hc) <= 18 * 0.6932  # H(mean p) >= mean H(p) (concavity); both <= ln 2^18


# ------------------------------------------------------------------------------------------- distributed (gloo)

K_DIST, SPLITS = 8, [0, 5, 16]  # unequal token counts per process: 5 and 11


def _dist_worker(rank, world, init_file, out_dir, z_all):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        z = z_all[SPLITS[rank] : SPLITS[rank + 1]].clone().requires_grad_()
        hs, hc = entropy_terms(z, TAU, EPS, sync=True)
        (g,) = torch.autograd.grad(hc, z)
        zq = z.detach().T.reshape(1, K_DIST, 1, -1)
        out = LFQ(bits=K_DIST, codebook_entropy="global").train()(zq.clone().requires_grad_())
        local = LFQ(bits=K_DIST).train()(zq.clone().requires_grad_())  # the original's: this process's tokens
        # VQ shares the process group here to save a second spawn: usage is global and restarts come from rank 0,
        # so both processes must end with identical codebooks although they see different data
        torch.manual_seed(0)
        vq = VQ(codebook_size=128, dim=4, dead_after=2, restart_every=2).train()
        torch.manual_seed(100 + rank)
        for _ in range(5):
            vq(torch.randn(2, 4, 3, 3) + 3 * rank)
        torch.save({"hc": hc.detach(), "grad": g, "module_hc": out.stats["entropy_codebook"],
                    "module_hc_local": local.stats["entropy_codebook"],
                    "vq_embedding": vq.embedding.detach(), "vq_unused": vq.steps_unused,
                    "vq_restarted": vq.last_restarted}, f"{out_dir}/{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_synced_codebook_entropy_equals_concatenated_batch_and_vq_stays_in_sync():
    z_all = torch.randn(SPLITS[-1], K_DIST, generator=torch.Generator().manual_seed(8)) * 0.02
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        mp.spawn(_dist_worker, args=(2, f"{tmp}/init", tmp, z_all), nprocs=2, join=True)
        print(f"2-process gloo run {time.time() - t0:.1f}s")
        res = [torch.load(f"{tmp}/{r}.pt") for r in range(2)]
    z = z_all.clone().requires_grad_()
    _, hc_global = entropy_terms(z, TAU, EPS, sync=False)
    (g_global,) = torch.autograd.grad(hc_global, z)
    hc_local0 = entropy_terms(z_all[:5], TAU, EPS, sync=False)[1]
    assert abs(hc_local0 - hc_global) > 0.1  # the test can tell local from global
    for r in range(2):
        torch.testing.assert_close(res[r]["hc"], hc_global.detach(), rtol=1e-5, atol=0)
        torch.testing.assert_close(res[r]["module_hc"], hc_global.detach(), rtol=1e-5, atol=0)
        hc_local = entropy_terms(z_all[SPLITS[r]:SPLITS[r + 1]], TAU, EPS, sync=False)[1]
        torch.testing.assert_close(res[r]["module_hc_local"], hc_local, rtol=1e-5, atol=0)
        # each process gets world_size x its partial derivative; DDP's averaging turns that into the exact gradient
        torch.testing.assert_close(res[r]["grad"], 2 * g_global[SPLITS[r] : SPLITS[r + 1]], rtol=1e-4, atol=1e-6)
    assert res[0]["vq_restarted"] > 0
    assert torch.equal(res[0]["vq_embedding"], res[1]["vq_embedding"])
    assert torch.equal(res[0]["vq_unused"], res[1]["vq_unused"])
