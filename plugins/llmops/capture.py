"""Captured traffic as the library reads it: the prompt of an invocation body in the SageMaker
data-capture records that drift monitoring and rollout replay both read."""

from __future__ import annotations


def request_prompt(payload) -> tuple[str, str]:
    """(system, user prompt) of an invocation body: plain text, or the last user turn of a chat."""
    if not isinstance(payload, dict):
        return "", ""
    inputs = payload.get("inputs")
    if isinstance(inputs, str):
        return "", inputs
    if isinstance(inputs, list):
        system = next((m.get("content", "") for m in inputs if isinstance(m, dict) and m.get("role") == "system"), "")
        users = [m.get("content", "") for m in inputs if isinstance(m, dict) and m.get("role") == "user"]
        return system, users[-1] if users else ""
    return "", ""
