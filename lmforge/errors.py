"""User-facing errors.

Every mistake a user can make (bad path, bad config value, foreign checkpoint, ...) raises an
`LmforgeError` whose message is one line that says what happened *and what to do*. `cli.main`
prints it as `lmforge: error: <message>` on stderr and exits with code 2; anything else is a bug
and keeps its traceback.
"""

import os
import threading


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name if the message is empty), for one-line errors
    that quote a library's reason."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


class LmforgeError(Exception):
    """A user error: one line on stderr, exit code 2, no traceback."""

    # Raised alike by every process of a torchrun run (a refusal of the settings they share, checked equal; a
    # divergence they decided together): the CLI prints it from rank 0 alone (`cli._quiet_rank`).
    every_rank = False


class ConfigError(LmforgeError):
    """Unknown key, wrong type or invalid value in a preset, TOML file or CLI override."""


class DataError(LmforgeError):
    """Missing, empty, binary or inconsistent input data or prepared data directory."""


class CheckpointError(LmforgeError):
    """Missing, truncated, corrupt or foreign run directory / checkpoint."""


class TrainingDiverged(LmforgeError):
    """Loss or gradients stayed non-finite and rolling back did not help; the message says what to change."""

    every_rank = True  # (whether a step is finite is all-reduced: every rank rolls back, and gives up, together)


class CommFailure(LmforgeError):
    """A collective failed: a peer process died, hung past dist.timeout_s, or the network broke (`lmforge.dist`)."""


class Interrupted(Exception):
    """Training stopped by SIGINT/SIGTERM after saving a checkpoint; the CLI exits with code 130."""

    every_rank = True  # (the stop decision is all-reduced: every rank stops at the same step)


# Whether a Ctrl-C (or SIGTERM) reached this process and was not recovered from. `cli`'s signal handler notes it,
# and cli then reports a later error as the interrupt (a module the Ctrl-C left half imported fails with some other
# error); a command that catches the interrupt and goes on (chat: Ctrl-C stops the reply, not the session) clears
# it. It lives here, below every command, so that such a command does not import the CLI that dispatches to it.
_interrupt_seen = False


def note_interrupt() -> None:
    """Remember that a Ctrl-C or SIGTERM arrived (`cli._on_sigint`)."""
    global _interrupt_seen
    _interrupt_seen = True


def interrupt_seen() -> bool:
    """Whether a Ctrl-C or SIGTERM arrived that no command recovered from (`interrupt_handled`)."""
    return _interrupt_seen


# Ctrl-C and SIGTERM held (noted, not raised, by `cli._on_sigint`): from the moment the ranks of a torchrun run join
# (`dist.init`), and in any run from its training loop on, until `pretrain` returns (train/run.py). torchrun SIGTERMs
# every rank as soon as one dies; raised at once, it ended a survivor that was not in a collective (building its
# model, drawing loss.png after the final checkpoint) as "lmforge: interrupted", exit 130, status.json "running",
# instead of the dead peer's line. Held, it is acted on where the ranks meet (a dead peer fails that collective
# first: `CommFailure`), by the training loop (`StopSignal` takes it over), or by `pretrain` once status.json says
# how the run ended. A second one is raised at once ("now"). In set-up (`hold_interrupts(note)`), the note is said
# (cli._on_sigint, rank 0, `say_held_note_soon`), and the run stops at the next point every rank reaches (train/run.py
# `_stop_if_signalled`): held silently until the first step's end, a long set-up (loading a big checkpoint) ran
# past torchrun's 30 s between its signal and its SIGKILL, and the run was killed without a word.
_holding = False
_held = False
_held_note = ""
# The note waits NOTE_AFTER_S: said at once, it came above the line of a peer's death that the signal was torchrun's
# reaction to (a set-up collective finds the dead peer within milliseconds: two lines, the first misleading), and
# above "stopped by a signal while the ranks set up" when the ranks met soon. Said only if the interrupt is still
# held then, and no final line was printed (`final_line`): a set-up that goes on that long is told it will stop.
NOTE_AFTER_S = 2.0
_note_lock = threading.Lock()
_final_line = False


def say_held_note_soon(note: str) -> None:
    """Write `note` on stderr in `NOTE_AFTER_S`, unless by then the held interrupt was acted on or the command has
    printed its final line (`final_line`). Safe in a signal handler: it only starts a timer."""

    def say() -> None:
        with _note_lock:
            if _held and not _final_line:
                os.write(2, (note + "\n").encode())  # (os.write: a print the main thread is in would raise)

    timer = threading.Timer(NOTE_AFTER_S, say)
    timer.daemon = True
    timer.start()


def final_line() -> None:
    """The command prints its final line now: a held interrupt's note not said yet is not said."""
    global _final_line
    with _note_lock:
        _final_line = True


def hold_interrupts(note: str = "") -> None:
    """Hold Ctrl-C and SIGTERM from now on; `note`: the line to say at once when one is held ("": none)."""
    global _holding, _held_note
    _holding, _held_note = True, note


def release_interrupts() -> None:
    """Stop holding; a held interrupt not taken is dropped (its command has acted on it or failed)."""
    global _holding, _held, _held_note
    _holding = _held = False
    _held_note = ""


def held_note() -> str:
    """What to say at once when an interrupt is held now ("": nothing)."""
    return _held_note


def hold_interrupt() -> bool:
    """Hold this Ctrl-C or SIGTERM (`cli._on_sigint`); False when it is to be raised: nothing is held, or one is."""
    global _held
    if not _holding or _held:
        return False
    _held = True
    return True


def interrupt_held() -> bool:
    return _held


def take_held_interrupt() -> bool:
    """Whether an interrupt is held, which the caller now acts on (a later one is held again)."""
    global _held
    taken, _held = _held, False
    return taken


def interrupt_handled() -> None:
    """A Ctrl-C that the command caught and recovered from (chat stops the reply, not the session): a later
    error is that error, not the interrupt."""
    global _interrupt_seen
    _interrupt_seen = False
