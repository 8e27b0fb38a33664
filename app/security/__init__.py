"""What keeps edgebatch safe on a shared network: one small module per mechanism.

``paths``: output folder confinement, safe names, cache paths inside their root.
``sources``: which video sources a client may name, and credential redaction.
``auth``: the bearer token and the FastAPI check that guards routes.
``bodies``: bounded inflate and JSON parsing of request bodies.
No Ray, no FastAPI at import (``auth`` imports FastAPI lazily where it builds the check).
"""
