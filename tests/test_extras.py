"""A missing optional dependency fails with the pip command that installs its extra."""

from __future__ import annotations

import subprocess
import sys

import pytest

from peg_rag.core.extras import MissingExtraError, require


def test_require_names_the_extra():
    with pytest.raises(MissingExtraError, match=r'pip install "peg-rag\[train\]"'):
        require("peg_rag_no_such_module", "train", "a test")
    assert require("json", "train", "a test").__name__ == "json"


@pytest.mark.parametrize(
    ("blocked", "code", "extra"),
    [
        ("accelerate", "from peg_rag import trainer\ntrainer.train", "train"),
        ("llama_index", "import peg_rag.integrations.llama_index", "llama-index"),
        ("langchain_core", "import peg_rag.integrations.langchain", "langchain"),
        ("fastapi", "import peg_rag.serve.app", "serve"),
    ],
)
def test_a_missing_extra_is_named(blocked, code, extra):
    # None in sys.modules makes any import of that package fail, as if not installed.
    probe = f"import sys\nsys.modules[{blocked!r}] = None\n{code}"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.returncode != 0
    assert "MissingExtraError: " in result.stderr
    assert f'pip install "peg-rag[{extra}]"' in result.stderr


def test_the_command_line_reports_a_missing_extra_in_one_line(tmp_path):
    probe = (
        "import sys\nsys.modules['accelerate'] = None\nfrom peg_rag.cli import main\n"
        f"sys.exit(main(['train', '--model', 'm', '--train', {str(tmp_path)!r}, "
        f"'--output-dir', {str(tmp_path / 'out')!r}]))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "peg-rag train: error: peg-rag's trainer needs accelerate, which is not installed: "
        'pip install "peg-rag[train]"'
    ]


def test_the_demo_fallback_says_it_needs_the_train_extra(tmp_path):
    probe = (
        "import sys\nsys.modules['accelerate'] = None\nfrom pathlib import Path\n"
        "from peg_rag.apps.kb_model import QUICK\n"
        "from peg_rag.apps.model_choice import fallback_model\n"
        f"fallback_model(Path({str(tmp_path)!r}), QUICK, out=lambda line: None)"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert "the offline fallback model is trained on the spot" in last
    assert 'pip install "peg-rag[train]"' in last and "give --model" in last
