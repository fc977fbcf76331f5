"""Objectives: what the train and eval steps compute (sft, dpo)."""
