"""The eval job, a pipeline: questions -> answers -> scores -> report (``python -m jobs.eval``)."""
