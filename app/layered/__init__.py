"""Layer loading (EdgeCaffe): run models stage by stage under a memory budget, and host many models.

``executor``: carries out ``policies.loading`` plans with ONNX Runtime and a memory ledger;
``multimodel``: whole models in an LRU under the budget, split execution for the rest;
``synthetic``: offline conv nets of chosen size for tests and ``edgebatch bench loading``.
Plain Python, no Ray.
"""
