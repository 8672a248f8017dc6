"""`lfq`: the exact factorized entropy loss (magvit2.quantizers.lfq.entropy_terms) against the reference's dense
N x 2^K softmax (dense_entropy_terms), forward + backward: values, time, peak memory; then the largest K it runs."""
from __future__ import annotations

import math

import torch

from magvit2.quantizers import dense_entropy_terms, entropy_terms
from magvit2.quantizers.lfq import MAX_BITS, codebook_probs

from .common import available_bytes, measure, row

DENSE_COPIES = 8  # N x 2^K tensors alive at the dense formula's peak (logits, softmax, log-softmax, grads): measured 6-7


def _step(fn, z):
    def run():
        z.grad = None
        hs, hc = fn(z, 0.01, 1e-5)
        (hs - hc).backward()
        return hs.detach(), hc.detach()
    return run


def _rel(a, b) -> float:
    return float(((a - b).abs() / b.abs().clamp_min(1e-12)).max())


def compare(device, n: int, k: int, reps: int) -> list[dict]:
    z = (torch.randn(n, k, device=device) * 0.02).requires_grad_()  # ~ an encoder's latents at tau = 0.01
    fact = _step(lambda *a: entropy_terms(*a, sync=False), z)
    f = measure(fact, device, reps=reps)
    rows = [row(f"N={n} K={k}", "factorized", **f)]
    need = n * 2 ** k * 4 * DENSE_COPIES
    if need > 0.5 * available_bytes(device):
        rows.append(row(f"N={n} K={k}", "dense", note=f"skipped: needs ~{need / 2**30:.0f} GiB, "
                                                      f"{available_bytes(device) / 2**30:.0f} GiB free"))
        return rows
    dense = _step(dense_entropy_terms, z)
    d = measure(dense, device, reps=reps)
    vf, gf = torch.stack(fact()), z.grad.clone()
    vd, gd = torch.stack(dense()), z.grad.clone()
    rows.append(row(f"N={n} K={k}", "dense", **d, rel_diff_values=_rel(vf, vd),
                    rel_diff_grad=float((gf - gd).norm() / gd.norm().clamp_min(1e-30)),
                    speedup=d["time_s"] / f["time_s"],
                    memory_ratio=d["peak_bytes"] / f["peak_bytes"] if d["peak_bytes"] and f["peak_bytes"] else None))
    return rows


def largest_k(device, n: int, ks, reps: int = 1) -> list[dict]:
    """Factorized fwd+bwd at growing K while the 2^K codebook terms fit; exactness where no dense reference
    exists: the code distribution sums to 1 and H_codebook <= min(K ln 2, ln N)."""
    rows = []
    for k in ks:
        if k > MAX_BITS or 2 ** k * 4 * 6 > 0.5 * available_bytes(device):
            rows.append(row(f"N={n} K={k}", "factorized", note="skipped: 2^K floats do not fit"))
            break
        z = (torch.randn(n, k, device=device) * 0.02).requires_grad_()
        step = _step(lambda *a: entropy_terms(*a, sync=False), z)
        try:
            m = measure(step, device, warmup=1, reps=reps)
        except torch.OutOfMemoryError as e:
            rows.append(row(f"N={n} K={k}", "factorized", note=f"out of memory: {str(e)[:80]}"))
            break
        with torch.no_grad():
            p_sum = float(codebook_probs(z.detach(), 0.01).double().sum())
            hc = float(entropy_terms(z.detach(), 0.01, 1e-5, sync=False)[1])
        rows.append(row(f"N={n} K={k}", "factorized", **m, prob_sum_error=abs(p_sum - 1.0),
                        h_codebook_in_bound=hc <= min(k * math.log(2), math.log(n)) + 1e-3))
    return rows


def run(device, dtype, quick: bool, smoke: bool = False, **_) -> dict:
    if smoke:
        pairs, search, n_search = [(256, 10)], [12], 256
    elif quick:
        pairs, search, n_search = [(1024, 12), (2048, 16)], [20, 22, 24], 1024
    else:
        pairs, search, n_search = [(2048, 18), (16384, 18)], [20, 22, 24, 26, 28, 30], 2048
    rows = [r for n, k in pairs for r in compare(device, n, k, reps=1 if smoke else 2 if quick else 3)]
    grown = largest_k(device, n_search, search)
    done = [r for r in grown if r.get("time_s")]
    return {"rows": rows + grown, "summary": {"max_k": max((int(r["case"].split("K=")[1]) for r in done), default=None),
                                              "entropy_dtype": "float32 (autocast off, as in training)"}}
