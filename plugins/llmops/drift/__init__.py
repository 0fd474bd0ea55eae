"""Drift: the statistics and verdicts (``statistics``, pure) and the monitor that reads captured
traffic, builds baselines and reports (``monitor``)."""
