"""CLI commands that live in their own modules (registered on the group in ftc/cli.py, one line
each). Like cli.py, a command module imports only click at import time; its body imports jax."""
