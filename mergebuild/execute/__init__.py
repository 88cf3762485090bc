"""Execution: stream tensors through merge methods on a device, into the cache and the outputs."""
