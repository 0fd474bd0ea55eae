"""The inference server and (later) the local endpoint gateway; no Airflow imports."""
