"""Rebuild the autocomplete vocabulary (bot/prompts/vocabulary.tsv) from a tag-count export of the INE data.

The packaged vocabulary is hand-written, with hand-assigned weights, because this project has no copy of the
INE dataset. Given a real export (a CSV or TSV with columns ``tag,count``, tags written ``namespace:tag`` or bare,
as the INE Dataset Explorer and Hydrus write them), this script replaces it with real tags weighted by their real
counts: it normalises each tag, splits ``namespace:tag`` on the first colon only when the prefix is a namespace,
rewrites the Hydrus aliases (``artist:`` to ``creator:``, ``copyright:`` and ``franchise:`` to ``series:``), drops
provenance namespaces, sums the counts of tags that normalise alike, and keeps the commonest N per namespace.

    python scripts/build_vocabulary.py EXPORT.csv -o bot/prompts/vocabulary.tsv [--per-namespace N]
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from bot.prompts.namespaces import ALIASES, CONTENT, PROVENANCE
from bot.prompts.vocabulary import Entry, format_tsv, normalise_tag

DEFAULT_PER_NAMESPACE = 200


def parse_tag(raw: str) -> tuple[str, str] | None:
    """Return ``(namespace, tag)`` for an exported tag, ``""`` as the namespace of a bare tag; None to drop it."""
    text = normalise_tag(raw)
    prefix, colon, rest = text.partition(":")
    prefix = ALIASES.get(prefix.strip(), prefix.strip())
    if colon and prefix in PROVENANCE:
        return None
    if colon and prefix in CONTENT:
        namespace, tag = prefix, rest.strip()
    else:
        # `re:zero` and `16:9` are tags with a colon, not namespaces.
        namespace, tag = "", text
    # A comma would split the tag into two prompt items.
    if not tag or "," in tag:
        return None
    return namespace, tag


def read_counts(path: Path) -> list[tuple[str, int]]:
    """Read ``(tag, count)`` rows from a CSV or TSV export, with or without a ``tag,count`` header."""
    with path.open(encoding="utf-8", newline="") as file:
        first = file.readline()
        file.seek(0)
        delimiter = "\t" if "\t" in first else ","
        rows = list(csv.reader(file, delimiter=delimiter))
    tag_column, count_column, first_line = 0, 1, 1
    if rows and not (rows[0] and _is_count(rows[0][-1])):
        header = [name.strip().lower() for name in rows.pop(0)]
        first_line = 2
        try:
            tag_column, count_column = header.index("tag"), header.index("count")
        except ValueError:
            raise ValueError(f"{path}: the header must name a 'tag' and a 'count' column, got {header}") from None
    counts: list[tuple[str, int]] = []
    for number, row in enumerate(rows, start=first_line):
        if not any(field.strip() for field in row):
            continue
        try:
            counts.append((row[tag_column], int(row[count_column].strip())))
        except (IndexError, ValueError):
            raise ValueError(f"{path}:{number}: expected a tag and an integer count, got {row}") from None
    return counts


def build(counts: Iterable[tuple[str, int]], *, per_namespace: int = DEFAULT_PER_NAMESPACE) -> list[Entry]:
    """Return the commonest ``per_namespace`` tags of each namespace, with their summed counts as weights."""
    totals: dict[tuple[str, str], int] = {}
    for raw, count in counts:
        parsed = parse_tag(raw)
        # A tag on no image is not worth suggesting.
        if parsed is not None and count > 0:
            totals[parsed] = totals.get(parsed, 0) + count
    by_namespace: dict[str, list[Entry]] = {}
    for (namespace, tag), count in totals.items():
        by_namespace.setdefault(namespace, []).append(Entry(namespace, tag, count))
    kept: list[Entry] = []
    for entries in by_namespace.values():
        entries.sort(key=lambda entry: (-entry.weight, entry.tag))
        kept += entries[:per_namespace]
    return sorted(kept, key=lambda entry: (entry.namespace, -entry.weight, entry.tag))


def main(argv: Sequence[str] | None = None) -> int:
    """Read the export, build the vocabulary and write it as TSV."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("export", type=Path, help="CSV or TSV with columns tag,count")
    parser.add_argument("-o", "--output", type=Path, required=True, help="where to write the vocabulary TSV")
    parser.add_argument(
        "--per-namespace",
        type=int,
        default=DEFAULT_PER_NAMESPACE,
        metavar="N",
        help=f"keep the N commonest tags of each namespace and of bare tags (default {DEFAULT_PER_NAMESPACE})",
    )
    args = parser.parse_args(argv)
    if args.per_namespace < 1:
        parser.error("--per-namespace must be at least 1")
    try:
        counts = read_counts(args.export)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    entries = build(counts, per_namespace=args.per_namespace)
    args.output.write_text(format_tsv(entries), encoding="utf-8")
    namespaces = len({entry.namespace for entry in entries})
    print(f"Wrote {len(entries)} tags in {namespaces} namespaces to {args.output}", file=sys.stderr)
    return 0


def _is_count(field: str) -> bool:
    """Tell whether a field reads as a count, so a first row of data is not taken for a header."""
    return field.strip().isdigit()


if __name__ == "__main__":
    sys.exit(main())
