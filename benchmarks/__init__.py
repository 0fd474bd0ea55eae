"""Benchmarks that print figures (``make bench``): each measures a ratio or a duration side by
side in one run, next to its target. They are not tests: nothing here passes or fails CI."""
