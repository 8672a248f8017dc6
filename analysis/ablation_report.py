# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # magvit2 ablation report
#
# Tables and plots of the member runs of one sweep (or experiment), read from MLflow. Executed headless by
# `python -m magvit2.report --sweep ID`, which fills the parameters below; open it in Jupyter to explore further.

# %% tags=["parameters"]
sweep = None
experiment = None
tracking_uri = None
out_dir = "report"

# %%
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm's notebook bar; no widgets needed here

from IPython.display import Image, Markdown, display

from magvit2.results import (aggregate, ar_table, load_history, load_runs, missing_note, plot_curves, plot_scaling,
                              plot_utilization, reference_table, resolve_uri, seeds_markdown, to_markdown,
                              tokenizer_table)
from magvit2.results import experiments

out = Path(out_dir)
out.mkdir(parents=True, exist_ok=True)
df = load_runs(sweep=sweep, experiment=experiment, tracking_uri=tracking_uri)
if df.empty:
    raise ValueError(f"no member runs for sweep={sweep!r} experiment={experiment!r} in {resolve_uri(tracking_uri)}")
print(f"{len(df)} runs from {resolve_uri(tracking_uri)}")
print(f"kernel python: {sys.executable}")
df[["run_name", "stage", "status", "factorization", "model", "run_id"]]

# %% [markdown]
# ## Tables
# A dash is a metric that was not logged; the numbered list under a table gives the reason recorded with the run.
# The best value of each metric column is in bold (lower is better for FID, rFID, LPIPS and losses; higher for PSNR,
# SSIM, IS, utilization, precision and recall; a per-sub-token loss only among rows of one factorization, as its
# vocabulary differs between them). Each metric comes with its N (images, tokens, samples): compare FIDs only at
# equal N. Labels, units and directions: magvit2/metrics/registry.py.
# "SSIM" is scikit-image's 7x7 uniform-window SSIM (the reference's); "SSIM (Gaussian 11x11)" is torchmetrics'.
# "FID (in-loop)" is the training run's samples against the validation images, not the paper's gFID (50,000
# samples, 50 per class, vs the ADM ImageNet-256 reference batch); precision and recall, where the runs were asked
# for them (metrics.precision_recall), use k = 3 nearest neighbours on the same Inception features and N. Losses
# are in nats; "steps (schedule)" are the planned steps (status says whether the run got there); "params (incl.
# head)" counts every parameter, the 2^K-way output head included. Cost columns (where the runs logged them): wall time and device-hours (time x processes,
# all attempts), training throughput, model FLOPs per step (AR analytic, tokenizer measured), MFU where the device's
# peak is known (else a numbered reason), peak memory (GPU: max allocated; CPU: process max RSS).
#
# Members that differ only in seed form an arm: its table shows mean ± std and the 95% Student-t interval over its
# n seeds, says which arms have n = 1, and whether the best arm's interval overlaps each other arm's.

# %%
sections = []
tok = df[df["stage"] == "tokenizer"]
ar = df[df["stage"] == "ar"]



def with_seeds(t):
    """The members table, and its seed aggregate when some arm has several seeds."""
    several = "seed" in t.index.names
    return to_markdown(t) + (f"\nBy arm, over seeds:\n\n{seeds_markdown(aggregate(t))}" if several else "")


if len(tok):
    sections.append("### Tokenizers (reconstruction, codebook)\n\n" + with_seeds(tokenizer_table(tok)))
if len(ar):
    sections.append("### Autoregressive generators (factorization x model)\n\nFID (in-loop): N samples vs N val "
                    "images, not the paper's 50k-sample gFID.\n\n" + with_seeds(ar_table(ar)))
# reference rows: released weights evaluated with `python -m magvit2.evaluate` in the same store
refs = load_runs(tracking_uri=tracking_uri, reference=True)
for stage, what in (("tokenizer", "tokenizers"), ("ar", "generators")):
    if len(refs) and (refs["stage"] == stage).any() and (stage == "tokenizer" and len(tok) or stage == "ar" and len(ar)):
        sections.append(f"### Reference rows: released {what} (`python -m magvit2.evaluate`, the paper's protocol "
                        f"at its N)\n\n" + to_markdown(reference_table(refs, stage)))
tables_md = "\n".join(sections)
(out / "tables.md").write_text(tables_md)
display(Markdown(tables_md))

# %% [markdown]
# ## The experiment
# A sweep of a ready experiment (`+experiment=NAME`, found in its members' overrides) gets its own section: its
# columns, the seed aggregate with the overlap notes for its key metrics, and a plot of each key metric per arm
# (mean, 95% interval). cross_dataset reads the `python -m magvit2.evaluate tokenizer` runs of its tokenizers.

# %%
name = experiments.detect(df)
exp_pngs = []
if name in experiments.EXPERIMENTS:
    evals = None
    if name == "cross_dataset":
        try:
            evals = load_runs(experiment="magvit2-evaluate", tracking_uri=tracking_uri)
        except ValueError:  # nothing evaluated yet: the section says so
            pass
    exp_md, exp_pngs = experiments.section(df, name, out, evals)
    (out / "tables.md").write_text(tables_md + "\n" + exp_md)
    display(Markdown(exp_md))
else:
    print(f"no ready experiment detected ({name or 'none'}): the tables above are the report")

# %% [markdown]
# ## Plots

# %%
pngs, notes = list(exp_pngs), []


def slug(key):
    return key.replace("/", "_")


def keep(fig, path, runs, key):
    """A plot with data goes into the report; a metric no run logged gets a line in the text instead."""
    if fig is None:
        notes.append(missing_note(runs, key))
    else:
        pngs.append(path)


if len(ar):
    prc = [m for m in ("eval/precision", "eval/recall")  # metrics.precision_recall: plotted where asked for
           if m in ar or any(isinstance(d, dict) and m in d for d in ar.get("missing", []))]
    for metric in ("eval/fid", "eval/is", *prc, "val/loss"):
        p = out / f"scaling_{slug(metric)}.png"
        keep(plot_scaling(ar, metric, p), p, ar, metric)
    hist = load_history(ar["run_id"], ["train/loss", "val/loss", "val/loss_*"], tracking_uri)
    for key in ["train/loss", "val/loss"] + sorted(k for k in hist["key"].unique() if k.startswith("val/loss_")):
        p = out / f"curve_{slug(key)}.png"
        keep(plot_curves(hist, key, p), p, ar, key)
if len(tok):
    hist = load_history(tok["run_id"], ["eval/utilization", "train/loss", "eval/rfid"], tracking_uri)
    p = out / "utilization.png"
    keep(plot_utilization(hist, p), p, tok, "eval/utilization")
    for key in ("train/loss", "eval/rfid"):
        p = out / f"curve_tokenizer_{slug(key)}.png"
        keep(plot_curves(hist, key, p), p, tok, key)
notes_md = "".join(f"- {n}\n" for n in notes)
(out / "notes.md").write_text(notes_md)
if notes:
    display(Markdown("Not plotted:\n\n" + notes_md))
for p in pngs:
    display(Markdown(f"**{p.name}**"), Image(filename=str(p)))
