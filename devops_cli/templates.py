"""Chat templates (Jinja, as tokenizers carry them) for models that ship none, the Qwen3 family's, and Qwen2.5's for tools."""

from pathlib import Path

DEFAULT_SYSTEM = "You are a helpful assistant."

# ChatML as Qwen2 chat models ship it: default system "You are a helpful assistant." (CodeFuse's too).
CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# LLaMA-Efficient-Tuning 0.1.7's "default" template, which CodeFuse-DevOps-Model's pt recipes name.
DEFAULT = (
    "{% for message in messages %}"
    "{% if loop.first %}{{ (messages[0]['content'] if messages[0]['role'] == 'system' else "
    "'A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user\\'s questions.') + '\\n' }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ 'Human: ' + message['content'] + '\\nAssistant: ' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token + '\\n' }}{% endif %}"
    "{% endfor %}"
)

END_OF_TURN = {"chatml": "<|im_end|>", "default": None}  # None: the tokenizer's eos_token


def has_chatml_tokens(tokenizer) -> bool:
    """The tokenizer has Qwen's ChatML markers as tokens (so a ChatML prompt encodes as Qwen trained it)."""
    vocab = tokenizer.get_vocab()
    return "<|im_start|>" in vocab and "<|im_end|>" in vocab

# The hybrid-thinking template of Qwen3's post-trained models (tokenizer_config.json of Qwen3-8B, 2507
# revision; Apache-2.0): tools, <think> blocks on the turns after the last user query, enable_thinking.
QWEN3 = (Path(__file__).parent / "assets" / "templates" / "qwen3.jinja").read_text(encoding="utf-8")

# Qwen2.5-Instruct's template (its tokenizer_config.json; Apache-2.0): ChatML with tools in the system turn,
# <tool_call> answers and <tool_response> turns.
QWEN2_5 = (Path(__file__).parent / "assets" / "templates" / "qwen2_5.jinja").read_text(encoding="utf-8")
# ChatML that renders tools: Qwen2.5's template with ChatML's default system prompt (what CHATML gives a
# conversation without one). Tool conversations on a ChatML model whose own template renders no tools
# (Qwen2 tiny, CodeFuse-DevOps-Model) go through it (tools.template_for), in serve's vLLM engine too.
CHATML_TOOLS = QWEN2_5.replace("You are Qwen, created by Alibaba Cloud. You are a helpful assistant.", DEFAULT_SYSTEM)
