"""ini-toolkit: train image classifiers that resist model stealing, steal them as thieves do, deploy them.

Each command is one stage (a plain function in stages/); it prints its output path on stdout so stages chain
in shell pipelines, and writes tables, logs and progress to stderr.
"""

from __future__ import annotations

import os
import sys

import typer
from typer.core import TyperGroup
from typer.exceptions import Abort, TyperException

from models.params import UserError
from stages import evaluate, export, prepare, serve, serve_key, steal, train, train_ini, verify


class _Stages(TyperGroup):
    """Runs a stage, prints the path it returns on stdout, and turns every failure into one line on stderr."""

    def list_commands(self, ctx):
        return list(self.commands)  # pipeline order, not alphabetical

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            out = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except TyperException as e:
            _fail(e.format_message(), e.exit_code)
        except Abort:
            _fail("aborted", 130)
        except UserError as e:
            _fail(str(e), 1)
        except MemoryError:
            _fail("out of memory: reduce the batch size, budget or pool", 1)
        except OSError as e:
            _fail(f"{e.filename or ''}{': ' if e.filename else ''}{e.strerror or e}", 1)
        except Exception as e:  # a bug, not bad input: still one line unless asked for the traceback
            if os.environ.get("INI_DEBUG"):
                raise
            _fail(f"internal error: {type(e).__name__}: {e} (set INI_DEBUG=1 for the traceback)", 3)
        if isinstance(out, int) and not isinstance(out, bool):
            sys.exit(out)  # click's --help and explicit exits return their code here
        if out is not None:
            print(out, flush=True)
        sys.exit(0)


def _fail(message: str, code: int) -> None:
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    sys.exit(code)


app = typer.Typer(
    cls=_Stages,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",  # help texts read as Markdown: "[default: ...]" shows as written
    help=__doc__.splitlines()[0],
)

app.command("prepare")(prepare.run)
app.command("train")(train.run)
app.command("train-ini")(train_ini.run)
app.command("steal")(steal.run)
app.command("evaluate")(evaluate.run)
app.command("export")(export.run)
app.command("serve")(serve.run)
app.command("serve-key")(serve_key.run)
app.command("verify")(verify.run)


def main() -> None:
    """The `ini-toolkit` console script: the same commands as `python cli.py`."""
    app()


if __name__ == "__main__":
    main()
