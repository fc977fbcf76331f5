"""Model families: the Family contract (family.py), shared layers, one file per family."""
