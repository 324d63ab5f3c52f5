"""Flower ClientApp glue (thin; no ML logic)."""
