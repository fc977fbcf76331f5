"""Training: the jitted step, optimizer, mesh, multi-process launch and run logging."""
