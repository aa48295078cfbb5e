"""Diagnostics after evaluation and training: PR curves, confusion matrix, per-class AP table,
training curves (``results.png``), dataset statistics, prediction/GT drawings. Pictures are
matplotlib figures rendered with the Agg backend (no display needed)."""


class AnalysisError(ValueError):
    """Bad input to a diagnostic (missing run folder or metrics file, unknown key); the message says which."""


class RunDataError(AnalysisError):
    """A run's files are there but unusable (no evaluation yet, a damaged results json): bad data, not a bad
    argument (exit 1 where an :class:`AnalysisError` exits 2)."""
