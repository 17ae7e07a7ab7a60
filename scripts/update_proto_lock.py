#!/usr/bin/env python3
"""Rewrites tests/unit/proto_fields.lock.txt from the compiled Tastemaker protos.

The lock file is a snapshot of every field of the public API, one line per field, sorted:

    <message full name> <field name> <field number> <type>

e.g. ``tastemaker.v1.Item item_id 1 string``. tests/unit/test_protos.py fails when a line
disappears or changes (a field renumbered, retyped or removed), because that breaks clients
already on the wire. New lines (new fields with new numbers) are fine, but the lock file should
be refreshed so that they are protected from then on.

A field deleted the right way (its message now says `reserved <number>;`) is not a break: its
line stays in the lock as a tombstone, so the number stays guarded even if the `reserved` goes.

Usage (from anywhere; regenerate the code first so the snapshot matches the .proto):

    scripts/gen_protos.sh
    .venv/bin/python scripts/update_proto_lock.py            # adds new fields only
    .venv/bin/python scripts/update_proto_lock.py --check    # exit 1 if the lock is out of date
    .venv/bin/python scripts/update_proto_lock.py --allow-breaking
        # also drops/changes existing lines: only for a deliberate, coordinated breaking change
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Iterable, Iterator

REPO_ROOT = Path(__file__).resolve().parents[1]
LOCK_PATH = REPO_ROOT / "tests" / "unit" / "proto_fields.lock.txt"

# FieldDescriptor.TYPE_* -> .proto spelling, for scalars.
_SCALAR_NAMES = {
    1: "double",
    2: "float",
    3: "int64",
    4: "uint64",
    5: "int32",
    6: "fixed64",
    7: "fixed32",
    8: "bool",
    9: "string",
    12: "bytes",
    13: "uint32",
    15: "sfixed32",
    16: "sfixed64",
    17: "sint32",
    18: "sint64",
}
_TYPE_GROUP, _TYPE_MESSAGE, _TYPE_ENUM = 10, 11, 14
_LABEL_REPEATED = 3


def _is_map_entry(message) -> bool:
    return message.GetOptions().map_entry


def _is_repeated(field) -> bool:
    # `is_repeated` is the modern spelling; `label` is deprecated in recent protobuf releases.
    is_repeated = getattr(field, "is_repeated", None)
    if is_repeated is not None:
        return bool(is_repeated)
    return field.label == _LABEL_REPEATED


def _base_type(field) -> str:
    if field.type in (_TYPE_MESSAGE, _TYPE_GROUP):
        return field.message_type.full_name
    if field.type == _TYPE_ENUM:
        return field.enum_type.full_name
    return _SCALAR_NAMES[field.type]


def field_type(field) -> str:
    """The field's type as written in .proto, e.g. ``repeated string``, ``map<string, string>``."""
    if field.type == _TYPE_MESSAGE and _is_map_entry(field.message_type):
        entry = field.message_type
        key, value = entry.fields_by_name["key"], entry.fields_by_name["value"]
        return f"map<{_base_type(key)}, {_base_type(value)}>"
    base = _base_type(field)
    if _is_repeated(field):
        return f"repeated {base}"
    return base


def _walk_messages(messages: Iterable) -> Iterator:
    for message in messages:
        if _is_map_entry(message):
            continue  # described by the map<K, V> type of the field that owns it
        yield message
        yield from _walk_messages(message.nested_types)


def lock_lines(file_descriptor) -> list[str]:
    """One sorted line per field of every (nested) message in the file."""
    lines = []
    for message in _walk_messages(file_descriptor.message_types_by_name.values()):
        for field in message.fields:
            lines.append(f"{message.full_name} {field.name} {field.number} {field_type(field)}")
    return sorted(lines)


def reserved_field_numbers(file_descriptor) -> dict[str, list[tuple[int, int]]]:
    """Message full name -> its `reserved` number ranges, as [start, end)."""
    from google.protobuf import descriptor_pb2

    fdp = descriptor_pb2.FileDescriptorProto()
    file_descriptor.CopyToProto(fdp)
    ranges: dict[str, list[tuple[int, int]]] = {}

    def walk(prefix, messages):
        for message in messages:
            name = f"{prefix}.{message.name}" if prefix else message.name
            ranges[name] = [(r.start, r.end) for r in message.reserved_range]
            walk(name, message.nested_type)

    walk(fdp.package, fdp.message_type)
    return ranges


def _is_tombstoned(line: str, reserved: dict[str, list[tuple[int, int]]]) -> bool:
    """A locked field that was deleted the right way: its message now reserves its number."""
    message, _field, number, _type = line.split(" ", 3)
    return any(start <= int(number) < end for start, end in reserved.get(message, ()))


def _message_and_field(line: str) -> tuple[str, str]:
    message, field, _rest = line.split(" ", 2)
    return message, field


def read_lock(path: Path = LOCK_PATH) -> list[str]:
    if not path.exists():
        return []
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def write_lock(lines: Iterable[str], path: Path = LOCK_PATH) -> None:
    path.write_text("".join(f"{line}\n" for line in sorted(lines)))


def _load_descriptor():
    sys.path.insert(0, str(REPO_ROOT / "services"))
    from tastemaker.v1 import recommender_service_pb2

    return recommender_service_pb2.DESCRIPTOR


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only report; exit 1 if the lock file is out of date")
    parser.add_argument(
        "--allow-breaking",
        action="store_true",
        help="also drop or change existing lines (a field removed, renumbered or retyped)",
    )
    args = parser.parse_args(argv)

    descriptor = _load_descriptor()
    current = set(lock_lines(descriptor))
    locked = set(read_lock())
    reserved = reserved_field_numbers(descriptor)
    current_names = {_message_and_field(line) for line in current}

    added = sorted(current - locked)
    removed = sorted(locked - current)
    # Deleted the right way (the name is gone and the message reserves the number): the line stays
    # in the lock as a tombstone, so the number is still guarded if the `reserved` is ever dropped.
    tombstones = [
        line for line in removed if _message_and_field(line) not in current_names and _is_tombstoned(line, reserved)
    ]
    breaking = [line for line in removed if line not in tombstones]

    for line in added:
        print(f"+ {line}")
    for line in tombstones:
        print(f"  {line}   (deleted, number reserved: kept as a tombstone)")
    for line in breaking:
        print(f"- {line}   <- BREAKING")

    lock_name = LOCK_PATH.relative_to(REPO_ROOT)
    if args.check:
        if added or breaking:
            print(f"{lock_name} is out of date", file=sys.stderr)
            return 1
        print(f"{lock_name} is up to date")
        return 0

    if breaking and not args.allow_breaking:
        print(
            f"\nRefusing to update {lock_name}: the lines marked BREAKING were removed or changed, which "
            "breaks clients on the wire. Never reuse or change a field number; add new fields with new "
            "numbers, and `reserved` the numbers (and names) of deleted fields. If this breaking change is "
            "deliberate and coordinated, re-run with --allow-breaking.",
            file=sys.stderr,
        )
        return 1

    if not added and not breaking:
        print(f"{lock_name} is up to date")
        return 0

    write_lock(current | set(tombstones))
    print(f"Wrote {lock_name} ({len(current)} fields, {len(tombstones)} tombstones)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
