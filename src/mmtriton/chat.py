"""Chat processing: template-ready messages → the prompt string, through the model's own chat template.

Media parts are ``{"type": "image" | "audio" | "video"}``; the template writes one placeholder per item and
vLLM (or the HF processor) expands it to the item's token count.
"""

from __future__ import annotations

from typing import Any


class ChatFormatter:
    def __init__(self, model_path: str):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.template = self.tokenizer.chat_template or _processor_template(model_path)

    def render(self, messages: list[dict[str, Any]]) -> str:
        if self.template is None:
            # A base model without a template: concatenate the text (media parts need a template).
            return "\n".join(_text_of(m["content"]) for m in messages)
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.template, tokenize=False, add_generation_prompt=True
        )


def _processor_template(model_path: str) -> str | None:
    try:
        from transformers import AutoProcessor

        return getattr(AutoProcessor.from_pretrained(model_path), "chat_template", None)
    except (OSError, ValueError):
        return None


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if p.get("type") == "text")
