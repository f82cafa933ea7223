"""Data sources: analytic Gaussian mixtures (exact teachers)."""
