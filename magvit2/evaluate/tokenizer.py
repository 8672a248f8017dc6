"""`python -m magvit2.evaluate tokenizer`: reconstruct an image folder, report rFID, PSNR, SSIM, LPIPS, utilization
and perplexity (the original's scripts/evaluation: ImageNet val 50k at 256 or 128; the tokenizer is fully
convolutional, so the 128-L tokenizer on 256px inputs gives the 32x32-token row). Under torchrun / accelerate launch
/ a SLURM job step each rank reconstructs every world-th image, and the metrics' states are summed over ranks."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from magvit2 import metrics as M
from magvit2.metrics import protocol as P
from magvit2.errors import ConfigError
from magvit2.evaluate import common
from magvit2.evaluate.images import ImageFiles
from magvit2.evaluate.shards import join_process_group, local_device, rank_world
from magvit2.evaluate.sources import load_tokenizer_source


def add_args(ap) -> None:
    ap.add_argument("source", help="a tokenizer run dir, its checkpoint.pt, or a released Open-MAGVIT2 .ckpt")
    ap.add_argument("--data", required=True, help="image folder (class subfolders like ImageNet val, or flat)")
    ap.add_argument("--resolution", type=int, default=None, help="shorter-side resize + center crop (default: the "
                    "tokenizer's own training resolution; another one is said, e.g. the 128-L at 256 for 32x32 tokens)")
    ap.add_argument("--num-images", type=int, default=None, help="evenly spaced subset (default: all)")
    ap.add_argument("--weights", default="ema", choices=("ema", "raw"), help="default ema (the original's)")
    ap.add_argument("--vgg16-weights", default=None, help="torchvision vgg16-397923af.pth (LPIPS); default: "
                    "torch hub's cache, else a download")
    ap.add_argument("--alexnet-weights", default=None, help="torchvision alexnet-owt-7be5be79.pth (LPIPS-Alex, "
                    "--protocol reference); default: torch hub's cache, else a download")
    common.add_common_args(ap)


@torch.no_grad()
def run(a) -> dict:
    for flag, v in (("--resolution", a.resolution), ("--num-images", a.num_images), ("--batch-size", a.batch_size)):
        if v is not None and v < 1:
            raise ConfigError(f"{flag} {v} must be >= 1")
    common.check_weight_files(a)
    ds = ImageFiles(a.data, a.resolution or 16, a.num_images)  # a bad folder fails before any weights load
    rank, world, how = rank_world()
    if world > len(ds):  # a rank without images would leave torchmetrics' list states out of the gather
        raise ConfigError(f"{world} processes ({how}) for {len(ds)} images: launch at most {len(ds)}")
    joined = join_process_group(world)
    try:
        return _evaluate(a, ds, rank, world, how)
    finally:
        if joined:
            torch.distributed.destroy_process_group()


def _evaluate(a, ds, rank: int, world: int, how: str) -> dict:
    tok, src = load_tokenizer_source(a.source, a.weights)
    if a.resolution is None:
        a.resolution = tok.resolution
        print(f"resolution {a.resolution} px: the tokenizer's own (--resolution to evaluate at another)")
    elif a.resolution != tok.resolution:
        print(f"note: evaluating at {a.resolution} px, not the tokenizer's training resolution {tok.resolution} px "
              f"({a.resolution // tok.downsample}x{a.resolution // tok.downsample} tokens)")
    if ds.res != a.resolution:
        ds = ImageFiles(a.data, a.resolution, a.num_images)
    if a.resolution % tok.downsample:
        raise ConfigError(f"--resolution {a.resolution} is not divisible by the tokenizer's downsampling "
                          f"{tok.downsample}: use a multiple of {tok.downsample}")
    device = local_device()
    tok.to(device)
    params = {"kind": "tokenizer", "source": str(src.path), "data": str(ds.root),
              "resolution": a.resolution, "num_images": len(ds), "weights": a.weights, "protocol": a.protocol,
              "tokens": f"{a.resolution // tok.downsample}x{a.resolution // tok.downsample}"}
    out = common.out_dir(a, "tokenizer", f"{src.name}-{a.resolution}px-{a.weights}", params)
    dl, proto = not a.no_download, P.get(a.protocol)
    alex = M.load_lpips(a.alexnet_weights, "alex", download=dl) if "alex" in proto.lpips_nets else None
    rm = M.ReconstructionMetrics(tok.quantizer.codebook_size, device=device, protocol=proto.name,
                                 lpips_model=M.load_lpips(a.vgg16_weights, download=dl), lpips_alex=alex,
                                 inception=M.inception_for_fid(a.inception_weights, download=dl,
                                                               kind=proto.rfid_input))
    mine = ds if world == 1 else Subset(ds, range(rank, len(ds), world))
    if world > 1:
        print(f"rank {rank} of {world} ({how}): {len(mine)} of {len(ds)} images")
    loader = DataLoader(mine, batch_size=a.batch_size or 32, num_workers=a.workers)
    bar = tqdm(loader, desc="reconstructing" + (f" (rank {rank})" if world > 1 else ""), unit="batch",
               mininterval=1.0)
    m, first = M.reconstruct(tok, bar, rm)  # every rank: torchmetrics sums the states over the process group
    if rank != 0:
        return {}
    out.mkdir(parents=True, exist_ok=True)
    from magvit2.metrics.grids import save_grid
    grid = save_grid(first, out / "recon_grid.png", labels=("original", "reconstruction"))
    metrics = {f"eval/{k}": v for k, v in m.items()}
    print(f"tokenizer {src.name} ({'released' if src.reference else 'run'}, {a.weights} weights) on {len(ds)} "
          f"images of {a.data} at {a.resolution}px: {params['tokens']} tokens")
    return common.finish(a, "tokenizer", src, out, params, metrics, {}, [grid],
                         ROWS + (("eval/lpips_alex",) if alex is not None else ()))


# its printout, in this order (labels, formats and N: magvit2.metrics.registry)
ROWS = ("eval/rfid", "eval/psnr", "eval/ssim_skimage", "eval/ssim", "eval/lpips", "eval/utilization",
        "eval/perplexity")
