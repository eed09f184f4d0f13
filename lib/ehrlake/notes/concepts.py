"""Concepts in note text: mentions of the lake's own codes, with their ConText.

**Targets** are built from the display names of the codes present in the lake's structured data
(conditions, medications, procedures...), so every mention maps to a code: :class:`Matcher` finds
the longest display name (case-insensitive, whole words, SNOMED's semantic tag such as "(disorder)"
optional) at each place in the text.

**Context** follows ConText (Harkema, Dowling, Thornblade & Chapman, J Biomed Inform 2009): a
trigger phrase ("no", "denies", "history of", "mother", "if") modifies the targets in its scope:
forward to the end of its sentence, backward to its start, or both, cut short by a terminating
phrase ("but", "however", "which"); pseudo-triggers ("no increase", "not only") modify nothing.
Four flags: negated, historical, family, hypothetical. A mention in a section whose title says
family history or past history gets that flag too.

Pure Python on strings, like ``deid``: medspaCy, which implements the same algorithm on spaCy,
pins spaCy below 3.8 on Python 3.11 and with it numpy below 2, which the main runtime (numpy 2.3,
pyarrow 22, xgboost 3.2) cannot take.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

FLAGS = ("negated", "historical", "family", "hypothetical")
# (phrase, flag, direction): forward | backward | both
TRIGGERS: tuple[tuple[str, str, str], ...] = (
    *((p, "negated", "forward") for p in (
        "no", "not", "denies", "denied", "deny", "without", "negative for", "no evidence of",
        "no signs of", "no sign of", "no history of", "free of", "absence of", "absent", "never had",
        "rules out", "ruled out for", "did not have", "does not have", "no known", "resolved",
    )),
    *((p, "negated", "backward") for p in (
        "was ruled out", "is ruled out", "has been ruled out", "not present", "is negative", "was negative",
        "unlikely", "not seen", "resolved",
    )),
    *((p, "historical", "forward") for p in (
        "history of", "past history of", "past medical history", "previous", "previously", "prior",
        "status post", "s/p", "h/o", "in the past",
    )),
    *((p, "family", "forward") for p in (
        "family history of", "mother", "father", "sister", "brother", "mom", "dad", "grandmother",
        "grandfather", "aunt", "uncle", "son", "daughter", "sibling", "parents",
    )),
    *((p, "family", "backward") for p in ("in the family", "in his mother", "in her mother")),
    *((p, "hypothetical", "forward") for p in (
        "if", "should", "in case of", "return if", "risk of", "at risk for", "screen for", "screening for",
        "monitor for", "watch for", "rule out", "r/o", "possible", "suspected", "concern for",
    )),
)  # fmt: skip
TERMINATIONS = (
    "but", "however", "although", "though", "except", "aside from", "apart from", "which", "who",
    "presenting", "presents", "secondary to", "due to", "because", "since", "now", "currently",
)  # fmt: skip
PSEUDO = (
    "no increase", "no change", "not only", "no further", "not necessarily", "gram negative",
    "not certain if", "not rule out", "without difficulty", "no known allergies",
)  # fmt: skip
SECTION_FLAGS = {
    "family history": "family",
    "past medical history": "historical",
    "past history": "historical",
}
_TAGS = (
    "disorder", "finding", "procedure", "situation", "substance", "product", "regime/therapy",
    "observable entity", "qualifier value", "morphologic abnormality", "event",
)  # fmt: skip
_SEMANTIC_TAG = re.compile(rf"\s*\((?:{'|'.join(map(re.escape, _TAGS))})\)\s*$", re.I)
_WORD = re.compile(r"[a-z0-9]+(?:[/'.-][a-z0-9]+)*")
_TAG_WORDS = {_WORD.findall(t)[-1] for t in _TAGS}  # a semantic tag's last word, as matched
_SENTENCE_END = re.compile(r"[.!?;:](?:\s|$)|\n\s*\n|\n\s*[-*#]")
_HEADING = re.compile(r"^\s*#+\s*(.+?)\s*$|^\s*([A-Z][A-Za-z /&]{2,40}):\s*$", re.M)


@dataclass(frozen=True)
class Target:
    phrase: str
    system: str
    code: str
    kind: str  # condition | medication | procedure | ...


@dataclass(frozen=True)
class Mention:
    start: int  # offsets into the text searched
    end: int
    target: Target
    negated: bool = False
    historical: bool = False
    family: bool = False
    hypothetical: bool = False
    section: str | None = None


def _words(text: str) -> list[tuple[str, int, int]]:
    return [(m.group(0), m.start(), m.end()) for m in _WORD.finditer(text.lower())]


class Matcher:
    """Longest-phrase matching of many targets: phrases indexed by their first word."""

    def __init__(self, targets: Iterable[Target]):
        self.index: dict[str, list[tuple[tuple[str, ...], Target]]] = {}
        seen: set[tuple[str, ...]] = set()
        for target in targets:
            for phrase in {target.phrase, _SEMANTIC_TAG.sub("", target.phrase)}:
                words = tuple(w for w, _, _ in _words(phrase))
                if words and words not in seen:  # the first target of a phrase keeps it
                    seen.add(words)
                    self.index.setdefault(words[0], []).append((words, target))
        for candidates in self.index.values():
            candidates.sort(key=lambda c: -len(c[0]))

    def find(self, text: str) -> list[Mention]:
        """Every mention of a target in ``text`` with its context and section."""
        words = _words(text)
        found: list[Mention] = []
        i = 0
        while i < len(words):
            for phrase, target in self.index.get(words[i][0], ()):
                if tuple(w for w, _, _ in words[i : i + len(phrase)]) == phrase:
                    end = words[i + len(phrase) - 1][2]
                    if phrase[-1] in _TAG_WORDS and text[end : end + 1] == ")":  # "(situation)" whole
                        end += 1
                    found.append(Mention(words[i][1], end, target))
                    i += len(phrase)
                    break
            else:
                i += 1
        return with_context(text, found)


def _phrases(words: list[tuple[str, int, int]], phrases: Iterable[str]) -> list[tuple[int, int, str]]:
    """(start, end offsets, phrase) of each of ``phrases`` among ``words``."""
    out = []
    wanted = [(tuple(p.split()), p) for p in phrases]
    for i in range(len(words)):
        for parts, phrase in wanted:
            if tuple(w for w, _, _ in words[i : i + len(parts)]) == parts:
                out.append((words[i][1], words[i + len(parts) - 1][2], phrase))
    return out


def sections(text: str) -> list[tuple[str, int, int]]:
    """(title, start, end) of the text's sections: markdown headings ("# Assessment and Plan") or
    a title alone on its line ("Family History:"), each running to the next."""
    heads = [(m.group(1) or m.group(2), m.start()) for m in _HEADING.finditer(text)]
    return [(title, start, heads[k + 1][1] if k + 1 < len(heads) else len(text)) for k, (title, start) in
            enumerate(heads)]  # fmt: skip


def _sentences(text: str) -> list[tuple[int, int]]:
    bounds, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        bounds.append((start, m.start() + 1))
        start = m.end() - (1 if m.group(0).endswith(("-", "*", "#")) else 0)
    bounds.append((start, len(text)))
    return bounds


def with_context(text: str, mentions: list[Mention]) -> list[Mention]:
    """``mentions`` with ConText's flags from the triggers of their sentence and their section."""
    titled = sections(text)
    out = []
    for sentence_start, sentence_end in _sentences(text):
        inside = [m for m in mentions if sentence_start <= m.start < sentence_end]
        if not inside:
            continue
        words = [
            (w, s + sentence_start, e + sentence_start)
            for w, s, e in _words(text[sentence_start:sentence_end])
        ]
        pseudo = _phrases(words, PSEUDO)
        triggers = [
            t for t in _phrases(words, {p for p, _, _ in TRIGGERS})
            if not any(ps <= t[0] < pe for ps, pe, _ in pseudo)
            and not any(m.start <= t[0] < m.end for m in inside)  # a trigger inside a target's own words
        ]  # fmt: skip
        stops = sorted(s for s, _, _ in _phrases(words, TERMINATIONS))
        for m in inside:
            flags = {f: False for f in FLAGS}
            for t_start, t_end, phrase in triggers:
                for _, flag, direction in (t for t in TRIGGERS if t[0] == phrase):
                    ahead = direction in ("forward", "both") and t_end <= m.start
                    behind = direction in ("backward", "both") and t_start >= m.end
                    if ahead and not any(t_end <= s < m.start for s in stops):
                        flags[flag] = True
                    if behind and not any(m.end <= s < t_start for s in stops):
                        flags[flag] = True
            section = next((title for title, s, e in titled if s <= m.start < e), None)
            for words_, flag in SECTION_FLAGS.items():
                if section and words_ in section.lower():
                    flags[flag] = True
            out.append(Mention(m.start, m.end, m.target, **flags, section=section))
    return sorted(out, key=lambda m: m.start)
