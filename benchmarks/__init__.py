"""Benchmarks for hyperlr_ext: training quality on embedded MNIST and optimizer-step overhead.

Run ``python -m benchmarks --help`` (or ``make bench``); see ``benchmarks/README.md``.
"""
