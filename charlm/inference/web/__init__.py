"""The web page of `charlm serve` (index.html), package data read by charlm.inference.server."""
