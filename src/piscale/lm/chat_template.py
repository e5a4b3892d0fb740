"""Rendering a Hugging Face style Jinja chat template, as a GGUF file
stores it, into the prompt text of a conversation."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

def render_chat_template(
    template: str,
    messages: Sequence[dict],
    *,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    bos_token: str = "",
    eos_token: str = "",
) -> str:
    """Render a Hugging Face style Jinja chat template (as stored in a GGUF's
    ``tokenizer.chat_template``) in a sandbox.

    With ``continue_final_message`` the text is cut right after the content of
    the last message, so that the model goes on writing that message.
    """
    import jinja2
    import jinja2.ext
    import jinja2.sandbox

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(value: Any, indent: int | None = None) -> str:
        return json.dumps(value, ensure_ascii=False, indent=indent)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    messages = list(messages)
    rendered = env.from_string(template).render(
        messages=messages,
        add_generation_prompt=add_generation_prompt and not continue_final_message,
        bos_token=bos_token,
        eos_token=eos_token,
    )
    if continue_final_message:
        if not messages:
            raise ValueError("continue_final_message needs at least one message")
        content = messages[-1].get("content")
        if not isinstance(content, str):
            raise ValueError("continue_final_message needs the last message's content to be a string")
        end = rendered.rfind(content.strip())
        if end < 0:
            raise ValueError("the chat template does not reproduce the last message's content verbatim")
        rendered = rendered[: end + len(content.strip())]
    return rendered
