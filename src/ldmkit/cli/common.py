"""What every `ldmkit` command shares: the one-line error and the parser that raises it, `--set` overrides."""

from __future__ import annotations

import argparse
from typing import Any, NoReturn

import yaml

EXIT_USAGE = 2


class CLIError(Exception):
    """A user error worth one line on stderr."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line instead of usage + message
        raise CLIError(f"{self.prog}: {message} (see {self.prog} --help)")


def parse_overrides(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CLIError(f"--set expects KEY=VALUE (e.g. train_diffusion.steps=500), got {item!r}")
        out[key] = yaml.safe_load(value)
    return out


LOW_CPU_MEMORY_HELP = "CPU: freed tensors go straight back to the system (glibc malloc), a lower peak at SD size"


