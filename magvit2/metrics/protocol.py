"""Evaluation protocols: how images become numbers. `reference` (the default) is the original's arithmetic
(TencentARC/SEED-Voken: evaluation_image.py, sample.py); `precise` is this project's earlier arithmetic, kept as a
named alternative because it skips a quantization step.

| step | reference | precise |
|---|---|---|
| PSNR / SSIM inputs | `(x+1)/2*255` truncated to uint8, then /255 | the unquantized floats |
| rFID Inception input | pytorch-fid: float [0,1], F.interpolate(299, bilinear, align_corners=False), 2x-1 | torch-fidelity: rounded uint8, TF1-style resize |
| LPIPS trunks | VGG (`lpips`) and AlexNet (`lpips_alex`) | VGG |
| generated images -> uint8 (npz, gFID, IS) | `(255*(x+1)/2).clip(0,255)` truncated | rounded |

Both rFID paths load the same FID weights file (pt_inception-2015-12-05; the two libraries' files share one key
layout). gFID always uses torch-fidelity's port of the TF graph on uint8 images, on both sides where the reference
batch holds images. Torch-free: the config validation imports PROTOCOLS.
"""
from __future__ import annotations

from dataclasses import dataclass

SETTING = "metrics.protocol"


@dataclass(frozen=True)
class Protocol:
    name: str
    pixels: str  # "trunc": PSNR/SSIM on uint8-truncated images; "float": on the floats
    rfid_input: str  # "pytorch_fid": float [0,1] into pytorch-fid's InceptionV3; "uint8": torch-fidelity's
    lpips_nets: tuple[str, ...]  # lpips trunks; the first reports as `lpips`, the others as `lpips_<net>`
    to_uint8: str  # generated images: "trunc" or "round"


PROTOCOLS = {
    "reference": Protocol("reference", pixels="trunc", rfid_input="pytorch_fid", lpips_nets=("vgg", "alex"),
                          to_uint8="trunc"),
    "precise": Protocol("precise", pixels="float", rfid_input="uint8", lpips_nets=("vgg",), to_uint8="round"),
}
DEFAULT = "reference"


def get(name: str | None) -> Protocol:
    """The named protocol (None: the default), or a ValueError naming the setting and the choices."""
    name = DEFAULT if name is None else name
    if name not in PROTOCOLS:
        raise ValueError(f"{SETTING}={name!r}: choose one of {', '.join(PROTOCOLS)} (reference: the original's "
                         f"evaluation arithmetic, the default)")
    return PROTOCOLS[name]
