"""Reports: paired statistics, comparisons, plots, model cards."""
