"""Every logged metric key, defined once: what it is called, its unit and format, which way is better, its N, and
whether it may be compared across factorizations. The report's tables and plots, the end-of-run summary,
`python -m magvit2.evaluate`'s printout and a sweep's winner all read these rows. Plain Python (no torch, pandas or
mlflow): a login node's sweep status imports it.

Adding a metric: log it, add its row here (with `table=` to show it in the report's table)."""
from __future__ import annotations

import re
from dataclasses import dataclass, replace

CLAIM, COUNT, DESCRIPTION, TRAIN = "claim", "count", "description", "train"


@dataclass(frozen=True)
class Metric:
    key: str  # as logged; "{k}" stands for a sub-token number 1..M
    label: str  # the one name shown for it (table column, plot axis, printouts), its unit included
    unit: str = ""  # of the shown value (after `scale`)
    fmt: str = ".4g"  # format spec of the shown value in printouts
    better: str | None = None  # "lower" | "higher"; None: no best (an N, perplexity, a cost)
    scale: float = 1.0  # shown = logged x scale (100: a fraction shown in percent)
    n: tuple[str, ...] = ()  # the count keys saying what the value was computed on, printed "N vs M"
    comparable: bool = True  # across factorizations: a per-sub-token loss is not (6 bits vs 18 bits per sub-token)
    # claim: an evaluation result; count: an N; description: what a run took or is (cost, throughput, size), never
    # ranked; train: a training-loop signal
    kind: str = CLAIM
    table: str = ""  # the report table that shows it: "tokenizer", "ar", "cost" (both); "" none
    if_logged: bool = False  # in its table only when some run logged it
    seeds: str = "mean"  # over an arm's seeds: "mean" (± interval), "constant" (same for every seed), "sum"
    noun: str = ""  # count rows: what is counted ("images")
    note: str = ""  # what exactly it is, where its label is not enough

    @property
    def percent(self) -> bool:
        return self.unit == "%"

    @property
    def ranked(self) -> bool:
        """Whether a best value across factorizations means something."""
        return self.kind == CLAIM and self.better is not None and self.comparable

    def shown(self, v: float) -> float:
        return v * self.scale

    def number(self, v: float) -> str:
        """The shown value in the row's format ('25.00' for a utilization of 0.25)."""
        return format(self.shown(v), self.fmt)

    def text(self, v: float) -> str:
        """The value with its unit, for a line without the label ('25.00%', '24.50 dB')."""
        return self.number(v) + ("%" if self.percent else f" {self.unit}" if self.unit else "")

    def of(self, k: int) -> Metric:
        """A per-sub-token row for sub-token k."""
        return replace(self, key=self.key.format(k=k), label=self.label.format(k=k))


_IMG, _TOK, _GEN, _FID, _VAL = ("eval/n_images",), ("eval/n_tokens",), ("eval/n_samples",), \
    ("eval/n_samples", "eval/n_real"), ("val/n_images",)
_INCEPTION = "on the 2015-12-05 Inception's pool features, as the ADM evaluator"

