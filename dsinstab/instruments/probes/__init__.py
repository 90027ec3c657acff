"""Probes that explain a spike, one per file, each run on probe steps only (``trainer.diagnostics``)."""
