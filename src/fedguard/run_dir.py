"""Run folders: where a run's config, metrics, checkpoints and log live, and how a new one is named."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import yaml

from fedguard.config import ExperimentConfig, build_config

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.ndjson"
FINAL_METRICS_FILE = "final_metrics.json"


def new_run_dir(cfg: ExperimentConfig, kind: str = "") -> Path:
    """A fresh ``OUTPUT_DIR/NAME[-KIND]-TIMESTAMP[-N]`` (``kind``: e.g. ``split``, ``split-server``)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(cfg.output_dir) / f"{cfg.name}{'-' + kind if kind else ''}-{stamp}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def load_run_config(run_dir: Path) -> ExperimentConfig:
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no {CONFIG_FILE})")
    return build_config(yaml.safe_load(path.read_text(encoding="utf-8")) or {})


class RunLog:
    """Log to a file in the run directory (always) and to the console (rich) unless told not to."""

    def __init__(self, run_dir: Path, console=None, file_name: str = "run.log", console_output: bool = True):
        from rich.logging import RichHandler

        self.handlers: list[logging.Handler] = []
        fh = logging.FileHandler(run_dir / file_name, encoding="utf-8")
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.handlers.append(fh)
        if console_output:
            rh = RichHandler(console=console, show_path=False, rich_tracebacks=False, markup=False)
            rh.setFormatter(logging.Formatter("%(message)s"))
            self.handlers.append(rh)
        self.logger = logging.getLogger("fedguard")
        self.previous_level = self.logger.level
        self.logger.setLevel(logging.INFO)
        for h in self.handlers:
            self.logger.addHandler(h)

    def close(self) -> None:
        for h in self.handlers:
            self.logger.removeHandler(h)
            h.close()
        self.logger.setLevel(self.previous_level)


def console_log() -> None:
    """fedguard's INFO lines on the console, for commands that write no run folder (align, probe build)."""
    from rich.logging import RichHandler

    logger = logging.getLogger("fedguard")
    logger.setLevel(logging.INFO)
    logger.addHandler(RichHandler(show_path=False))
