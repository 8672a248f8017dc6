"""Generation FID and Inception Score of samples vs reference images, with the local FID Inception.

FID uses the 2048-d pool features; IS uses the unbiased logits (1008 classes of the TF graph) in `splits` groups,
as torch-fidelity/torchmetrics do. Precision / recall (Kynkaenniemi et al. 2019; optional: they keep every image's
pool features) use the same 2048-d pool features and k = 3 nearest neighbours, as the ADM evaluator does, computed
by torch-fidelity's implementation: precision is the share of samples inside some reference image's k-NN ball
(fidelity), recall the share of reference images inside some sample's ball (diversity). The official protocol is
50k samples (50 per class) vs the ImageNet reference batch; for numbers comparable to papers also export the samples
with export_adm_npz for the ADM evaluator.
"""
from __future__ import annotations

import warnings

import torch

from .accumulators import Count, Rows
from . import protocol as P
from .inception import check_images, check_inception, make_fid, make_is, to_uint8, to_unit
from .missing import Missing, finite_or_missing


def as_uint8(x: torch.Tensor, name: str, mode: str = "trunc") -> torch.Tensor:
    """uint8 images pass through; float images are taken to be in [-1,1] (model space) and converted by `mode`."""
    check_images(x, name)
    if x.dtype == torch.uint8:
        return x
    if not x.is_floating_point():
        raise ValueError(f"{name}: expected uint8 [0,255] or float [-1,1] images, got {x.dtype}")
    return to_uint8(to_unit(x), mode)


class GenerationMetrics:
    def __init__(self, inception, device="cpu", is_splits: int = 10, precision_recall: bool = False,
                 prc_k: int = 3, protocol=None):
        """protocol (metrics/protocol.py): how float images become uint8 (reference: truncation)."""
        if not isinstance(is_splits, int) or is_splits < 1:
            raise ValueError(f"is_splits must be a positive int (10 is the usual), got {is_splits!r}")
        if not isinstance(prc_k, int) or prc_k < 1:
            raise ValueError(f"prc_k must be a positive int (3, the ADM evaluator's), got {prc_k!r}")
        self.device, self.is_splits, self.prc_k = torch.device(device), is_splits, prc_k
        self.protocol = P.get(protocol)
        self.n_real, self.n_fake = Count().to(self.device), Count().to(self.device)
        # pool features of both sides, for precision / recall (None: not asked for)
        self.pool = {"real": Rows().to(self.device), "fake": Rows().to(self.device)} if precision_recall else None
        self.inception = check_inception(inception, "GenerationMetrics")
        if not isinstance(self.inception, Missing):
            self.inception = self.inception.to(self.device)
            self.fid = make_fid(self.inception, self.device)
            self.inception_score = make_is(self.inception, is_splits, self.device)

    @torch.no_grad()
    def update_real(self, x: torch.Tensor, fid: bool = True) -> None:
        """Reference images: uint8 (B,3,H,W) or float in [-1,1]. fid=False: for precision / recall only (FID's
        reference statistics came precomputed, so these images must not count twice)."""
        x = as_uint8(x, "x", self.protocol.to_uint8).to(self.device)
        if not isinstance(self.inception, Missing):
            feats = self.inception(x)
            if fid:
                self.fid.update(feats, real=True)
            if self.pool is not None:
                self.pool["real"].update(feats[:, :self.inception.pool_dim])
        if fid:
            self.n_real.update(x.shape[0])

    @torch.no_grad()
    def update_fake(self, x: torch.Tensor) -> None:
        """Generated samples: uint8 (B,3,H,W) or float in [-1,1]."""
        x = as_uint8(x, "x", self.protocol.to_uint8).to(self.device)
        if not isinstance(self.inception, Missing):
            feats = self.inception(x)  # one pass for both metrics
            self.fid.update(feats, real=False)
            self.inception_score.update(feats)
            if self.pool is not None:
                self.pool["fake"].update(feats[:, :self.inception.pool_dim])
        self.n_fake.update(x.shape[0])

    def reset(self) -> None:
        """Start a new evaluation (keeps the network)."""
        for m in (self.n_real, self.n_fake, *(self.pool or {}).values()):
            m.reset()
        if not isinstance(self.inception, Missing):
            self.fid.reset()
            self.inception_score.reset()

    def compute(self) -> dict[str, float | Missing]:
        n_real, n_fake = self.n_real.total(), self.n_fake.total()
        out: dict[str, float | Missing] = {"n_real": float(n_real), "n_fake": float(n_fake)}
        if isinstance(self.inception, Missing):
            return {**out, "fid": self.inception, "is": self.inception, "is_std": self.inception}
        if n_real < 2 or n_fake < 2:
            out["fid"] = Missing(f"FID needs >= 2 real and >= 2 generated images, got {n_real} and {n_fake}")
        else:
            out["fid"] = finite_or_missing(float(self.fid.compute()), "FID")
        if n_fake < 2 * self.is_splits:
            miss = Missing(f"IS needs >= 2 * is_splits = {2 * self.is_splits} generated images, got {n_fake}")
            out["is"] = out["is_std"] = miss
        else:
            with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
                torch.manual_seed(0)  # torchmetrics shuffles before splitting: make it repeatable
                warnings.simplefilter("ignore", UserWarning)  # std of a single split
                mean, std = self.inception_score.compute()
            out["is"] = float(mean)
            out["is_std"] = float(std) if self.is_splits > 1 else Missing("is_std needs is_splits >= 2")
        if self.pool is not None:
            out.update(self._precision_recall())
        return out

    def _precision_recall(self) -> dict[str, float | Missing]:
        from torch_fidelity.metric_prc import prc_features_to_metric
        real, fake = self.pool["real"].compute(), self.pool["fake"].compute()
        out: dict[str, float | Missing] = {"n_real_features": float(len(real))}
        if min(len(real), len(fake)) <= self.prc_k:
            miss = Missing(f"precision / recall need more than k = {self.prc_k} reference images and samples, got "
                           f"{len(real)} and {len(fake)}" + (" (the reference came as precomputed mu / sigma: give "
                           "its images)" if len(real) == 0 and self.n_real.total() else ""))
            return {**out, "precision": miss, "recall": miss}
        # torch-fidelity's convention: features_1 the samples, features_2 the reference; k-NN radii by kthvalue(k + 1)
        r = prc_features_to_metric(fake, real, prc_neighborhood=self.prc_k, prc_batch_size=10000,
                                   save_cpu_ram=True, verbose=False)
        return {**out, "precision": float(r["precision"]), "recall": float(r["recall"])}
