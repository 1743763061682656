"""A real Flower deployment of fedguard: credentials (certs.py) and the processes (launch.py)."""
