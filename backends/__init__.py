"""Plan -> Program. The spec stays framework-agnostic; each backend lowers a Plan."""
