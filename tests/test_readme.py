"""README.md stays true: its two commands come first, CI runs them, the architecture table is generated."""

import re
from pathlib import Path

import transformers

from lxt_explicit.presets import SUPPORTED_ARCHITECTURES, supported_architectures_table
from lxt_explicit.support import Sweep, summary

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


def test_benchmark_headline_numbers_come_from_the_committed_results():
    section = README[README.index("## Benchmarks") : README.index("## Notebooks and API reference")]
    results = "\n".join(
        (ROOT / "benchmarks" / "results" / name).read_text()
        for name in ("speed.md", "speed_large_vocabulary.md", "faithfulness.md", "evaluation_entities.md",
                     "evaluation_entities_facts.md", "evaluation_agreement.md", "evaluation_patching.md",
                     "sinks.md")
    )
    numbers = re.findall(r"(?<![\d.])-?\d+\.\d{2,3}", section)  # "1.06-1.13": two numbers
    assert len(numbers) >= 10
    missing = [n for n in numbers if n not in results]
    assert missing == [], f"README's benchmark numbers {missing} are not in benchmarks/results/*.md"


def test_support_matrix_sentence_comes_from_the_committed_results():
    sweep = Sweep.load(ROOT / "benchmarks" / "results" / "support.json")
    version = ".".join(sweep.transformers.split(".")[:2])
    sentence = f"{summary(sweep)} (docs/support.md, measured with transformers {version})"
    assert sentence in " ".join(README.split()), f"README should say: {sentence}"
