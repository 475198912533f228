"""Adapters to the tools people already use, one module per library, each behind its own extra.

Nothing in treegym imports this package, and importing it imports no adapter: `import
treegym.integrations.openenv` needs `pip install "treegym[openenv]"`, `treegym.integrations.trl`
needs `treegym[trl]`, and so on (each module's ImportError names its extra).
"""
