"""Rollouts: the policy and its pure decisions (``policy``), what a run does (``plan``), the
traffic it replays (``replay``), what each phase did (``ledger``), and the steps ``llm_rollout``
runs (``steps``)."""
