"""The files of a run directory: written whole or not at all, read with errors that name them.

A run directory outlives any one process, so a kill, a full disk or a power cut must not leave a
file that stops the run from resuming. Metadata files are replaced atomically
(`jaxinfer.files.write_atomic`); the metrics log is only ever appended to, so at most its last
line can be cut short, and `read_history` drops such a line (with a warning) instead of failing.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TRAIN_CONFIG_FILE = "train_config.json"
RUN_FILE = "run.json"  # the CLI's record of a run: corpus, held-out, init, remat, tokenizer hash
CHECKPOINTS_DIR = "checkpoints"
MODEL_CONFIG_FILE = "config.json"  # the model's architecture (its to_hf_config())
DATA_FILE = "data.json"  # lengths and hashes of the run's train and held-out tokens


def read_history(path: Path, up_to_step: int) -> list[dict]:
    """The records of the metrics log at `path` up to `up_to_step` (none if it does not exist).

    A last line that does not parse is what a crash mid-append leaves: it is dropped with a
    warning. An unreadable line before the last is damage this code never causes: ValueError."""
    if not path.exists():
        return []
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines):
                log.warning("%s: dropping its last line, cut short (%s)", path, e)
                break
            raise ValueError(f"{path} line {number} is not valid JSON: {e}") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise ValueError(f"{path} line {number} must be a JSON object with an integer "
                             f"'step'; got {line[:80]!r}")
        records.append(record)
    return [r for r in records if r["step"] <= up_to_step]
