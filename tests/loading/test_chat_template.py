"""Chat templates rendered under limits (ropekit.loading.chat_template): resource bombs stop at the limits,
hostile templates fail in one line, the templates of real models still render."""

from __future__ import annotations

import re

import pytest
from test_hostile_files import HOSTILE_TEMPLATES, Driver

from ropekit.loading.tokenizer import render_chat_template

# Cases that used to hang or exhaust memory run in the sandboxed driver of test_hostile_files.py
# (a forked child with an address-space cap and an alarm); the others run in-process.


@pytest.fixture(scope="module")
def isolated(tmp_path_factory):
    driver = Driver(tmp_path_factory.mktemp("driver"))
    yield driver
    driver.close()


@pytest.mark.parametrize("template, match", [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "more than 1000000 steps"),
    ('{{ "x" * 3000000000 }}', r"'\*' of a sequence would have 3000000000 characters"),
])
def test_chat_template_resource_bombs_stop_at_the_limits(isolated, template, match):
    """Nested range(100000) loops reached 5 GB, "x"*3000000000 3.2 GB: the sandbox limited escapes only."""
    reply = isolated.render(template)
    assert reply["outcome"] == "error" and reply["seconds"] < 15, reply
    assert re.search(match, reply["message"]) and reply["message"].startswith("ERROR: test template: ")


@pytest.mark.parametrize("template", HOSTILE_TEMPLATES)
def test_chat_template_hostile_templates_fail_in_one_line(template):
    with pytest.raises(ValueError, match=r"^my template: \w+: ") as err:
        render_chat_template(template, [{"role": "user", "content": "hi"}], True, source="my template")
    assert "\n" not in str(err.value)


def test_chat_templates_of_real_models_still_render():
    """Loops, namespaces, loop controls, raise_exception, tojson and long messages work as before."""
    template = ("{% set ns = namespace(system='') %}{% for m in messages %}{% if m.role == 'system' %}"
                "{% set ns.system = m.content %}{% continue %}{% endif %}"
                "{% if m.role not in ['user', 'assistant'] %}{{ raise_exception('bad role ' ~ m.role) }}{% endif %}"
                "<|{{ m.role }}|>{{ m.content | trim }}{{ eos_token if m.role == 'assistant' }}\n{% endfor %}"
                "{{ ns.system | tojson }}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": " hi " * 500_000},
                {"role": "assistant", "content": "ok"}]
    out = render_chat_template(template, messages, True, eos_token="</s>")
    assert out == f"<|user|>{(' hi ' * 500_000).strip()}\n<|assistant|>ok</s>\n\"be brief\"<|assistant|>"
    with pytest.raises(ValueError, match="TemplateError: bad role tool"):
        render_chat_template(template, [{"role": "tool", "content": "x"}], True)
    lazy = '{{ messages|map(attribute="role")|join(", ") }}|{{ "-".join(messages|map(attribute="role")) }}'
    assert render_chat_template(lazy, messages, True) == "system, user, assistant|system-user-assistant"
