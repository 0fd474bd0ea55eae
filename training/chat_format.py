"""The one definition of how a record becomes a chat, shared by data profiling, training and
serving, so that the token counts checked at curation time are the ones training sees."""

from __future__ import annotations


def to_messages(prompt: str, response: str | None = None, system: str | None = None) -> list[dict[str, str]]:
    messages = []
    if system:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": prompt})
    if response is not None:
        messages.append({"role": "assistant", "content": response})
    return messages


def render(tokenizer, prompt: str, response: str | None = None, system: str | None = None) -> str:
    """The exact text the model sees: with a response, the full training example; without one,
    the prompt followed by the assistant turn's opening (what serving sends to generate)."""
    messages = to_messages(prompt, response, system)
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=response is None)
    # Base models without a chat template get a plain, explicit layout.
    parts = [f"{m['role']}: {m['content']}" for m in messages]
    return "\n".join(parts) + ("\nassistant: " if response is None else (tokenizer.eos_token or ""))
