"""The public API's conventions across families (docs/api.md): what a fresh process can reach."""

import importlib.util
import subprocess
import sys

import pytest


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers is not installed")
def test_transformers_integration_is_reachable_from_a_plain_import():
    code = ("import sys, flashops\n"
            "assert 'transformers' not in sys.modules  # the adapter imports transformers only when called\n"
            "print(flashops.integrations.transformers.register())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "fops"
