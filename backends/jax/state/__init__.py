"""Run state: Orbax checkpoints and the frozen base rebuilt on resume."""
