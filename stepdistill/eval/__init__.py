"""Evaluation (DESIGN §7): exact GMM metrics, Fréchet distances through torchmetrics, image grids and plots."""
from .fid import build_fid_metric, frechet_distance, inception_fid
from .gmm_metrics import expected_high_quality_counts, gmm_metrics, mmd_rbf, mode_histogram, sliced_wasserstein
from .grids import save_gmm_scatter, save_image_grid

__all__ = ["build_fid_metric", "frechet_distance", "inception_fid", "gmm_metrics", "mmd_rbf", "mode_histogram",
           "expected_high_quality_counts", "sliced_wasserstein", "save_gmm_scatter", "save_image_grid"]
