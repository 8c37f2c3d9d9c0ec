"""Run the README's examples marked `<!-- smoke expect: TEXT -->` exactly as written, against a running stack.

`make smoke` runs `make up`, this, a status check and `make down` on the default ports. The e2e test
runs the same examples against a stack on free ports, rewriting only the addresses.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_BLOCK = re.compile(r"<!-- smoke expect: (?P<expect>.+?) -->\s*```bash\n(?P<code>.*?)```", re.DOTALL)


@dataclass(frozen=True)
class Example:
    """One README code block and the text its output must contain."""

    code: str
    expect: str


def examples(readme: Path = ROOT / "README.md") -> list[Example]:
    return [Example(m["code"], m["expect"]) for m in _BLOCK.finditer(readme.read_text())]


def _squash(text: str) -> str:
    return re.sub(r"\s+", "", text)


def run(
    found: list[Example], *, replace: Mapping[str, str] | None = None, env: Mapping[str, str] | None = None
) -> list[str]:
    """Run the examples in order in one shell state (exports carry over); returns the failures."""
    failures = []
    with tempfile.TemporaryDirectory(prefix="servegrid-smoke-") as tmp:
        state = Path(tmp) / "state.sh"
        state.write_text("")
        for number, example in enumerate(found, 1):
            code = example.code
            for old, new in (replace or {}).items():
                code = code.replace(old, new)
            script = f"set -euo pipefail\nsource {state}\n{code}\nexport -p > {state}\n"
            result = subprocess.run(
                ["bash", "-c", script],
                cwd=ROOT,
                env={**os.environ, **(env or {})},
                capture_output=True,
                text=True,
                timeout=180,
            )
            output = result.stdout + result.stderr
            if result.returncode != 0 or _squash(example.expect) not in _squash(output):
                failures.append(
                    f"example {number} (exit {result.returncode}) did not print {example.expect!r}:\n"
                    f"{code}\n--- output ---\n{output[-2000:]}"
                )
            else:
                print(f"ok  example {number}: found {example.expect!r}")
    for leftover in ("items.jsonl", "results.jsonl"):
        (ROOT / leftover).unlink(missing_ok=True)
    return failures


def main() -> int:
    found = examples()
    if not found:
        print("no smoke examples in README.md", file=sys.stderr)
        return 1
    failures = run(found)
    for failure in failures:
        print(failure, file=sys.stderr)
    print(f"{len(found) - len(failures)} passed, {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
