"""Flower ServerApp glue (thin; no ML logic)."""
