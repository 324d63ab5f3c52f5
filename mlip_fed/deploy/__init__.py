"""Hospital deployment: the site YAML, certificates and keys, and the SuperNode / SuperLink command lines.

Never imports ``flwr`` (DESIGN.md, invariant 1): Flower is driven through its console scripts.
"""
