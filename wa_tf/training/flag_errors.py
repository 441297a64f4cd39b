"""One-line flag errors: how every binary in ``bin/`` reports bad input.

Library functions raise ``ValueError`` (or its subclass
:class:`~wa_tf.training.errors.ArgumentError`) about their own arguments
(``model_dir``, ``tile_size``, ``cost_model``).  A binary knows which of its
flags sets each argument: it gives that mapping (argument -> flag name, kept
with its flag definitions) to :func:`start`, which parses the flags
(:func:`parse_argv`), runs the binary's main (:func:`run`) and ends bad input
with exactly one line on stderr and exit status :data:`EXIT_BAD_INPUT`::

    error: --F must be one of 2, 4, 6; got 3

:func:`flag_message` turns one error into that line:

* an ArgumentError composes its message with each argument spelled as its flag;
* a plain ValueError whose message starts with an argument's name (the
  library's convention: ``"cost_model: ..."``, ``"batch_size must be ..."``)
  has that name spelled as its flag;
* any other message is kept (a binary's own checks already say ``--flag``).

Only the first line of a message is printed.
"""

import sys
from typing import Callable, Mapping, Optional, Sequence, Type

from absl import app, flags, logging

from wa_tf.training.errors import ArgumentError

EXIT_BAD_INPUT = 2  # a bad flag value, data set, checkpoint or input file
EXIT_FAILED = 1  # the work itself failed (a training run stopped on a NaN loss)

Errors = Sequence[Type[BaseException]]


def fail(message: str, code: int = EXIT_BAD_INPUT):
    """Prints one ``error:`` line on stderr and exits with `code`."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def first_line(message: str, error: Optional[BaseException] = None) -> str:
    """The first line of `message` (the error's type name when it is empty)."""
    lines = message.strip().splitlines()
    return lines[0] if lines else type(error).__name__ if error is not None else ""


def _starts_with_name(message: str, name: str) -> bool:
    """Whether `message` starts with the word `name` (not a longer word)."""
    rest = message[len(name):]
    return message.startswith(name) and not (rest[:1].isalnum() or rest[:1] == "_")


def flag_message(error: BaseException, names: Optional[Mapping[str, str]] = None,
                 subject: Optional[str] = None) -> str:
    """`error`'s message as one line with the library's argument names spelled as flags.

    Args:
      error: The library's error.
      names: Library argument -> flag name (without ``--``), for the
        arguments the binary's flags set.  An ArgumentError spells every
        argument it names, ``--<argument>`` for one not in `names`; a plain
        ValueError has a leading argument name spelled when it is in `names`.
      subject: The flag (``"--modelDir"``) the error is about, when the caller
        knows it: a message that does not start with a flag gets it as a
        prefix (``"--modelDir: <message>"``).

    Returns:
      The first line of the message.
    """
    names = names or {}

    def spell(argument: str) -> str:
        return "--" + names.get(argument, argument)

    if isinstance(error, ArgumentError):
        message = error.message(spell)
    else:
        message = str(error)
        # The longest name first: bits_candidates before bits.
        for argument in sorted(names, key=len, reverse=True):
            if _starts_with_name(message, argument):
                message = spell(argument) + message[len(argument):]
                break
    message = first_line(message, error)
    if subject and not message.startswith("--"):
        message = f"{subject}: {message}"
    return message


def parse_argv(argv, flag_values: flags.FlagValues = flags.FLAGS):
    """absl ``flags_parser`` for ``app.run``: one-line errors instead of absl's usage text."""
    try:
        return flag_values(argv)
    except flags.Error as e:
        fail(first_line(str(e), e))


def run(fn: Callable[[], object], names: Optional[Mapping[str, str]] = None, *,
        bad_input: Errors = (ValueError,), failed: Errors = (),
        flag_values: flags.FlagValues = flags.FLAGS):
    """Calls ``fn()``; ends bad input with one ``error:`` line naming the flag.

    Args:
      fn: The binary's work, reading its parsed flags.
      names: Library argument -> flag name (:func:`flag_message`).
      bad_input: Errors that are bad input: printed by :func:`flag_message`,
        exit status :data:`EXIT_BAD_INPUT`.
      failed: Errors that end the work as failed (one line, exit status
        :data:`EXIT_FAILED`).  Other exceptions keep their traceback.
      flag_values: The parsed flags.  Unless ``--verbosity`` was given, absl's
        (and TensorFlow's) INFO lines are silenced: they would bury the
        binary's own output.
    """
    if "verbosity" in flag_values and not flag_values["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    try:
        return fn()
    except tuple(bad_input) as e:
        fail(flag_message(e, names))
    except tuple(failed) as e:
        fail(first_line(str(e), e), code=EXIT_FAILED)


def start(fn: Callable[..., object], names: Optional[Mapping[str, str]] = None, *,
          arguments: bool = False, **options):
    """Runs a binary: ``app.run`` with :func:`parse_argv`, then ``fn`` through :func:`run`.

    Args:
      fn: The binary's main: ``fn()``, or ``fn(args)`` with the arguments left
        after the flags when `arguments` is true.
      names: Library argument -> flag name (:func:`flag_message`).
      arguments: Whether the binary takes arguments besides flags (those after
        ``--``); if not, any is an error.
      **options: :func:`run`'s `bad_input` and `failed`.
    """
    def main(argv):
        if not arguments and len(argv) > 1:
            fail(f"unexpected arguments: {' '.join(argv[1:])}")
        run((lambda: fn(argv[1:])) if arguments else fn, names, **options)

    app.run(main, flags_parser=parse_argv)
