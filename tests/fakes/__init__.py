"""Fakes for hardware paths this machine cannot run (TensorRT, CUDA); they record and check the calls."""
