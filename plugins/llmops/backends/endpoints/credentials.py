"""The local endpoint gateway's API key on the Airflow side: the password of an Airflow connection
(``serving.gateway_conn_id``, default ``llmops_gateway``) where one is defined, else
``LLMOPS_GATEWAY_API_KEY`` (``make up`` sets it for the processes it starts). The key is never in
code or YAML, and it is registered with Airflow's secret masker so task logs cannot show it.

The one serving-backend module that imports Airflow (lazily: it runs only inside a task).
"""

from __future__ import annotations

import os

GATEWAY_KEY_ENV = "LLMOPS_GATEWAY_API_KEY"


def gateway_api_key(conn_id: str | None) -> str | None:
    """The key, or None: a gateway without keys."""
    key = None
    if conn_id:
        try:
            from airflow.sdk import BaseHook
        except ImportError:  # Airflow 3.0
            from airflow.hooks.base import BaseHook
        from airflow.exceptions import AirflowNotFoundException

        try:
            key = BaseHook.get_connection(conn_id).password or None
        except AirflowNotFoundException:
            key = None
    key = key or os.environ.get(GATEWAY_KEY_ENV) or None
    if key:
        try:
            from airflow.sdk.log import mask_secret
        except ImportError:  # Airflow 3.0
            try:
                from airflow.utils.log.secrets_masker import mask_secret
            except ImportError:
                mask_secret = None
        if mask_secret is not None:
            mask_secret(key)
    return key
