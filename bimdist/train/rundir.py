"""The run folder: created and checked for writing before anything is trained, with the resolved config saved.

Kept free of torch so that the standalone launcher can prepare the folder without importing it.
"""

from __future__ import annotations

import os
from pathlib import Path

from bimdist.config import Config, ConfigError


def prepare_run_dir(cfg: Config, *, write: bool) -> Path:
    """Create the run folder and save the resolved config; an unwritable folder is a config error."""
    run_dir = Path(cfg.run.dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if write:
            tmp = run_dir / ".config.yaml.tmp"
            tmp.write_text(cfg.to_yaml())
            os.replace(tmp, run_dir / "config.yaml")
        probe = run_dir / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"run.dir {run_dir} is not writable ({e.strerror or e}); choose another --run.dir") from None
    return run_dir
