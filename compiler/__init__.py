"""Spec + model config + devices -> Plan (pure data)."""