ROWS = (
    # the tokenizer's evaluation (held-out split, EMA weights; magvit2.evaluate tokenizer: an image folder)
    Metric("eval/rfid", "rFID", fmt=".2f", better="lower", n=_IMG, table="tokenizer",
           note="Fréchet distance of reconstructions to their originals " + _INCEPTION),
    Metric("eval/psnr", "PSNR (dB)", "dB", ".2f", "higher", n=_IMG, table="tokenizer"),
    Metric("eval/ssim_skimage", "SSIM", fmt=".3f", better="higher", n=_IMG, table="tokenizer",
           note="scikit-image's 7x7 uniform window: the reference's"),
    Metric("eval/ssim", "SSIM (Gaussian 11x11)", fmt=".3f", better="higher", n=_IMG, table="tokenizer",
           note="torchmetrics'"),
    Metric("eval/lpips", "LPIPS", fmt=".3f", better="lower", n=_IMG, table="tokenizer", note="VGG16 trunk"),
    Metric("eval/lpips_alex", "LPIPS-Alex", fmt=".3f", better="lower", n=_IMG, table="tokenizer", if_logged=True,
           note="AlexNet trunk (metrics.protocol=reference reports both, as the original)"),
    Metric("eval/n_images", "N img", fmt=",.0f", kind=COUNT, table="tokenizer", seeds="constant", noun="images"),
    Metric("eval/utilization", "utilization (%)", "%", ".2f", "higher", 100.0, _TOK, table="tokenizer",
           note="share of the codebook's codes used"),
    Metric("eval/perplexity", "perplexity", fmt=".0f", n=_TOK, table="tokenizer",
           note="exp of the entropy of the code histogram"),
    Metric("eval/n_tokens", "N tokens", fmt=",.0f", kind=COUNT, table="tokenizer", seeds="constant",
           noun="tokens"),
    # the AR's evaluation: in-loop samples vs val images (magvit2.evaluate ar: EVALUATE below)
    Metric("eval/fid", "FID (in-loop)", fmt=".2f", better="lower", n=_FID, table="ar",
           note="the run's samples vs the validation images, not the paper's 50k-sample gFID"),
    Metric("eval/is", "IS", fmt=".2f", better="higher", n=_GEN, table="ar"),
    Metric("eval/n_samples", "N samples", fmt=",.0f", kind=COUNT, table="ar", seeds="constant", noun="samples"),
    Metric("eval/n_real", "N val img", fmt=",.0f", kind=COUNT, table="ar", seeds="constant", noun="val images"),
    Metric("val/loss", "val loss (nats)", "nats", ".3f", "lower", n=_VAL, table="ar",
           note="sum over sub-tokens of the mean cross-entropy: the NLL per token"),
    Metric("val/n_images", "N val loss img", fmt=",.0f", kind=COUNT, table="ar", seeds="constant", noun="images"),
    Metric("val/loss_{k}", "val loss {k} (nats)", "nats", ".3f", "lower", n=_VAL, comparable=False, table="ar",
           note="cross-entropy of sub-token k: its vocabulary is 2^bits of that sub-token"),
    Metric("derived.params", "params (incl. head)", fmt=",.0f", kind=DESCRIPTION, table="ar", seeds="constant",
           note="every parameter, the 2^K-way output head included"),
    Metric("eval/precision", "precision", fmt=".3f", better="higher", n=_FID, table="ar", if_logged=True,
           note="k = 3 nearest neighbours " + _INCEPTION),
    Metric("eval/recall", "recall", fmt=".3f", better="higher", n=_FID, table="ar", if_logged=True,
           note="k = 3 nearest neighbours " + _INCEPTION),
    Metric("eval/is_std", "IS std (10 splits)", fmt=".2f", n=_GEN),
    Metric("eval/fid_adm_stats", "FID vs ADM mu/sigma", fmt=".2f", better="lower", n=_GEN,
           note="the samples' features against the reference batch's precomputed statistics (ADM's TensorFlow "
                "Inception): two implementations in one number; FID beside it uses the batch's images"),
    Metric("eval/n_fake", "N generated img", fmt=",.0f", kind=COUNT, seeds="constant", noun="samples"),
    Metric("eval/n_real_features", "N ref features", fmt=",.0f", kind=COUNT, seeds="constant", noun="images"),
    Metric("val/acc_{k}", "val accuracy {k}", fmt=".3f", better="higher", n=_VAL, comparable=False),
    Metric("val/n_tokens", "N val tokens", fmt=",.0f", kind=COUNT, seeds="constant", noun="tokens"),
    # what a run cost (magvit2.runtime.compute); throughput only where some run logged it
    Metric("compute/images_per_s", "images/s", kind=DESCRIPTION, table="tokenizer", if_logged=True),
    Metric("compute/tokens_per_s", "tokens/s", kind=DESCRIPTION, table="ar", if_logged=True),
    Metric("compute/sample_images_per_s", "sampling images/s", kind=DESCRIPTION, table="ar", if_logged=True),
    Metric("compute/wall_s", "wall (s)", "s", kind=DESCRIPTION, table="cost", if_logged=True),
    Metric("compute/device_hours", "device-hours", fmt=".3g", kind=DESCRIPTION, table="cost", if_logged=True,
           seeds="sum", note="training wall time x processes, all attempts"),
    Metric("compute/flops_per_step", "model GFLOP/step", "GFLOP", scale=1e-9, kind=DESCRIPTION, table="cost",
           if_logged=True, seeds="constant", note="AR analytic, tokenizer measured"),
    Metric("compute/mfu", "MFU (%)", "%", ".2f", scale=100.0, kind=DESCRIPTION, table="cost", if_logged=True,
           note="model FLOPs per second over the device's peak"),
    Metric("compute/peak_gpu_mem_gib", "peak GPU mem (GiB)", "GiB", kind=DESCRIPTION, table="cost", if_logged=True,
           note="max allocated"),
    Metric("compute/peak_rss_gib", "peak RSS (GiB, CPU)", "GiB", kind=DESCRIPTION, table="cost", if_logged=True,
           note="the process's max resident set, on CPU (another quantity than GPU memory)"),
    Metric("compute/steps_per_s", "steps/s", kind=DESCRIPTION),
    Metric("compute/achieved_tflops", "achieved TFLOP/s", "TFLOP/s", kind=DESCRIPTION),
    Metric("compute/world_size", "processes", fmt=".0f", kind=DESCRIPTION, seeds="constant"),
    Metric("sweep/wall_s", "sweep wall (s)", "s", kind=DESCRIPTION),
    Metric("sweep/device_hours", "sweep device-hours", fmt=".3g", kind=DESCRIPTION, seeds="sum"),
    # training signals (both loops)
    Metric("train/loss", "train loss", kind=TRAIN, better="lower", comparable=False),
    Metric("train/loss_{k}", "train loss {k} (nats)", "nats", kind=TRAIN, better="lower", comparable=False),
    Metric("train/acc_{k}", "train accuracy {k}", kind=TRAIN, better="higher", comparable=False),
    Metric("train/lr", "learning rate", kind=TRAIN),
    Metric("train/tokens_per_s", "train tokens/s", kind=DESCRIPTION),
    Metric("train/rec_l1", "train L1", kind=TRAIN, better="lower"),
    Metric("train/perceptual", "train LPIPS loss", kind=TRAIN, better="lower"),
    Metric("train/g_adv", "generator GAN loss", kind=TRAIN),
    Metric("train/d_loss", "discriminator hinge loss", kind=TRAIN),
    Metric("train/lecam", "LeCAM", kind=TRAIN),
    Metric("train/utilization_batch", "batch utilization (%)", "%", ".2f", scale=100.0, kind=TRAIN,
           note="codes used in one batch over the codebook size"),
    Metric("train/commit", "commitment loss", kind=TRAIN),
    Metric("train/codebook", "codebook loss (VQ)", kind=TRAIN),
    Metric("train/entropy_sample", "per-sample entropy", "nats", kind=TRAIN),
    Metric("train/entropy_codebook", "codebook entropy", "nats", kind=TRAIN),
    Metric("train/entropy_aux", "entropy loss", kind=TRAIN),
    Metric("train/unique_codes", "codes in batch", fmt=".0f", kind=TRAIN),
    Metric("train/dead_codes", "dead codes (VQ)", fmt=".0f", kind=TRAIN, note="codes unused for dead_after steps"),
    Metric("train/restarted", "restarted codes (VQ)", fmt=".0f", kind=TRAIN),
    Metric("data/skipped_images", "skipped images", fmt=".0f", kind=TRAIN, note="unreadable images replaced so far"),
)

