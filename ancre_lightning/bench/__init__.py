"""Benchmarks of the connectivity backbone, measured against the machine's limits.

    python -m ancre_lightning.bench                      # every sub-benchmark, Markdown tables
    python -m ancre_lightning.bench aggregation --json   # one, as a JSON document on stdout

Sub-benchmarks (one module each): ``aggregation`` (the weighted merge against the read-bound
ceiling), ``step`` (training-step time and overhead against residual, eager and compiled),
``memory`` (peak memory of a training step against residual), ``framework`` (``ancre fit``
tokens/s against a bare PyTorch loop), ``loader`` (the LLM data loader alone: tokens/s on one core and
resident memory at 50M and 500M tokens, against litdata). BENCHMARKS.md holds the measured tables and how to rerun.
"""

from . import aggregation, framework, loader, memory, step

SUITES = {m.NAME: m for m in (aggregation, step, memory, framework, loader)}

__all__ = ["SUITES"]
