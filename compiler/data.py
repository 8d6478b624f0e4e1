"""Where evaluation and calibration text comes from.

Order of lookup (first hit wins):

1. an explicit path (``--data`` flag / ``path=`` argument): a file, or a folder laid out like ``shared/data``;
2. ``FXQUANT_DATA``: the same, from the environment;
3. ``../shared/data`` beside the working directory or beside the fxquant checkout, when present;
4. the Hugging Face ``datasets`` loader (``wikitext``, ``wikitext-2-raw-v1``), for users who are online.

Evaluation uses the WikiText-2 *test* split (raw); calibration uses the *validation* split. Never the other way.
"""
from __future__ import annotations

import os
from pathlib import Path

from .errors import DataError

EVAL_FILE = Path("wikitext-2-raw") / "wiki.test.raw"
CALIB_FILE = Path("wikitext-2") / "valid.txt"


def _candidate_roots() -> list[Path]:
    roots = []
    env = os.environ.get("FXQUANT_DATA")
    if env:
        roots.append(Path(env).expanduser())
    here = Path(__file__).resolve().parent.parent  # the checkout root (compiler/..)
    for base in (Path.cwd(), here):
        roots.append(base.parent / "shared" / "data")
        roots.append(base / "shared" / "data")
    return roots


def _resolve(path: str | os.PathLike | None, rel: Path, what: str) -> Path | None:
    if path is not None:
        p = Path(path).expanduser()
        if p.is_file():
            return p
        if p.is_dir() and (p / rel).is_file():
            return p / rel
        raise DataError(f"{what} text not found at {p}",
                        f"pass a text file, or a folder containing {rel} (like ../shared/data)")
    for root in _candidate_roots():
        if root.is_file():
            return root
        if (root / rel).is_file():
            return root / rel
    return None


def _from_datasets(split: str, what: str) -> str:
    try:
        import datasets  # type: ignore
    except ImportError as exc:
        raise DataError(f"no {what} text found (looked at --data, FXQUANT_DATA and ../shared/data)",
                        "point FXQUANT_DATA at a folder holding wikitext-2-raw/wiki.test.raw and wikitext-2/valid.txt, "
                        "or pip install datasets to fetch WikiText-2 when online") from exc
    try:
        ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
    except Exception as exc:  # noqa: BLE001 - offline or hub errors
        raise DataError(f"could not fetch WikiText-2 ({split}) with datasets: {exc}".splitlines()[0],
                        "set FXQUANT_DATA to a local copy of the data") from exc
    return "".join(ds["text"])


def _read(path: Path, what: str) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{what} text {path} is not UTF-8 text (byte {exc.start}: {exc.reason})",
                        "pass a plain-text file such as WikiText-2's wiki.test.raw / valid.txt") from exc
    except OSError as exc:
        raise DataError(f"{what} text {path} cannot be read: {exc.strerror or exc}",
                        "check the file's permissions, or pass another file") from exc
    if not text.strip():
        flag = "--calib" if what == "calibration" else "--data"
        raise DataError(f"{what} text {path} is empty", f"point {flag} (or FXQUANT_DATA) at a file with text")
    return text


def eval_text(path: str | os.PathLike | None = None) -> tuple[str, str]:
    """The evaluation text (WikiText-2 test, raw) and where it came from."""
    p = _resolve(path, EVAL_FILE, "evaluation")
    if p is not None:
        return _read(p, "evaluation"), str(p)
    return _from_datasets("test", "evaluation"), "datasets:wikitext-2-raw-v1/test"


def calibration_text(path: str | os.PathLike | None = None) -> tuple[str, str]:
    """The calibration text (WikiText-2 validation) and where it came from."""
    p = _resolve(path, CALIB_FILE, "calibration")
    if p is not None:
        return _read(p, "calibration"), str(p)
    return _from_datasets("validation", "calibration"), "datasets:wikitext-2-raw-v1/validation"
