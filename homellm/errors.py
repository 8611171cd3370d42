"""Errors a user can act on.

Library code raises these with a message that names the file, the field and what was
expected; the CLI prints the message and exits non-zero, never a traceback.
"""


class HomellmError(Exception):
    """An error caused by input or environment, explained in its message."""


class ModelFileError(HomellmError):
    """A model file or folder that cannot be read: missing, truncated, malformed, unsupported."""


class ContextOverflowError(HomellmError):
    """A prompt (plus what must still be generated) that does not fit the context window."""

    def __init__(self, n_prompt: int, n_ctx: int):
        self.n_prompt, self.n_ctx = n_prompt, n_ctx
        # a prompt may fill at most n_ctx - 1 positions: one is left for the reply
        super().__init__(
            f"the prompt is {n_prompt} tokens but the context holds {n_ctx} "
            f"(at most {n_ctx - 1} for a prompt): {n_prompt - n_ctx + 1} tokens too many; "
            f"shorten the prompt or raise --ctx"
        )


class ModelNotFoundError(HomellmError):
    """A model name that is neither in the catalog nor a readable path."""
