"""The Flower wire format both apps speak: ``mlip_fed.federation`` payloads <-> Flower records (``codec``).

A package of its own because it is the one piece the ServerApp and the ClientApp share: it imports Flower, so it
cannot live in ``mlip_fed`` (which never does), and neither app may import the other. Installed with the project
like ``mlip_fed`` (not shipped in the FAB), so what a site encodes and releases comes from the site's own
environment.
"""
