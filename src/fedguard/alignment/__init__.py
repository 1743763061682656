"""Safety alignment of the starting model (`fedguard align`), and the choice of a run's starting model."""

from fedguard.alignment.align import ensure_aligned, load_start_model, start_model_path

__all__ = ["ensure_aligned", "load_start_model", "start_model_path"]
