"""The error the training library raises about its arguments.

Library code raises :class:`ArgumentError` (a ValueError) naming the argument
it is about; its message is composed from argument names, so a binary can
print the same sentence with its own flag names (``--F`` for ``tile_size``,
see :func:`wa_tf.training.flag_errors.flag_message`).
"""

from typing import Callable, Optional, Union

# Composes a message from a function that spells an argument's name.
Compose = Callable[[Callable[[str], str]], str]


class TrainingStopped(RuntimeError):
    """Training stopped early (NaN loss); the message says what was kept."""


class ArgumentError(ValueError):
    """A bad argument value, data set or checkpoint.

    Attributes:
      argument: The argument the error is about (a :class:`RunConfig` field or
        a function parameter), or None.

    ``str(error)`` names arguments as the library does (``tile_size``);
    :meth:`message` spells them as a caller's interface does (``--F``).

    Example:
      >>> raise ArgumentError("bits", lambda n: f"{n('bits')} must be at least 2; got 1")
    """

    def __init__(self, argument: Optional[str], compose: Union[Compose, str]):
        self.argument = argument
        self._compose = compose if callable(compose) else (lambda _, text=compose: text)
        super().__init__(self._compose(str))

    def message(self, spell: Callable[[str], str]) -> str:
        """The message with every argument name spelled by ``spell(name)``."""
        return self._compose(spell)
