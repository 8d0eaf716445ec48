from pathlib import Path

import pytest

from flexinfer.chat import DEFAULT_CHATML, render_chat
from flexinfer.errors import FlexInferError

# Copied byte for byte from tokenizer.chat_template of SmolLM2-135M-Instruct.Q4_1.gguf.
SMOLLM2 = (Path(__file__).parent / "data" / "smollm2_chat_template.jinja").read_text()

# Qwen2.5's template without the tool branches: multi-line, so it needs trim_blocks/lstrip_blocks.
QWEN2 = """{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant") %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# meta-llama/Llama-2-7b-chat-hf's template, as shipped.
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)

TOKENS = dict(bos_token="<s>", eos_token="</s>")


def _render(template, messages, **kw):
    return render_chat(template, messages, **{**TOKENS, "source": "m.gguf", **kw})


def test_smollm2_template_adds_its_default_system_prompt():
    out = _render(SMOLLM2, [{"role": "user", "content": "Hi!"}],
                  bos_token="<|im_start|>", eos_token="<|im_end|>")
    assert out == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
                   "Hugging Face<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n")


def test_smollm2_template_with_system_and_history_no_generation_prompt():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}]
    out = _render(SMOLLM2, msgs, add_generation_prompt=False)
    assert out == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
                   "<|im_start|>assistant\n4<|im_end|>\n")


def test_default_chatml_matches_smollm2_when_a_system_prompt_is_given():
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert _render(DEFAULT_CHATML, msgs) == _render(SMOLLM2, msgs)
    assert _render(DEFAULT_CHATML, msgs) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n")


def test_qwen2_template_with_a_system_prompt():
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "héllo 你好"}]
    assert _render(QWEN2, msgs) == ("<|im_start|>system\nYou are terse.<|im_end|>\n"
                                    "<|im_start|>user\nhéllo 你好<|im_end|>\n<|im_start|>assistant\n")


def test_qwen2_template_default_system_prompt():
    out = _render(QWEN2, [{"role": "user", "content": "x"}], add_generation_prompt=False)
    assert out == ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
                   "assistant.<|im_end|>\n<|im_start|>user\nx<|im_end|>\n")


def test_llama2_inst_template():
    # strip() runs on system block + first message together: " Hello " keeps its leading space
    msgs = [{"role": "system", "content": "Sys"}, {"role": "user", "content": " Hello "},
            {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "Bye"}]
    assert _render(LLAMA2, msgs) == ("<s>[INST] <<SYS>>\nSys\n<</SYS>>\n\n Hello [/INST] Hi. </s>"
                                     "<s>[INST] Bye [/INST]")


def test_llama2_raise_exception_on_wrong_role_order_names_the_source():
    msgs = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(FlexInferError) as e:
        _render(LLAMA2, msgs)
    assert str(e.value) == ("m.gguf: chat template raised: Conversation roles must alternate "
                            "user/assistant/user/assistant/...")


def test_raise_exception_reachable_from_a_macro():
    t = "{% macro check(m) %}{{ raise_exception('bad ' + m.role) }}{% endmacro %}{{ check(messages[0]) }}"
    with pytest.raises(FlexInferError, match="^m.gguf: chat template raised: bad tool$"):
        _render(t, [{"role": "tool", "content": ""}])


def test_tojson_like_hf_and_strftime_now():
    t = "{{ messages[0] | tojson }}|{{ strftime_now('%Y') | length }}"
    out = _render(t, [{"role": "user", "content": "ü <b> & 'q'"}])
    assert out == '{"role": "user", "content": "ü <b> & \'q\'"}|4'
    assert _render("{{ messages | tojson(indent=1) }}", [{"a": 1}]) == '[\n {\n  "a": 1\n }\n]'


def test_hf_extras_loopcontrols_generation_and_namespace():
    t = ("{% set ns = namespace(n=0) %}{% for m in messages %}{% if loop.index > 2 %}{% break %}"
         "{% endif %}{% set ns.n = ns.n + 1 %}{% generation %}{{ m.content }}{% endgeneration %}"
         "{% endfor %}{{ ns.n }}{{ tools is defined }}")
    assert _render(t, [{"content": c} for c in "abcd"]) == "ab2False"


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ ''.__class__ }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ lipsum.__globals__['os'].popen('id').read() }}",
    "{{ raise_exception.__globals__ }}",
    "{{ strftime_now.__globals__ }}",
    "{{ self.__init__.__globals__ }}",
    "{% for c in ().__class__.__base__.__subclasses__() %}{{ c }}{% endfor %}",
    "{{ messages.__class__ }}",
    "{{ messages[0].__class__.__init__ }}",
    "{{ '{0.__class__}'.format('') }}",
    "{{ messages.append(1) }}",
    "{{ messages[0].update({'role': 'x'}) }}",
    "{{ messages[0].clear() }}",
])
def test_sandbox_escapes_fail_with_a_clear_error(template):
    msgs = [{"role": "user", "content": "x"}]
    with pytest.raises(FlexInferError, match="^m.gguf: chat template refused unsafe access: "):
        _render(template, msgs)
    assert msgs == [{"role": "user", "content": "x"}]


def test_escape_attempt_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    payloads = [
        f"{{{{ cycler.__init__.__globals__.os.system('touch {marker}') }}}}",
        f"{{{{ joiner.__init__.__globals__['os'].popen('touch {marker}').read() }}}}",
        "{% for c in ''.__class__.__mro__[1].__subclasses__() %}{% if c.__name__ == 'Popen' %}"
        f"{{{{ c(['touch', '{marker}']) }}}}{{% endif %}}{{% endfor %}}",
    ]
    for template in payloads:
        with pytest.raises(FlexInferError):
            _render(template, [])
    assert not marker.exists()


def test_syntax_error_names_the_source_and_line():
    with pytest.raises(FlexInferError) as e:
        _render("{% for m in messages %}\n{{ m.content }\n", [], source="bad-model.gguf")
    msg = str(e.value)
    assert msg.startswith("bad-model.gguf: chat template syntax error on line 2: ")
    assert "\n" not in msg


def test_unclosed_block_is_a_syntax_error():
    with pytest.raises(FlexInferError, match="^m.gguf: chat template syntax error"):
        _render("{% if add_generation_prompt %}x", [])


def test_undefined_and_type_errors_become_flexinfer_errors():
    with pytest.raises(FlexInferError, match="^m.gguf: chat template uses an undefined value: "):
        _render("{{ messages[3].content.strip() }}", [])
    with pytest.raises(FlexInferError, match="^m.gguf: chat template failed: TypeError: "):
        _render("{{ 'a' + 1 }}", [])
    with pytest.raises(FlexInferError, match="^m.gguf: chat template failed: ZeroDivisionError"):
        _render("{{ 1 // 0 }}", [])
