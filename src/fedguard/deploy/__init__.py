"""A real Flower deployment of fedguard: the SuperLink, SuperNode and run processes (launch.py); their
credentials come from ``fedguard.pki``."""
