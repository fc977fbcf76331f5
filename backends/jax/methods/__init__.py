"""Methods: what trains, as a transformation of the model (full, lora, qlora, adapter, probe)."""
