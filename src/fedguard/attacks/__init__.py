"""Simulated attacks. They live on the simulation side only and shape nothing but what a malicious
client sends: its data, its update, its attachments. No server code imports this package."""

from fedguard.attacks.clients import Attacker, MaliciousClient

__all__ = ["Attacker", "MaliciousClient"]
