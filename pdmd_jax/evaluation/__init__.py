"""Evaluation: sample-quality metrics against known Gaussian mixtures and two-sample distances."""

from pdmd_jax.evaluation.gmm_metrics import (
    assign_modes,
    boundary_distance,
    chi2_quantile,
    gmm_report,
    intra_mode_std_ratio,
    markdown_table,
    mmd_rbf,
    mode_radii,
    mode_weights,
    modes_covered,
    sliced_wasserstein,
    weight_error,
)

__all__ = [
    "assign_modes",
    "boundary_distance",
    "chi2_quantile",
    "gmm_report",
    "intra_mode_std_ratio",
    "markdown_table",
    "mmd_rbf",
    "mode_radii",
    "mode_weights",
    "modes_covered",
    "sliced_wasserstein",
    "weight_error",
]
