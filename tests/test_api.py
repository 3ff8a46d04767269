"""The public API's conventions across families (docs/api.md): what a fresh process can reach."""

import subprocess
import sys


def test_transformers_integration_is_reachable_from_a_plain_import():
    code = ("import sys, flashops\n"
            "register = flashops.integrations.transformers.register\n"
            "assert 'transformers' not in sys.modules  # the adapter imports transformers only when called\n"
            "print(register.__module__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "flashops.integrations.transformers"
