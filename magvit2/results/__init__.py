"""MLflow runs -> typed pandas tables and plots for the ablation reports (used by analysis/*.py notebooks)."""

from magvit2.results.loaders import MODEL_ORDER, bits_of, load_history, load_runs, resolve_uri
from magvit2.results.plots import missing_note, plot_curves, plot_scaling, plot_utilization
from magvit2.results.stats import aggregate
from magvit2.results.tables import ar_table, reference_table, seeds_markdown, to_markdown, tokenizer_table

__all__ = ["MODEL_ORDER", "bits_of", "load_history", "load_runs", "resolve_uri", "missing_note", "plot_curves",
           "plot_scaling", "plot_utilization", "aggregate", "ar_table", "reference_table", "seeds_markdown", "to_markdown",
           "tokenizer_table"]
