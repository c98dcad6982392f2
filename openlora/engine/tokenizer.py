"""Loading the base model's tokenizer (local files only) and rendering chat prompts with its template."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from openlora.errors import InvalidRequest, ModelLoadError

# Any one of these in the folder means there is a tokenizer to load.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Load the tokenizer in folder `path` with AutoTokenizer, never touching the network.

    Raises ModelLoadError naming the folder when it is missing, holds no tokenizer files, or
    transformers cannot read them.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise ModelLoadError(f"tokenizer folder {str(folder)!r} does not exist")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ModelLoadError(
            f"no tokenizer in {str(folder)!r}: expected one of {', '.join(TOKENIZER_FILES)}"
        )
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except Exception as e:  # transformers raises OSError/ValueError/KeyError depending on the file
        raise ModelLoadError(f"cannot load the tokenizer in {str(folder)!r}: {e}") from e


def _normalise_message(i: int, msg: Any) -> dict[str, Any]:
    """Check one chat message; OpenAI content-part lists of text parts are joined with newlines."""
    if not isinstance(msg, dict):
        raise InvalidRequest(f"messages[{i}] must be an object, got {type(msg).__name__}")
    role = msg.get("role")
    if not isinstance(role, str) or not role:
        raise InvalidRequest(f"messages[{i}].role must be a non-empty string")
    if "content" not in msg and not msg.get("tool_calls"):
        raise InvalidRequest(f"messages[{i}] has no content")
    content = msg.get("content")
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise InvalidRequest(
                    f"messages[{i}].content[{j}] must be a text part ({{'type': 'text', 'text': ...}})"
                )
            texts.append(part["text"])
        content = "\n".join(texts)
    elif content is not None and not isinstance(content, str):
        raise InvalidRequest(f"messages[{i}].content must be a string, a list of text parts or null")
    out = dict(msg)
    out["content"] = content
    return out


def apply_chat_template(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict], add_generation_prompt: bool = True,
    continue_final_message: bool = False,
) -> str:
    """Render `messages` to a prompt string with the model's own chat template.

    The template is the one transformers loaded with the tokenizer (tokenizer_config.json's
    `chat_template`, or chat_template.jinja). Raises InvalidRequest when the model has no template,
    the messages are malformed, or the template itself rejects them (e.g. roles must alternate).
    `continue_final_message` leaves the last (assistant) message open, so generation continues it.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequest("this model has no chat template; use the completions API with a plain prompt")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty list")
    msgs = [_normalise_message(i, m) for i, m in enumerate(messages)]
    if continue_final_message and (add_generation_prompt or msgs[-1]["role"] != "assistant"
                                   or not msgs[-1]["content"]):
        raise InvalidRequest("continue_final_message needs add_generation_prompt=false and a last "
                             "assistant message with content")
    try:
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             continue_final_message=continue_final_message)
    except jinja2.TemplateError as e:  # raise_exception(...) in templates lands here too
        raise InvalidRequest(f"chat template rejected the messages: {e}") from e
    assert isinstance(text, str), type(text)
    return text
