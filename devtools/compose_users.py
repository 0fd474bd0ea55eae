"""Write the Airflow users' passwords for the compose stack (``airflow-init`` runs it).

The passwords come from the environment (``AIRFLOW_ADMIN_PASSWORD``, ``AIRFLOW_OPERATOR_PASSWORD``,
``AIRFLOW_VIEWER_PASSWORD``, set in ``.env``) and go, private to their owner, to the file the
simple auth manager reads (``AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE``).

    python -m devtools.compose_users
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from devtools.localstack import AIRFLOW_USERS, write_airflow_passwords
from llmops.config import ConfigError

PASSWORDS_FILE_ENV = "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"


def main(environ: dict[str, str] = os.environ) -> int:
    target = environ.get(PASSWORDS_FILE_ENV)
    if not target:
        print(f"error: {PASSWORDS_FILE_ENV} is not set", file=sys.stderr)
        return 2
    passwords = {user: environ.get(f"AIRFLOW_{user.upper()}_PASSWORD", "") for user in AIRFLOW_USERS}
    try:
        write_airflow_passwords(Path(target), {user: p for user, p in passwords.items() if p})
    except ConfigError as exc:
        print(f"error: {exc} (set AIRFLOW_<USER>_PASSWORD in .env)", file=sys.stderr)
        return 2
    print(f"Airflow users {', '.join(AIRFLOW_USERS)}: passwords in {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
