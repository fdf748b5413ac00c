"""Evaluation: paired sampling, digits-FID / class accuracy / paired MSE, and figures."""

from .metrics import DigitsFeatureExtractor, class_accuracy, clip_score, digits_fid, fid, paired_mse
from .plots import make_image_grid, plot_step_sizes, save_image_grid
from .sampling import balanced_labels, sample_class_conditional

__all__ = [
    "class_accuracy",
    "clip_score",
    "digits_fid",
    "fid",
    "make_image_grid",
    "paired_mse",
    "plot_step_sizes",
    "sample_class_conditional",
    "save_image_grid",
]
