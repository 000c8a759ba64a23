"""Progress bars that draw only on a terminal.

A bar's redraws are carriage returns: on a terminal they overwrite one line, but in a log file
or a CI transcript every redraw stays, thousands per epoch. With output going anywhere else, no
bar is drawn; the one summary line per epoch (train.fit) and per stage still prints.
"""

from __future__ import annotations

from tqdm.auto import tqdm


def progress_bar(iterable=None, *, enabled: bool, **options) -> tqdm:
    """tqdm over `iterable`, drawn when `enabled` and the output is a terminal (tqdm's
    disable=None means: off when not a TTY).

    Args:
        iterable: what to iterate over, or None for a bar updated by hand.
        enabled: whether the caller wants progress shown at all.
        **options: tqdm's own options (desc, total, unit, ...).

    Returns:
        The tqdm object.
    """
    return tqdm(iterable, disable=None if enabled else True, **options)
