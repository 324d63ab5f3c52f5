"""Hospital deployment: the site YAML, certificates and keys, the SuperNode / SuperLink command lines, the
SuperLink's Fleet gateway and the site's FAB check.

Never imports ``flwr`` (docs/architecture.md, invariant 1): Flower is driven through its console scripts. One exception,
inside a function: ``fab_guard.main`` is the ClientApp process a site's SuperExec starts, so it runs Flower's
own ``flwr-clientapp`` there, with the FAB checked first.
"""
