"""Measuring cost: summary statistics, peak memory, CPU threads and machine load.

The bottom layer beside :mod:`fastadapt.progress`: the engine, test-time adaptation, learned
optimizers and the benchmarks all report figures through these modules, so none of them has to
reach up into another to measure.
"""
