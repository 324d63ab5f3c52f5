"""The five MLIP objectives, one module each, plus the Sinkhorn and prototype-bank helpers."""
