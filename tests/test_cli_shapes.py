"""The command line in vLLM's shapes: `serve MODEL`, --[no-]enable-prefix-caching, --version, --chat-template."""

import json

import pytest
from transformers import AutoTokenizer

import foreseer
from foreseer.cli import build_parser, main


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out == f"foreseer {foreseer.__version__}\n"


def test_serve_takes_the_model_as_vllm_does():
    assert build_parser().parse_args(["serve", "some/model"]).model_tag == "some/model"
    args = build_parser().parse_args(["serve", "--model", "some/model"])
    assert (args.model_tag, args.model) == (None, "some/model")


@pytest.mark.parametrize("flags, enabled", [
    ([], True), (["--enable-prefix-caching"], True), (["--no-enable-prefix-caching"], False),
    (["--no-prefix-caching"], False)])
def test_prefix_caching_flags(flags, enabled):
    assert build_parser().parse_args(["serve", "m", *flags]).enable_prefix_caching is enabled


def test_chat_template_from_a_file_replaces_the_tokenizers(tiny_llama, tmp_path):
    template = tmp_path / "template.jinja"
    template.write_text("{% for message in messages %}<<{{ message['content'] }}>>{% endfor %}")
    requests, results = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    requests.write_text(json.dumps({"custom_id": "c", "method": "POST", "url": "/v1/chat/completions", "body": {
        "model": tiny_llama, "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 2}}) + "\n")
    assert main(["run-batch", "-i", str(requests), "-o", str(results), "--model", tiny_llama, "--kv-cache-gib", "0.01",
                 "--chat-template", str(template)]) == 0
    usage = json.loads(results.read_text())["response"]["body"]["usage"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    assert usage["prompt_tokens"] == len(tokenizer.encode("<<hello there>>", add_special_tokens=False))
