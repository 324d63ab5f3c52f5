"""mlip-fed: federated MLIP pretraining for chest X-rays.

The library never imports ``flwr`` (docs/architecture.md, invariant 1): everything here runs the same
centrally and inside a Flower ClientApp.
"""

__version__ = "0.1.0"
