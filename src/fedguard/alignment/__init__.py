"""Safety alignment of the starting model (`fedguard align`), and the choice of a run's starting model.

Names are imported on first use, so the command line's ``alignment.cli`` does not pull in torch.
"""

from importlib import import_module

_EXPORTS = {"ensure_aligned": "align", "load_start_model": "align", "start_model_path": "align"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fedguard.alignment' has no attribute {name!r}")
    return getattr(import_module(f"fedguard.alignment.{_EXPORTS[name]}"), name)
