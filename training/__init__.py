"""Training entrypoint and its helpers. Imports no Airflow."""
