"""Commands of the `ftc` CLI kept in their own modules (registered on the group in ftc/cli.py)."""
