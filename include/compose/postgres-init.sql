-- MLflow keeps its own database: both it and Airflow track migrations in alembic_version.
CREATE DATABASE mlflow;
