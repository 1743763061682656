"""Differential privacy: client-level DP-FedAvg with a maintained accountant (``dp-accounting``)."""
