"""Cosine-similarity VQ: exact nearest-code lookup (chunked), losses, gradients, dead-code restart."""

import time

import pytest
import torch
import torch.nn.functional as F

from magvit2.quantizers import VQ
from magvit2.quantizers.vq import nearest_code


def unit(*shape, seed, dtype=torch.float32):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype), dim=-1)


def test_nearest_code_matches_brute_force():
    z, cb = unit(50, 8, seed=0, dtype=torch.float64), unit(100, 8, seed=1, dtype=torch.float64)
    brute = torch.tensor([max(range(100), key=lambda c: float(z[n] @ cb[c])) for n in range(50)])
    assert torch.equal(nearest_code(z, cb, chunk=7, token_chunk=13), brute)


def test_chunked_equals_unchunked():
    # float64: no near-ties at the 1e-7 level that could flip an argmax between block shapes
    z, cb = unit(512, 8, seed=2, dtype=torch.float64), unit(2**14, 8, seed=3, dtype=torch.float64)
    whole = nearest_code(z, cb, chunk=2**14, token_chunk=512)
    assert torch.equal(whole, (z @ cb.T).argmax(1))
    assert torch.equal(nearest_code(z, cb, chunk=1000, token_chunk=100), whole)
    assert torch.equal(nearest_code(z, cb), whole)  # per-device defaults


def test_forward_assigns_nearest_code_and_losses():
    vq = VQ(codebook_size=300, dim=8).train()
    z = (torch.randn(2, 8, 5, 6, generator=torch.Generator().manual_seed(4)) * 3).requires_grad_()
    out = vq(z)
    zn = F.normalize(z.detach().permute(0, 2, 3, 1).reshape(-1, 8), dim=1)
    cb = F.normalize(vq.embedding.detach(), dim=1)
    idx = (zn @ cb.T).argmax(1)
    assert out.indices.shape == (2, 5, 6) and torch.equal(out.indices.flatten(), idx)
    e = cb[idx]
    torch.testing.assert_close(out.codes.detach().permute(0, 2, 3, 1).reshape(-1, 8), e)
    torch.testing.assert_close(vq.indices_to_codes(out.indices), out.codes.detach())
    mse = ((zn - e) ** 2).mean()
    torch.testing.assert_close(out.loss.detach(), 1.25 * mse)
    torch.testing.assert_close(out.stats["commit"], mse)
    assert out.stats["unique_codes"].item() == len(set(idx.tolist()))


def test_gradients_flow_to_encoder_and_selected_codes():
    vq = VQ(codebook_size=300, dim=8).train()
    z = torch.randn(2, 8, 5, 6, generator=torch.Generator().manual_seed(5)).requires_grad_()
    out = vq(z)
    (out.codes * torch.randn_like(out.codes)).sum().backward(retain_graph=True)
    assert z.grad is not None and z.grad.abs().sum() > 0  # straight-through reaches the encoder output
    z.grad = None
    out.loss.backward()
    assert z.grad.abs().sum() > 0  # commitment pulls the encoder
    rows_with_grad = set(torch.nonzero(vq.embedding.grad.abs().sum(1)).flatten().tolist())
    assert rows_with_grad == set(out.indices.flatten().tolist())  # codebook loss moves exactly the chosen codes


def run_steps(vq, steps, seed):
    """Encoder outputs concentrated around one direction: most random codes are never chosen."""
    g = torch.Generator().manual_seed(seed)
    center = torch.randn(8, generator=g)
    seen = set()
    for _ in range(steps):
        z = center.view(1, 8, 1, 1) + 0.3 * torch.randn(4, 8, 4, 4, generator=g)
        out = vq(z)
        seen |= set(out.indices.flatten().tolist())
    return seen, out


def test_dead_code_restart_revives_unused_codes():
    torch.manual_seed(6)
    vq = VQ(codebook_size=256, dim=8, dead_after=3, restart_every=3, restart_noise=0.05).train()
    torch.manual_seed(6)
    frozen = VQ(codebook_size=256, dim=8, restart_dead=False, dead_after=3).train()
    assert torch.equal(vq.embedding, frozen.embedding)
    before = vq.embedding.detach().clone()

    _, out_frozen = run_steps(frozen, 3, seed=7)
    seen_early, _ = run_steps(vq, 3, seed=7)
    assert out_frozen.stats["dead_codes"].item() > 0.5  # many codes unused after 3 steps
    dead = (vq.steps_unused >= 3).clone()
    assert dead.sum() > 100

    run_steps(vq, 1, seed=9)  # the 4th forward restarts the dead codes from the pool, before its lookup
    moved = (vq.embedding.detach() - before).norm(dim=1) > 1e-6
    assert torch.equal(moved, dead)  # exactly the dead codes were re-initialized
    assert vq.last_restarted == int(dead.sum())
    seen_late, _ = run_steps(vq, 12, seed=8)
    revived_used = seen_late & set(torch.nonzero(dead).flatten().tolist())
    seen_frozen, _ = run_steps(frozen, 12, seed=8)
    print(f"codes used: restart {len(seen_late)}, no restart {len(seen_frozen)}; revived and used {len(revived_used)}")
    assert len(revived_used) > 50
    assert len(seen_late) > 2 * len(seen_frozen)


def test_eval_mode_does_not_track_usage():
    vq = VQ(codebook_size=64, dim=4, dead_after=1, restart_every=1).eval()
    with torch.no_grad():
        vq(torch.randn(1, 4, 3, 3))
        vq(torch.randn(1, 4, 3, 3))
    assert vq.steps_unused.sum() == 0 and vq._steps == 0


def test_bad_inputs():
    with pytest.raises(ValueError, match="codebook_size"):
        VQ(codebook_size=0)
    with pytest.raises(ValueError, match=r"\(B, 8, H, W\)"):
        VQ(codebook_size=16, dim=8)(torch.randn(1, 18, 2, 2))
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        VQ(codebook_size=16, dim=8).indices_to_codes(torch.full((1, 2, 2), 16))


@pytest.mark.slow
def test_full_size_codebook_on_cpu():
    vq = VQ().train()  # 2^18 codes, dim 8
    z = torch.randn(16, 8, 16, 16, requires_grad=True)  # N = 4096 tokens
    t0 = time.time()
    out = vq(z)
    out.loss.backward()
    print(f"VQ 2^18 codes, N=4096 fwd+bwd on CPU: {time.time() - t0:.1f}s")
    zn = F.normalize(z.detach().permute(0, 2, 3, 1).reshape(-1, 8), dim=1)
    cb = F.normalize(vq.embedding.detach(), dim=1)
    sample = torch.arange(0, 4096, 97)
    best = (zn[sample] @ cb.T).max(1).values
    chosen = (zn[sample] * cb[out.indices.flatten()[sample]]).sum(1)
    torch.testing.assert_close(chosen, best, rtol=0, atol=1e-6)
    assert z.grad.abs().sum() > 0
