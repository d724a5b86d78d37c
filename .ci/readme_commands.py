"""Prints one of the README's Quickstart commands, exactly as the README prints it.

    python3 .ci/readme_commands.py setup|main|test

The Quickstart section holds three ```bash blocks of one line each, in this order: the set-up
command, the main job and the test command. CI runs what they say, read from README.md at run
time, so a README that drifts from what works fails CI instead of a newcomer. Exits 1 naming
what is wrong when the section does not have that shape.
"""

import pathlib
import re
import sys

NAMES = ("setup", "main", "test")


def quickstart_commands(readme: str) -> dict[str, str]:
    """name -> command of the README's Quickstart blocks; ValueError when they are not three
    one-line bash blocks."""
    section = re.search(r"^## Quickstart.*?$(.*?)(?=^## )", readme, re.M | re.S)
    if not section:
        raise ValueError("README.md has no '## Quickstart' section followed by another '## '")
    blocks = re.findall(r"^```bash\n(.*?)^```", section.group(1), re.M | re.S)
    if len(blocks) != len(NAMES) or any(len(b.strip().splitlines()) != 1 for b in blocks):
        raise ValueError(f"README.md's Quickstart must hold {len(NAMES)} one-line ```bash "
                         f"blocks ({', '.join(NAMES)}); it holds {len(blocks)}: {blocks}")
    return {name: block.strip() for name, block in zip(NAMES, blocks)}


def main() -> None:
    if len(sys.argv) != 2 or sys.argv[1] not in NAMES:
        sys.exit(f"usage: python3 .ci/readme_commands.py {'|'.join(NAMES)}")
    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    try:
        print(quickstart_commands(readme)[sys.argv[1]])
    except ValueError as e:
        sys.exit(f"readme_commands: {e}")


if __name__ == "__main__":
    main()
