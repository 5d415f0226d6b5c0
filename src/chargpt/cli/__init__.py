"""The `chargpt` command: the parser's table (`parser`) and one thin function per subcommand."""

from chargpt.cli.commands import main

__all__ = ["main"]
