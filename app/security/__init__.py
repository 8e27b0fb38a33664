"""What keeps edgebatch safe on a shared network: one small module per mechanism.

``paths``: output folder confinement, safe names, cache paths inside their root.
``sources``: which video sources a client may name, and credential redaction.
``auth``: the bearer token (file or env) and the check guarded routes run.
``bodies``: bounded inflate and JSON parsing of request bodies.
No Ray and no FastAPI here: the deployments hook these in (``deployments/http.py``).
"""
