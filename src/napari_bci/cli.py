"""The ``napari-bci`` command line (contract: docs/architecture.md, "The command line").

Each subpackage owns its subcommands in a ``_cli`` module exposing ``register(subparsers)``;
a subcommand's function takes the parsed ``args`` and returns a JSON-able ``dict`` (the report)
or ``None``. This module does the rest in one place: ``--json`` output (one object on stdout,
nothing else), the human rendering, and errors (one line on stderr; exit 2 for bad input,
1 for other failures, 130 when interrupted).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import sys
from typing import Any, Callable

from . import __version__
from .errors import BCIError, InputError

#: Modules that contribute subcommands, in help order.
_COMMAND_MODULES = (
    "napari_bci.widgets._cli",  # demo, view (import napari lazily)
    "napari_bci.io._cli",  # info
    "napari_bci.samples._cli",  # sample
    "napari_bci.generate._cli",  # models, generate
    "napari_bci.train._cli",  # train
    "napari_bci.registration._cli",  # register, transform
    "napari_bci.metrics._cli",  # evaluate, ssim
    "napari_bci.her2._cli",  # score
)


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def _is_flat(v: Any) -> bool:
    """A scalar, or a list of scalars / of lists of scalars: printed on one line."""
    if isinstance(v, list):
        return all(not isinstance(x, (dict, list)) or (isinstance(x, list) and _is_flat(x)) for x in v)
    return not isinstance(v, dict)


def _human(obj: Any, indent: int = 0) -> str:
    pad = "  " * indent
    if isinstance(obj, dict):
        lines = []
        for k, v in obj.items():
            if _is_flat(v) or not v:
                lines.append(f"{pad}{k}: {_scalar(v)}")
            else:
                lines.append(f"{pad}{k}:")
                lines.append(_human(v, indent + 1))
        return "\n".join(lines)
    if isinstance(obj, list):
        items = []
        for x in obj:
            if _is_flat(x):
                items.append(f"{pad}- {_scalar(x)}")
            else:  # a dict or nested list: "- " marks where each item starts
                items.append(pad + "- " + _human(x, indent + 1).lstrip())
        return "\n".join(items)
    return f"{pad}{_scalar(obj)}"


def _scalar(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return "[" + ", ".join(_scalar(x) for x in v) + "]"
    return str(v)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="napari-bci",
        description="Virtual HER2 IHC from H&E: view, register, generate, evaluate and score.",
    )
    parser.add_argument("--version", action="version", version=f"napari-bci {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def _fail(command: str | None, message: str, code: int) -> int:
    prefix = f"napari-bci {command}" if command else "napari-bci"
    print(f"{prefix}: error: {' '.join(str(message).split())}", file=sys.stderr)
    return code


class Terminated(KeyboardInterrupt):
    """SIGTERM (what batch schedulers send): handled like Ctrl-C (SIGINT)."""


SIGTERM_GRACE_S = 10.0
_sigterm: dict[str, Any] = {"timer": None, "line": []}


def _say_terminated_once() -> None:
    with contextlib.suppress(IndexError):
        print(_sigterm["line"].pop(), file=sys.stderr, flush=True)


def _exit_now() -> None:
    """Exit 130 at once: remove this process's temporaries and say ``terminated`` (once)."""
    from .io.writers import remove_own_temps

    try:
        remove_own_temps()
        _say_terminated_once()
        sys.stderr.flush()
    finally:
        os._exit(130)


def _on_sigterm(signum, frame):
    if _sigterm["timer"] is not None:  # a second SIGTERM: no more waiting
        _exit_now()
    import threading

    # unwinding can hang (a worker stuck in a library, an exception raised while it held a
    # lock): a scheduler's SIGKILL would then leave temporaries behind
    timer = _sigterm["timer"] = threading.Timer(SIGTERM_GRACE_S, _exit_now)
    timer.daemon = True
    timer.start()
    raise Terminated()


def _handle_sigterm(command: str) -> Callable[[], None]:
    """Raise :class:`Terminated` on SIGTERM in the main thread; returns the undo.

    If the command has not exited :data:`SIGTERM_GRACE_S` seconds later (or at a second SIGTERM),
    the process removes its temporaries and exits 130 without unwinding further.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    _sigterm["line"] = [f"napari-bci {command}: error: terminated"]
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    return lambda: signal.signal(signal.SIGTERM, previous)


def _one_line_warnings(command: str) -> Callable[[], None]:
    """Show warnings as ``napari-bci CMD: warning: ...`` on one line (not file:line + source);
    returns the undo."""
    import warnings

    previous = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"napari-bci {command}: warning: {' '.join(str(message).split())}", file=file or sys.stderr)

    warnings.showwarning = show
    return lambda: setattr(warnings, "showwarning", previous)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], Any] = args.func
    undo_sigterm, undo_warnings = _handle_sigterm(args.command), _one_line_warnings(args.command)

    def restore():
        undo_sigterm()
        undo_warnings()

    try:
        result = func(args)
    except InputError as e:
        return _fail(args.command, str(e), 2)
    except BCIError as e:
        return _fail(args.command, str(e), e.exit_code)
    except FileNotFoundError as e:
        return _fail(args.command, f"{e.filename}: no such file or directory", 2)
    except PermissionError as e:
        return _fail(args.command, f"{e.filename}: permission denied", 2)
    except Terminated:
        _say_terminated_once()
        return 130
    except KeyboardInterrupt:
        return _fail(args.command, "interrupted", 130)
    except Exception as e:  # the contract: one readable line, never a traceback
        if os.environ.get("NAPARI_BCI_DEBUG"):
            raise
        return _fail(args.command, f"{type(e).__name__}: {e}", 1)
    finally:
        restore()
    if result is not None:
        if getattr(args, "json", False):
            sys.stdout.write(json.dumps(result) + "\n")
        else:
            print(_human(result))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
