"""Building blocks of the command-line jobs in ``recipes/``: their shared options, run directories
(``--resume``, ``--cache-dir``), dense runs over a collection, reports and model cards
(:mod:`petune.jobs.common`), and the offline real-data job's data, tasks and scoring with its typed
options (:mod:`petune.jobs.offline`), which the benchmarks and the lab reuse."""
