"""Adapters to outside RL libraries, one module per library, each behind its own extra.

Nothing in treegym imports this package, and importing it imports no adapter: `import
treegym.integrations.openenv` needs `pip install "treegym[openenv]"`, and so on.
"""
