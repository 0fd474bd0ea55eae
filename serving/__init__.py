"""The inference server (``serving.app``, SageMaker's bring-your-own-container contract), the
local endpoint gateway (``serving.gateway``) and data capture (``serving.capture``); no Airflow
and no ``llmops`` imports."""
