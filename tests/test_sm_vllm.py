"""buildkit/resources/image/sm_vllm.py: SM_VLLM_* -> `vllm serve` argv, the cases of AWS's own unit tests
(aws/deep-learning-containers @dceae132:test/vllm/test_sagemaker_args.py) plus this toolkit's refusals,
and the file run as the image runs it (a subprocess; exec of a stand-in `vllm` on PATH)."""

from __future__ import annotations

import ast
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import sm_vllm

HELPER = Path(sm_vllm.__file__)


def build(env, model_dir="/nonexistent"):
    """argv for env; a model is given unless the test is about the model."""
    if "SM_VLLM_MODEL" not in env and "HF_MODEL_ID" not in env and model_dir == "/nonexistent":
        env = {"SM_VLLM_MODEL": "m", **env}
    return sm_vllm.build_args(env, model_dir=model_dir)


def value_of(argv, flag):
    """The tokens after `flag`, up to the next flag."""
    assert flag in argv, f"{flag} not in {argv}"
    values = []
    for token in argv[argv.index(flag) + 1:]:
        if token.startswith("--"):
            break
        values.append(token)
    return values


# --- JSON arrays: one token per element (vLLM's list flags are nargs="+") ---------------------------


def test_array_of_objects_is_one_token_per_element():
    adapters = [{"name": "a", "path": "/opt/ml/model/loras/a"}, {"name": "b", "path": "/opt/ml/model/loras/b"},
                {"name": "c", "path": "/opt/ml/model/loras/c"}]
    tokens = value_of(build({"SM_VLLM_LORA_MODULES": json.dumps(adapters)}), "--lora-modules")
    assert [json.loads(t) for t in tokens] == adapters


def test_whitespace_separated_objects_are_separate_tokens():
    argv = build({"SM_VLLM_LORA_MODULES": '{"name":"a","path":"/l/a"}  {"name":"b","path":"/l/b"}'})
    assert value_of(argv, "--lora-modules") == ['{"name":"a","path":"/l/a"}', '{"name":"b","path":"/l/b"}']


def test_array_of_strings_and_ints():
    assert value_of(build({"SM_VLLM_SERVED_MODEL_NAME": '["primary","alias"]'}),
                    "--served-model-name") == ["primary", "alias"]
    assert value_of(build({"SM_VLLM_CUDAGRAPH_CAPTURE_SIZES": "[1, 2, 4]"}),
                    "--cudagraph-capture-sizes") == ["1", "2", "4"]


def test_array_elements_of_other_json_types():
    argv = build({"SM_VLLM_X": '[true, false, null, 1.5, [1, 2]]'})
    assert value_of(argv, "--x") == ["true", "false", "", "1.5", "[1,2]"]


def test_empty_array_drops_the_flag():
    assert "--custom-ops" not in build({"SM_VLLM_CUSTOM_OPS": "[]"})


@pytest.mark.parametrize("key,flag", [("SM_VLLM_ALLOWED_ORIGINS", "--allowed-origins"),
                                      ("SM_VLLM_ALLOWED_METHODS", "--allowed-methods"),
                                      ("SM_VLLM_ALLOWED_HEADERS", "--allowed-headers")])
def test_json_typed_flags_keep_the_array_whole(key, flag):
    value = '["https://a.example","https://b.example"]'
    assert value_of(build({key: value}), flag) == [value]


def test_middleware_is_one_token():
    assert value_of(build({"SM_VLLM_MIDDLEWARE": "pkg.Middleware"}), "--middleware") == ["pkg.Middleware"]


# --- values passed intact -------------------------------------------------------------------------


