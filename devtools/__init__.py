"""Developer tooling beside the runtime library: the demo, synthetic traffic, the local stack,
AWS dry runs, MWAA packaging and the IAM policy check. Nothing here ships to MWAA workers, and
nothing in ``llmops``, ``training`` or ``serving`` imports it."""
