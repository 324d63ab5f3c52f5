"""Benchmarks: scripts that measure and write their tables into ``docs/`` (``make bench`` runs them all).

A package so the benches share their helpers by import (``bench.docs_block`` writes a table into a docs page,
``bench.rss`` samples a process tree's memory, ``bench.quality`` scores an encoder). Each bench runs as
``python bench/<name>.py`` or ``python -m bench.<name>`` from the repository root. The library never imports
this package.
"""