@pytest.mark.parametrize("key,flag,value", [
    ("SM_VLLM_SPECULATIVE_CONFIG", "--speculative-config", '{"method": "mtp", "num_speculative_tokens": 1}'),
    ("SM_VLLM_LIMIT_MM_PER_PROMPT", "--limit-mm-per-prompt", '{"image": {"count": 2}, "video": {"count": 1}}'),
    ("SM_VLLM_SPECULATIVE_CONFIG", "--speculative-config", '{"method": "x",\n "num_speculative_tokens": 1}'),
    ("SM_VLLM_CHAT_TEMPLATE", "--chat-template", "{% for m in messages %}{{ m['content'] }} {% endfor %}"),
    ("SM_VLLM_LORA_MODULES", "--lora-modules", '[{"name":"a","path":}]'),  # malformed: vLLM reports it
    ("SM_VLLM_LORA_MODULES", "--lora-modules", "a=/loras/a"),
    ("SM_VLLM_TOKENIZER", "--tokenizer", "/opt/ml/model/my tokenizer"),
])
def test_value_is_one_token_verbatim(key, flag, value):
    assert value_of(build({key: value}), flag) == [value]


# --- names, booleans, port, model -------------------------------------------------------------------


def test_names_become_kebab_flags_in_sorted_order():
    argv = build({"SM_VLLM_TENSOR_PARALLEL_SIZE": "8", "SM_VLLM_max_model_len": "4096", "SM_VLLM_DTYPE": "bf16"})
    assert argv == ["--port", "8080", "--dtype", "bf16", "--model", "m", "--tensor-parallel-size", "8",
                    "--max-model-len", "4096"]


@pytest.mark.parametrize("value,expected", [("true", ["--enable-lora"]), (" TRUE ", ["--enable-lora"]),
                                            ("", ["--enable-lora"]), ("false", []), ("False", [])])
def test_booleans(value, expected):
    argv = build({"SM_VLLM_ENABLE_LORA": value})
    assert [t for t in argv if t == "--enable-lora"] == expected
    if expected:
        assert value_of(argv, "--enable-lora") == []


def test_other_variables_are_ignored():
    argv = build({"PATH": "/usr/bin", "HF_TOKEN": "hf_secret", "SMX_VLLM_A": "1", "SM_VLLM_MODEL": "m"})
    assert argv == ["--port", "8080", "--model", "m"]


def test_port_is_8080_and_a_set_port_comes_later():
    assert build({})[:2] == ["--port", "8080"]
    argv = build({"SM_VLLM_PORT": "9000"})
    assert argv.index("9000") > argv.index("8080")  # argparse keeps the last --port


