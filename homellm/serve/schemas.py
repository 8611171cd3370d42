"""The request bodies of the OpenAI API, as pydantic models (what the official client sends).

Unknown fields are ignored, as OpenAI's own API does for fields a model does not use; a
known field with a bad value is a 400 naming it. Extensions that llama.cpp's server also
takes: top_k, min_p, repeat_penalty.
Reference: https://platform.openai.com/docs/api-reference/chat/create
"""
from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class ContentPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[ContentPart], None] = None
    name: str | None = None
    tool_calls: list | None = None      # assistant: [{"id", "type": "function", "function": {...}}]
    tool_call_id: str | None = None     # tool: the call this is the result of


class SamplingFields(_Body):
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    n: int | None = Field(default=None, ge=1, le=16)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: Union[str, list[str], None] = None
    seed: int | None = Field(default=None, ge=-2**63, le=2**63 - 1)  # an int64, as OpenAI's
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    user: str | None = None
    logit_bias: dict | None = None      # {"token id": bias in [-100, 100]}
    prompt_cache_key: str | None = Field(default=None, max_length=1024)  # a conversation kept cached
    # extensions (llama.cpp's server takes the same names)
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repeat_penalty: float | None = Field(default=None, gt=0)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: dict | None = None
    tools: list | None = None
    tool_choice: Union[str, dict, None] = None
    parallel_tool_calls: bool | None = None


class CompletionRequest(SamplingFields):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: int | None = Field(default=None, ge=0)   # 0: with echo, the prompt's logprobs
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1)
    response_format: dict | None = None


class ResponsesRequest(_Body):
    """POST /v1/responses (https://platform.openai.com/docs/api-reference/responses/create)."""

    model: str = Field(min_length=1)
    input: Union[str, list[dict]]
    instructions: str | None = None
    previous_response_id: str | None = None
    tools: list | None = None
    tool_choice: Union[str, dict, None] = None
    parallel_tool_calls: bool | None = None
    text: dict | None = None                  # {"format": {"type": "json_schema", ...}}
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    max_output_tokens: int | None = Field(default=None, ge=1)
    stream: bool | None = False
    store: bool | None = True
    metadata: dict | None = None
    seed: int | None = Field(default=None, ge=-2**63, le=2**63 - 1)  # an extension
    user: str | None = None