# The same keys as logged by `python -m magvit2.evaluate ar`: the paper's protocol (samples per class vs a reference
# batch), so not "in-loop", and its N of real images counts the reference.
EVALUATE = {
    "eval/fid": "FID",
    "eval/n_real": "N ref img",
}

_BY_KEY = {r.key: r for r in ROWS if "{k}" not in r.key}
_PATTERNS = [(re.compile(re.escape(r.key).replace(re.escape("{k}"), r"(\d+)") + "$"), r) for r in ROWS
             if "{k}" in r.key]
_LABEL_PATTERNS = [(re.compile(re.escape(r.label).replace(re.escape("{k}"), r"(\d+)") + "$"), r) for r in ROWS
                   if "{k}" in r.label]


def get(key: str, evaluate: bool = False) -> Metric | None:
    """The row of a logged key (a sub-token's key filled in: 'val/loss_2'); None when it has none. evaluate: as
    `python -m magvit2.evaluate` reports it."""
    row = _BY_KEY.get(key)
    if row is None:
        row = next((r.of(int(m.group(1))) for p, r in _PATTERNS for m in [p.match(key)] if m), None)
    if row is not None and evaluate and key in EVALUATE:
        row = replace(row, label=EVALUATE[key], noun="reference images" if key == "eval/n_real" else row.noun,
                      note="" if key == "eval/fid" else row.note)
    return row


def by_label(label: str) -> Metric | None:
    """The row a shown label names (either protocol's), else None (status, steps, ...)."""
    row = next((r for r in ROWS if r.label == label and "{k}" not in r.label), None)
    if row is None:
        row = next((get(k, evaluate=True) for k, v in EVALUATE.items() if v == label), None)
    return row or next((r.of(int(m.group(1))) for p, r in _LABEL_PATTERNS for m in [p.match(label)] if m), None)


def label(key: str, evaluate: bool = False) -> str:
    """The one name of a key (the key itself when it has no row)."""
    row = get(key, evaluate)
    return row.label if row else key


def table_rows(table: str, subtokens: int = 0) -> list[Metric]:
    """The rows a report table shows, in column order; per-sub-token rows for sub-tokens 1..subtokens."""
    out = []
    for r in ROWS:
        if r.table == table:
            out += [r.of(k) for k in range(1, subtokens + 1)] if "{k}" in r.key else [r]
    return out


def n_text(key: str, values: dict, evaluate: bool = False) -> str:
    """'64 images' or '80 samples vs 20 val images': the N a value of `key` was computed on, from the count keys
    logged beside it in `values` ('?' where one was not logged: a run from before N was logged)."""
    row = get(key, evaluate)
    parts = []
    for k in row.n if row else ():
        c = get(k, evaluate)
        v = values.get(k)
        parts.append(f"{v:,.0f} {c.noun}" if isinstance(v, (int, float)) else f"? {c.noun}")
    return " vs ".join(parts)
