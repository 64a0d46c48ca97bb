"""Experiments: a comparison planned as independent runs, executed by a launcher, then collected.

* :mod:`beseg.experiment.layout`: the results folder's paths (:class:`ResultsLayout`).
* :mod:`beseg.experiment.plan`: systems, the runs of a comparison and ``plan.json``.
* :mod:`beseg.experiment.primary`: the primary comparison, declared in ``plan.json`` before training.
* :mod:`beseg.experiment.folds`: merging the K folds of a cross-validated run.
* :mod:`beseg.experiment.compare`: ``beseg compare`` (plan, execute, merge, report).
* :mod:`beseg.experiment.launch`, :mod:`beseg.experiment.slurm`: launchers (local processes over
  devices or cores; SLURM jobs), reporting through :mod:`beseg.experiment.outcome`, and
  :mod:`beseg.experiment.worker`, which executes one run.
* :mod:`beseg.experiment.cost`: the cost plan of ``--dry-run`` and ``--slurm-time auto``.
* :mod:`beseg.experiment.demo`, :mod:`beseg.experiment.reproduce`: ``beseg demo`` and ``beseg reproduce``.

Rendering the report is :mod:`beseg.report`'s job; it only reads what these write.
"""
