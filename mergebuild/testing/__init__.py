"""Helpers that fabricate realistic checkpoints (real key names, shrunk or full shapes) for the
examples, the tests and the benchmarks: nothing can be downloaded from a model hub here."""
