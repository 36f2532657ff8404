"""`uv pip ...` with this machine's pip settings: the Makefile's installer.

uv installs the locked environments several times faster than pip (README, "Set-up and the lock"), but it does not
read pip's configuration (pip.conf files and PIP_* variables), where a machine says which indexes, local wheel
folders, constraints and certificates to use. This reads them through `pip config list` and hands them to uv as its
own options, then runs uv in place of this process:

    python tools/uv_pip.py install -c requirements-lock.txt -e ".[dev,dali]"

Run it with the target environment's Python (uv installs into that interpreter); uv comes from that environment.
"""

import ast
import os
import subprocess
import sys

from uv import find_uv_bin

# pip setting -> uv option, repeated for each whitespace-separated value.
OPTIONS = {"index-url": "--index-url", "extra-index-url": "--extra-index-url", "find-links": "--find-links",
           "constraint": "--constraint"}
# pip setting -> environment variable uv reads.
VARIABLES = {"cert": "SSL_CERT_FILE", "default-timeout": "UV_HTTP_TIMEOUT"}
FLAGS = {"no-index": "--no-index"}
# pip settings that change nothing about what gets installed.
HARMLESS = {"disable-pip-version-check", "no-cache-dir", "quiet", "verbose", "progress-bar", "root-user-action",
            "no-color", "no-input", "timeout", "retries", "config-file"}
# pip reads its configuration in this order, later sources overriding earlier ones.
SECTION_ORDER = ["global", "install", ":env:"]


def pip_settings(python: str) -> dict[str, str]:
    listing = subprocess.run([python, "-m", "pip", "config", "list"], capture_output=True, text=True, check=True)
    by_section: dict[str, dict[str, str]] = {}
    for line in listing.stdout.splitlines():
        key, _, value = line.partition("=")
        section, _, name = key.rpartition(".")
        by_section.setdefault(section, {})[name] = ast.literal_eval(value)
    settings: dict[str, str] = {}
    for section in SECTION_ORDER:
        settings.update(by_section.get(section, {}))
    return settings


def uv_arguments(settings: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """uv options and environment variables that say what `settings` says to pip; a setting uv is not told of
    is named on stderr rather than dropped silently."""
    options, variables = ["--index-strategy", "unsafe-best-match"], {}  # pip takes the best version of any index
    for name, value in settings.items():
        if name in OPTIONS:
            for item in value.split():
                options += [OPTIONS[name], item]
        elif name in VARIABLES:
            variables[VARIABLES[name]] = value
        elif name in FLAGS:
            if value.lower() in ("1", "true", "yes", "on"):
                options.append(FLAGS[name])
        elif name not in HARMLESS:
            print(f"uv_pip.py: pip setting {name}={value!r} has no uv equivalent here; uv runs without it",
                  file=sys.stderr)
    return options, variables


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    options, variables = uv_arguments(pip_settings(sys.executable))
    command, rest = sys.argv[1], sys.argv[2:]
    uv = find_uv_bin()
    os.execve(uv, [uv, "pip", command, "--python", sys.executable, *options, *rest], {**os.environ, **variables})


if __name__ == "__main__":
    main()
