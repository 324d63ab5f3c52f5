"""The non-Flower logic of a federated round (docs/architecture.md, invariant 1: never imports flwr).

``server/`` and ``client/`` translate Flower messages to and from the types in ``payload`` and call
``coordinator`` (server side) and ``site`` (client side); everything that can be unit-tested without
Ray lives here.
"""
