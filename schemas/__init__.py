"""The JSON Schema of the spec format: the single source of truth."""
