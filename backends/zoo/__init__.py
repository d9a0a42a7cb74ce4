"""Real pretrained networks that ship offline inside pip wheels, for demos and cross-checks.

Each module imports its framework only when a function that needs it is called.
"""
