"""Adapters to the tools people already use (one module per library, each behind its own extra).

Nothing in treegym imports this package; each module imports only its own library.
"""
