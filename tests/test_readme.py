"""README.md stays true: its two commands come first, CI runs them, the architecture table is generated."""

import re
from pathlib import Path

import transformers

from lxt_explicit.presets import SUPPORTED_ARCHITECTURES, supported_architectures_table

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_readme_starts_with_the_two_commands_that_ci_runs():
    blocks = re.findall(r"```bash\n(.*?)\n```", README, flags=re.S)
    assert len(blocks) >= 2
    install, tests = blocks[0], blocks[1]
    assert "\n" not in install and install.endswith("lxt-explicit explain")
    assert "\n" not in tests and "pytest" in tests
    before_first_block = README[: README.index("```bash")]
    assert before_first_block.count("```") == 0  # nothing runs before them
    ci = (ROOT / ".ci" / "run").read_text()
    assert "README.md" in ci and "head -n 2" in ci


def test_supported_architectures_table_is_generated_from_the_presets():
    section = re.search(r"<!-- supported-architectures.*?-->\n(.*?)\n<!-- /supported-architectures -->", README, re.S)
    assert section is not None
    assert section.group(1) == supported_architectures_table()


def test_every_listed_class_exists_in_the_installed_transformers():
    for classes in SUPPORTED_ARCHITECTURES.values():
        for name in classes:
            assert hasattr(transformers, name), name
