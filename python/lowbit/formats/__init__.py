"""One module per format family: the format object, its byte layout, and the pure-torch (or
numpy) reference of every op, which is the spec the kernels are checked against. Nothing here
imports from the rest of lowbit except _validate."""
