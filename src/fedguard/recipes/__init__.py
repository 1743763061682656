"""Recipes built on whole runs: safety sweeps over ratios and levels (``sweep``), the aggregator study
(``aggregator_study``). Alignment (``fedguard.alignment``) and split runs (``fedguard.split``) live with their
own parts."""
