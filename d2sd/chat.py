"""Chat records as the data files hold them: ``messages`` or ``conversations`` turns, normalized."""
from __future__ import annotations

__all__ = ["ROLE_ALIASES", "chat_messages"]

ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}


def chat_messages(record: dict) -> list[dict]:
    """The turns of a record as ``{role, content[, reasoning_content]}``; ValueError on a malformed one."""
    turns = record.get("messages", record.get("conversations")) if isinstance(record, dict) else None
    if not isinstance(turns, list):
        raise ValueError("record has no 'messages' (or 'conversations') list")
    out = []
    for turn in turns:
        if not isinstance(turn, dict):
            raise ValueError(f"a turn must be an object, got {type(turn).__name__}")
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if isinstance(content, list):  # OpenAI-style parts: keep the text ones
            content = "".join(p.get("text", "") for p in content
                              if isinstance(p, dict) and p.get("type", "text") == "text")
        if not isinstance(role, str) or not isinstance(content, str):
            raise ValueError(f"a turn needs string 'role' and 'content', got {sorted(turn)}")
        msg = {"role": ROLE_ALIASES.get(role, role), "content": content}
        # Thinking turns: templates with reasoning render ``reasoning_content`` (DeepSpec writes ``thinking``).
        reasoning = turn.get("reasoning_content", turn.get("thinking"))
        if isinstance(reasoning, str) and reasoning:
            msg["reasoning_content"] = reasoning
        out.append(msg)
    return out
