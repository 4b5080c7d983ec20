"""Experiments: pipelines that combine training, evaluation, analysis and compression.

Each module reproduces one piece of evidence end to end and writes a report
folder; they sit above :mod:`irformer.engine` (nothing below imports them) and
below :mod:`irformer.cli`, whose commands call one function each.

* :mod:`~irformer.experiments.demo` -- ``irformer demo``: LN vs i-LN on a small SwinIR.
* :mod:`~irformer.experiments.norm_study` -- ``irformer study``: the norm and scale studies.
* :mod:`~irformer.experiments.lowprec` -- ``irformer lowprec report``: the Table 4 report.
* :mod:`~irformer.experiments.compression` -- ``irformer compress``: the CompSRT tables.
"""
