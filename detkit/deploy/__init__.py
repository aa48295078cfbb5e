"""Deployment: exported files checked against PyTorch (``parity``) and run by other runtimes."""
