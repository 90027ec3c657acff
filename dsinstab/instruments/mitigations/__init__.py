"""Mitigations from the literature, one plug-in per file, each switched on by one config key.

Every decision comes from values that are the same on every rank (DeepSpeed's reduced grad norm,
the loss and logit maxima reduced with the step's readings), and every value the host needs reaches
it with the step's one copy. Nothing is built when a key is off.
"""
