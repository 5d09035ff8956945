"""Library errors in a command's terms: the parameter and config-field names that flags set
replaced by those flags, for `jaxinfer generate` (SamplingParams' fields, the Engine's arguments)
and `jaxinfer train` (TrainConfig's fields)."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping

# a name (with an optional "ClassName." before it, and "=" after it when a value follows); never
# part of a path, a file name or a flag ("runs/seed=0", "top_k.txt", "--seed"): not after a word
# character, "/", "-" or "x.", nor before a word character, "/", "-x" or ".x"
_NAME = re.compile(r"(?<![\w/-])(?<!\w\.)(?:[A-Z][A-Za-z]*\.)?([a-z_]+)(?![\w/]|[.-]\w)(=?)"
                   r"(?=( must\b)?)")


def in_flag_terms(message: str, flag_names: Mapping[str, str]) -> str:
    """`message` with each name in flag_names (library name -> flag) replaced by its flag:
    "SamplingParams.top_p must be None or ..." -> "--top-p must be ...", "max_tokens=48" ->
    "--max-new-tokens 48", "steps must be at least ..." -> "--steps must be at least ...". A
    bare name stands for its flag only where it cannot be prose: it holds an underscore, or it
    is the subject of a "must"."""
    def flag(match: re.Match) -> str:
        name, assigned, subject = match.group(1), match.group(2), match.group(3)
        qualified = match.group(0) != name + assigned
        if name not in flag_names or not (qualified or assigned or subject or "_" in name):
            return match.group(0)
        return flag_names[name] + (" " if assigned else "")
    message = _NAME.sub(flag, message)
    message = re.sub(r"(--[a-z-]+ must be )None or ", r"\1", message)  # None: the flag left out
    return re.sub(r"\bleave (--[a-z-]+) None\b", r"leave out \1", message)


@contextlib.contextmanager
def flag_errors(flag_names: Mapping[str, str]) -> Iterator[None]:
    """Re-raises a ValueError or TypeError from the block in flag terms (`in_flag_terms`): wrap
    the calls that take the flags' values, not those that read a file, whose keys are the
    file's own."""
    try:
        yield
    except (ValueError, TypeError) as e:
        translated = in_flag_terms(str(e), flag_names)
        if translated == str(e):
            raise
        # the base class: a subclass (json.JSONDecodeError) may take other arguments
        raise (TypeError if isinstance(e, TypeError) else ValueError)(translated) from None
