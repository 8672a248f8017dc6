"""PatchGAN discriminator (pix2pix NLayer) and the GAN losses of the tokenizer stage.

Loss conventions (as in the reference): discriminator = hinge + LeCAM regularization; generator = non-saturating
softplus(-D(x_hat)). BatchNorm statistics are per process; convert with nn.SyncBatchNorm.convert_sync_batchnorm
if per-GPU batches are small.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class PatchDiscriminator(nn.Module):
    """conv4x4/2 -> LReLU, then (n_layers - 1) x [conv4x4/2 -> BN -> LReLU], conv4x4/1 -> BN -> LReLU, conv4x4/1 -> 1.

    Width doubles per layer, capped at 8 * ndf. Convs followed by BatchNorm have no bias (BN's shift replaces it).
    Output: one logit per overlapping patch, (B, 1, h, w) (30x30 for 256px inputs with n_layers=3).
    """

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        for name, v in (("in_channels", in_channels), ("ndf", ndf), ("n_layers", n_layers)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        c = ndf
        for i in range(1, n_layers + 1):
            c_next = ndf * min(2**i, 8)
            stride = 2 if i < n_layers else 1
            layers += [
                nn.Conv2d(c, c_next, 4, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(c_next),
                nn.LeakyReLU(0.2, True),
            ]
            c = c_next
        layers.append(nn.Conv2d(c, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # pix2pix init: conv weights N(0, 0.02); BN weight N(1, 0.02), bias 0; conv biases 0.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x)


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """0.5 * (E[relu(1 - D(x))] + E[relu(1 + D(x_hat))]); the 0.5 follows the reference (taming) convention."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def generator_adv_loss(logits_fake: Tensor, reduce: str = "image") -> Tensor:
    """Non-saturating generator loss -log sigmoid(D(x_hat)) = softplus(-D(x_hat)).

    reduce="image" (the original's): average each image's patch logits first, then the loss, then the batch mean.
    reduce="patch": the loss per patch logit, then the mean over all patches (a different gradient: every patch is
    pushed separately, and a confident patch no longer offsets a poor one).
    """
    if reduce == "image":
        return F.softplus(-logits_fake.flatten(1).mean(1)).mean()
    if reduce == "patch":
        return F.softplus(-logits_fake).mean()
    raise ValueError(f"reduce={reduce!r}: use 'image' (the original's) or 'patch'")


class LeCAM(nn.Module):
    """LeCAM regularization (Tseng et al. 2021): keeps D's real/fake logits near the EMA of the other side.

    reg = mean(relu(real - ema_fake)^2) + mean(relu(ema_real - fake)^2)

    When the EMAs move: in training mode, forward() first folds the batch means into the EMAs, then computes reg
    with the updated anchors (the order of the LeCAM paper's code and the reference), so a single call per
    discriminator step is all a training loop needs. In eval mode forward() is pure. The EMAs start at 0 (as in the
    reference), are buffers (saved in state_dict, restored on resume) and are per process: with DDP each rank
    keeps its own anchors, which differ only by the batch noise of the means.
    """

    ema_real: Tensor
    ema_fake: Tensor

    def __init__(self, decay: float = 0.999, init: float = 0.0):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay!r}")
        self.decay = decay
        self.register_buffer("ema_real", torch.tensor(float(init)))
        self.register_buffer("ema_fake", torch.tensor(float(init)))

    @torch.no_grad()
    def update(self, logits_real: Tensor, logits_fake: Tensor) -> None:
        """ema <- decay * ema + (1 - decay) * batch mean (logits are detached)."""
        self.ema_real.lerp_(logits_real.detach().float().mean(), 1.0 - self.decay)
        self.ema_fake.lerp_(logits_fake.detach().float().mean(), 1.0 - self.decay)

    def forward(self, logits_real: Tensor, logits_fake: Tensor) -> Tensor:
        if self.training:
            self.update(logits_real, logits_fake)
        ema_real = self.ema_real.to(logits_real.dtype)
        ema_fake = self.ema_fake.to(logits_fake.dtype)
        return F.relu(logits_real - ema_fake).pow(2).mean() + F.relu(ema_real - logits_fake).pow(2).mean()
