"""The operator's console: static pages served by the ``edgebatch`` app at ``/ui`` and the pure
aggregation of what they show (``views``); the Serve side is ``deployments/console.py``."""
