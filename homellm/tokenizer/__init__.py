"""Text <-> token ids and chat templates (see tokenizer.py, chat_template.py, gguf_vocab.py)."""
from homellm.tokenizer.chat_template import CHATML_FALLBACK, ChatTemplate
from homellm.tokenizer.tokenizer import StreamDecoder, Tokenizer

__all__ = ["CHATML_FALLBACK", "ChatTemplate", "StreamDecoder", "Tokenizer"]