def test_explicit_model_wins(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    argv = build({"SM_VLLM_MODEL": "Qwen/Qwen3-8B", "HF_MODEL_ID": "ignored"}, model_dir=str(tmp_path))
    assert argv.count("--model") == 1 and value_of(argv, "--model") == ["Qwen/Qwen3-8B"]


def test_mounted_model_dir_wins_over_hf_model_id(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert value_of(build({"HF_MODEL_ID": "Qwen/Qwen3-8B"}, model_dir=str(tmp_path)), "--model") == [str(tmp_path)]


def test_hf_model_id_when_model_dir_is_empty(tmp_path):
    assert value_of(build({"HF_MODEL_ID": "Qwen/Qwen3-8B"}, model_dir=str(tmp_path)), "--model") == ["Qwen/Qwen3-8B"]


def test_a_model_path_that_is_no_directory_is_not_a_mounted_model(tmp_path):
    (tmp_path / "model").write_text("not a directory")
    argv = build({"HF_MODEL_ID": "Qwen/Qwen3-8B"}, model_dir=str(tmp_path / "model"))
    assert value_of(argv, "--model") == ["Qwen/Qwen3-8B"]


# --- refusals (where this helper differs from AWS's, on purpose) -------------------------------------------


@pytest.mark.parametrize("env,words", [
    ({}, "no model"),  # vLLM would fetch its default model from the Hub
    ({"HF_MODEL_ID": " "}, "no model"),
    ({"SM_VLLM_MODEL": ""}, "SM_VLLM_MODEL is empty"),
    ({"SM_VLLM_MODEL": "m", "SM_VLLM_API_KEY": "sk-123"}, "set VLLM_API_KEY instead"),
    ({"SM_VLLM_MODEL": "m", "SM_VLLM_HF_TOKEN": "hf_abc"}, "set HF_TOKEN instead"),
    ({"SM_VLLM_MODEL": "m", "SM_VLLM_": "1"}, "not a vLLM flag name"),
    ({"SM_VLLM_MODEL": "m", "SM_VLLM_MAX-LEN": "1"}, "not a vLLM flag name"),
    ({"SM_VLLM_MODEL": "m", "SM_VLLM_MAX__LEN": "1"}, "not a vLLM flag name"),
])
def test_refusals_are_one_line(tmp_path, env, words):
    with pytest.raises(sm_vllm.BadValue) as err:
        sm_vllm.build_args(env, model_dir=str(tmp_path))
    assert words in str(err.value) and "\n" not in str(err.value)
    for secret in ("sk-123", "hf_abc"):
        assert secret not in str(err.value)


def test_hf_token_as_a_boolean_is_a_flag():
    assert value_of(build({"SM_VLLM_HF_TOKEN": "true"}), "--hf-token") == []


# --- the file as the image runs it --------------------------------------------------------------------


def _run(args, env, tmp_path):
    return subprocess.run([sys.executable, str(HELPER), *args], env={"PATH": os.environ["PATH"], **env},
                          cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False)


def test_dry_run_prints_the_command(tmp_path):
    done = _run(["--dry-run"], {"SM_VLLM_MODEL": "/models/my model", "SM_VLLM_SERVED_MODEL_NAME": '["a","b"]'},
                tmp_path)
    assert done.returncode == 0, done.stderr
    assert shlex.split(done.stdout) == ["vllm", "serve", "--port", "8080", "--model", "/models/my model",
                                        "--served-model-name", "a", "b"]


def test_bad_value_exits_2_with_one_line_and_no_secret(tmp_path):
    done = _run([], {"SM_VLLM_MODEL": "m", "SM_VLLM_API_KEY": "sk-123"}, tmp_path)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("sm_vllm: error: SM_VLLM_API_KEY")
    assert "sk-123" not in done.stderr and "Traceback" not in done.stderr


def test_unknown_option_is_refused(tmp_path):
    done = _run(["--port", "1"], {"SM_VLLM_MODEL": "m"}, tmp_path)
    assert done.returncode == 2 and done.stderr.startswith("usage:")


def test_execs_vllm_serve_with_the_argv(tmp_path):
    """A stand-in `vllm` first on PATH records its argv NUL-delimited: the exec passes every token intact."""
    out = tmp_path / "argv"
    fake = tmp_path / "bin" / "vllm"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\nprintf '%s\\0' \"$0\" \"$@\" > {shlex.quote(str(out))}\n")
    fake.chmod(0o755)
    template = "{% for m in messages %}\n{{ m['content'] }}{% endfor %}"
    env = {"PATH": f"{fake.parent}:{os.environ['PATH']}", "SM_VLLM_MODEL": "m", "SM_VLLM_CHAT_TEMPLATE": template,
           "SM_VLLM_ENABLE_LORA": "true", "SM_VLLM_ENFORCE_EAGER": "false"}
    done = _run([], env, tmp_path)
    assert done.returncode == 0, done.stderr
    assert out.read_text().split("\0")[1:-1] == ["serve", "--port", "8080", "--chat-template", template,
                                                 "--enable-lora", "--model", "m"]
    assert done.stderr.startswith("sm_vllm: vllm serve --port 8080")


def test_missing_vllm_is_one_line(tmp_path):
    done = _run([], {"PATH": str(tmp_path), "SM_VLLM_MODEL": "m"}, tmp_path)
    assert done.returncode == 127 and "cannot run vllm" in done.stderr and "Traceback" not in done.stderr


def test_standard_library_only():
    """The file is copied into the vLLM image beside vLLM, not this toolkit: it imports the stdlib only."""
    tree = ast.parse(HELPER.read_text(encoding="utf-8"))
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert imported and imported <= set(sys.stdlib_module_names) | {"__future__"}
