"""Running sums as torchmetrics Metrics, so that under torch.distributed they are summed over ranks in compute()
together with torchmetrics' own FID/PSNR/SSIM states (every rank must then call compute())."""
from __future__ import annotations

import warnings

import torch
from torchmetrics import Metric


class MeanOverImages(Metric):
    """Mean of per-image values, summed in float64."""

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, per_image: torch.Tensor) -> None:
        self.total += per_image.detach().double().sum()
        self.count += per_image.numel()

    def compute(self) -> torch.Tensor:
        return self.total / self.count


class Count(Metric):
    """Number of items seen (over all ranks)."""

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("n", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, n: int) -> None:
        self.n += n

    def compute(self) -> torch.Tensor:
        return self.n

    def total(self) -> int:
        """compute() as an int; zero updates is a valid answer here, not a reason to warn."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*called before the ``update`` method.*")
            return int(self.compute())


class CodeHistogram(Metric):
    """How often each code index occurred (bincount with minlength = codebook size)."""

    full_state_update = False

    def __init__(self, codebook_size: int, **kwargs):
        super().__init__(**kwargs)
        self.codebook_size = codebook_size
        self.add_state("counts", torch.zeros(codebook_size, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, indices: torch.Tensor) -> None:
        self.counts += torch.bincount(indices.flatten().long(), minlength=self.codebook_size)

    def compute(self) -> torch.Tensor:
        return self.counts


class Rows(Metric):
    """Every row seen, concatenated over updates and (under torch.distributed) ranks: features kept whole, for the
    statistics that need them (precision / recall's k-NN balls), unlike FID's running sums."""

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("rows", default=[], dist_reduce_fx="cat")

    def update(self, rows: torch.Tensor) -> None:
        self.rows.append(rows.detach().float())

    def compute(self) -> torch.Tensor:
        from torchmetrics.utilities import dim_zero_cat
        return dim_zero_cat(self.rows) if len(self.rows) else torch.zeros(0, 0)
