"""``peg-rag serve`` settings (flags and PEG_RAG_* variables) and the command itself."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from peg_rag.cli import build_parser, main
from peg_rag.commands.serve import settings_from
from peg_rag.serve.settings import ServeSettings, from_env


def parse(*flags: str, env: dict[str, str] | None = None) -> ServeSettings:
    return settings_from(build_parser().parse_args(["serve", *flags]), env or {})


def test_variables_set_every_field_and_flags_win():
    env = {
        "PEG_RAG_MODEL": "TownsWu/PEG",
        "PEG_RAG_INDEXES": "kb=/data/kb, faq=/data/faq",
        "PEG_RAG_PORT": "9000",
        "PEG_RAG_TRUNCATE": "yes",
        "PEG_RAG_CORS_ORIGIN": "http://a.example,http://b.example",
        "PEG_RAG_MAX_WAIT_MS": "2.5",
        "PEG_RAG_API_KEY": "from-env",
        "PEG_RAG_LLM_MODEL": "qwen2.5:7b",
    }
    settings = parse(env=env)
    assert settings.model == "TownsWu/PEG" and settings.name == "TownsWu/PEG"
    assert settings.indexes == {"kb": Path("/data/kb"), "faq": Path("/data/faq")}
    assert (settings.port, settings.truncate, settings.max_wait_ms) == (9000, True, 2.5)
    assert settings.cors_origin == ["http://a.example", "http://b.example"]
    assert (settings.api_key, settings.llm_model, settings.host) == (
        "from-env",
        "qwen2.5:7b",
        "127.0.0.1",
    )
    flagged = parse("--port", "8100", "--index", "only=/x", "--api-key", "flag", env=env)
    assert (flagged.port, flagged.indexes, flagged.api_key) == (8100, {"only": Path("/x")}, "flag")
    assert flagged.truncate is True  # not given as a flag: the variable still holds


def test_runtime_holds_only_what_is_given():
    assert parse("--model", "m").runtime == {}  # each index's recorded runtime applies
    settings = parse("--model", "m", "--backend", "onnx", env={"PEG_RAG_QUANTIZE": "int8"})
    assert settings.runtime == {"backend": "onnx", "quantize": "int8"}


def test_defaults_bind_to_loopback_without_key_or_cors():
    settings = parse("--model", "m")
    assert (settings.host, settings.port, settings.api_key, settings.cors_origin) == (
        "127.0.0.1",
        8000,
        None,
        [],
    )
    assert settings.no_batching is False and settings.truncate is False


@pytest.mark.parametrize(
    ("flags", "env", "message"),
    [
        ((), {}, "give --model"),
        (("--model", "m", "--index", "kb"), {}, "an index is NAME=DIR"),
        (("--model", "m", "--index", "a/b=/x"), {}, "index name 'a/b'"),
        (("--model", "m", "--index", "a=/x", "--index", "a=/y"), {}, "given twice"),
        (("--model", "m", "--index", "m=/x"), {}, "the embedding model's served name"),
        (("--model", "m", "--max-inputs", "0"), {}, "max_inputs must be >= 1"),
        (("--model", "m"), {"PEG_RAG_TRUNCATE": "maybe"}, "PEG_RAG_TRUNCATE"),
        (("--model", "m"), {"PEG_RAG_PORT": "http"}, "PEG_RAG_PORT"),
        (("--model", "m", "--api-key", " "), {}, "the API key is empty"),
        (("--model", "m"), {"PEG_RAG_BACKEND": "tensorrt"}, "backend must be one of"),
        (("--model", "m"), {"PEG_RAG_QUANTIZE": "int4"}, "quantize must be None or 'int8'"),
    ],
)
def test_bad_settings_are_named(flags, env, message):
    with pytest.raises(ValueError, match=message):
        parse(*flags, env=env)


def test_from_env_reads_only_peg_rag_variables():
    assert from_env({"MODEL": "x", "PEG_RAG_RERANKER": "r", "PEG_RAG_OTHER": "y"}) == {
        "reranker": "r"
    }


def test_the_command_refuses_a_folder_that_is_not_an_index(tmp_path, capsys):
    code = main(["serve", "--model", "m", "--index", f"kb={tmp_path}"])
    assert code == 2
    assert "not a peg-rag index directory" in capsys.readouterr().err


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_the_command_serves_until_interrupted(tiny_model_dir):
    port = free_port()
    command = [sys.executable, "-m", "peg_rag.cli", "serve", "--model", str(tiny_model_dir)]
    command += ["--port", str(port), "--log-level", "warning"]
    env = {**os.environ, "PEG_RAG_API_KEY": "cli-key"}
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.1)
        answer = httpx.post(
            f"http://127.0.0.1:{port}/v1/embeddings",
            json={"input": "好", "model": tiny_model_dir.name},
            headers={"Authorization": "Bearer cli-key"},
        )
        assert answer.status_code == 200 and len(answer.json()["data"][0]["embedding"]) == 32
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(60) == 0
