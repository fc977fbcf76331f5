"""ftc: a fine-tuning compiler. Spec (data) -> Plan (data) -> Program (JAX) -> run artifacts."""

__version__ = "0.1.0"
