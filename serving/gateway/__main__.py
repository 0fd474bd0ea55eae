"""``python -m serving.gateway --port 8090 --state-dir .llmops/gateway``: see ``serving.gateway.app``."""

from serving.gateway.app import main

if __name__ == "__main__":
    main()
