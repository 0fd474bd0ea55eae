"""llmops: the orchestration library behind the DAGs (importable without Airflow)."""
