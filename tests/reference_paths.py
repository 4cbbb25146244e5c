"""Where the project's shared reference files live: ../shared beside the repository (as CI lays it
out), else the development machine's /work/shared."""

from pathlib import Path

_CANDIDATES = (Path(__file__).resolve().parents[2] / "shared", Path("/work/shared"))


def shared_file(relative: str) -> Path:
    for root in _CANDIDATES:
        if (root / relative).is_file():
            return root / relative
    return _CANDIDATES[0] / relative  # missing: callers skip, naming this path


OPENAI_KEYS = shared_file("reference/openai_state_dict_keys.txt")
