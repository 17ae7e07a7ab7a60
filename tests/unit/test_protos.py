"""Guards on the public API in protos/tastemaker/v1/.

Three kinds of checks, all over the compiled descriptors (`recommender_service_pb2.DESCRIPTOR`):

* **Lint**, in the spirit of `buf lint` STANDARD: one test per rule, each failure names the offender.
* **Freshness**: re-running protoc yields byte-identical files to the committed ones in
  services/tastemaker/v1/ (fix: `scripts/gen_protos.sh`).
* **Wire compatibility**: every (message, field, number, type) in tests/unit/proto_fields.lock.txt
  still exists unchanged; new fields are allowed (refresh: `scripts/update_proto_lock.py`).

The last test class lints deliberately bad descriptors, so that the rules are known to bite.
"""

from __future__ import annotations

import difflib
import importlib.util
import re
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Iterator

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, timestamp_pb2

from tastemaker.v1 import recommender_service_pb2

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO_ROOT / "protos"
GENERATED_ROOT = REPO_ROOT / "services"
PROTO_FILE = "tastemaker/v1/recommender_service.proto"
LOCK_PATH = Path(__file__).resolve().with_name("proto_fields.lock.txt")

DESCRIPTOR = recommender_service_pb2.DESCRIPTOR

TIMESTAMP = "google.protobuf.Timestamp"
# Field numbers: 1 .. 2^29 - 1, minus the range reserved for the protobuf implementation.
MAX_FIELD_NUMBER = 2**29 - 1
IMPLEMENTATION_RESERVED = range(19000, 20000)

PASCAL_CASE = re.compile(r"^[A-Z][a-zA-Z0-9]*$")
LOWER_SNAKE_CASE = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")
UPPER_SNAKE_CASE = re.compile(r"^[A-Z][A-Z0-9]*(_[A-Z0-9]+)*$")
# buf's PACKAGE_VERSION_SUFFIX: v1, v1beta1, v1alpha, v2test, v1p1beta1, ...
VERSION_SUFFIX = re.compile(r"^v\d+((alpha|beta|test)\d*)?(p\d+((alpha|beta)\d*)?)?$")


def _load_lock_module():
    """scripts/update_proto_lock.py is the one definition of the lock-file format."""
    path = REPO_ROOT / "scripts" / "update_proto_lock.py"
    spec = importlib.util.spec_from_file_location("update_proto_lock", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


proto_lock = _load_lock_module()


# --------------------------------------------------------------------------------------------
# Walking descriptors
# --------------------------------------------------------------------------------------------


def _is_map_entry(message) -> bool:
    return message.GetOptions().map_entry


def iter_messages(fd) -> Iterator:
    """Every message in the file, nested ones included, map entries excluded (protoc names them)."""

    def walk(messages):
        for message in messages:
            if _is_map_entry(message):
                continue
            yield message
            yield from walk(message.nested_types)

    yield from walk(fd.message_types_by_name.values())


def iter_enums(fd) -> Iterator:
    yield from fd.enum_types_by_name.values()
    for message in iter_messages(fd):
        yield from message.enum_types


def iter_message_protos(fdp: descriptor_pb2.FileDescriptorProto) -> Iterator[tuple[str, descriptor_pb2.DescriptorProto]]:
    """(full name, DescriptorProto) for every message, nested ones included."""

    def walk(prefix, messages):
        for message in messages:
            full_name = f"{prefix}.{message.name}" if prefix else message.name
            yield full_name, message
            yield from walk(full_name, message.nested_type)

    yield from walk(fdp.package, fdp.message_type)


def iter_enum_protos(fdp: descriptor_pb2.FileDescriptorProto) -> Iterator[tuple[str, descriptor_pb2.EnumDescriptorProto]]:
    for enum in fdp.enum_type:
        yield f"{fdp.package}.{enum.name}" if fdp.package else enum.name, enum
    for message_name, message in iter_message_protos(fdp):
        for enum in message.enum_type:
            yield f"{message_name}.{enum.name}", enum


def to_proto(fd) -> descriptor_pb2.FileDescriptorProto:
    """The FileDescriptorProto form: the only place reserved ranges and names are visible."""
    fdp = descriptor_pb2.FileDescriptorProto()
    fd.CopyToProto(fdp)
    return fdp


def upper_snake(pascal: str) -> str:
    """`EventType` -> `EVENT_TYPE`, `HTTPMethod` -> `HTTP_METHOD` (buf's enum value prefix)."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", pascal).upper()


# --------------------------------------------------------------------------------------------
# Lint rules. Each returns a list of human-readable violations; empty means clean.
# --------------------------------------------------------------------------------------------


def check_package_versioned(fd) -> list[str]:
    package = fd.package
    if not package:
        return [f"{fd.name}: no package declared"]
    problems = []
    if not all(LOWER_SNAKE_CASE.match(part) for part in package.split(".")):
        problems.append(f"{fd.name}: package {package!r} is not lower_snake_case")
    if not VERSION_SUFFIX.match(package.rsplit(".", 1)[-1]):
        problems.append(f"{fd.name}: package {package!r} does not end in a version such as '.v1'")
    return problems


def check_package_matches_directory(fd) -> list[str]:
    expected_dir = fd.package.replace(".", "/")
    actual_dir = fd.name.rsplit("/", 1)[0] if "/" in fd.name else ""
    if actual_dir != expected_dir:
        return [f"{fd.name}: package {fd.package!r} must live in directory {expected_dir!r}, not {actual_dir!r}"]
    return []


def check_file_name(fd) -> list[str]:
    base = fd.name.rsplit("/", 1)[-1]
    if not (base.endswith(".proto") and LOWER_SNAKE_CASE.match(base[: -len(".proto")])):
        return [f"{fd.name}: file name is not lower_snake_case.proto"]
    return []


def check_service_names(fd) -> list[str]:
    problems = []
    for service in fd.services_by_name.values():
        if not PASCAL_CASE.match(service.name):
            problems.append(f"service {service.full_name}: name is not PascalCase")
        if not service.name.endswith("Service"):
            problems.append(f"service {service.full_name}: name must end in 'Service'")
    return problems


def check_rpc_names(fd) -> list[str]:
    return [
        f"rpc {method.full_name}: name is not PascalCase"
        for service in fd.services_by_name.values()
        for method in service.methods
        if not PASCAL_CASE.match(method.name)
    ]


def check_rpc_request_response_names(fd) -> list[str]:
    problems = []
    for service in fd.services_by_name.values():
        for method in service.methods:
            prefix = f"{fd.package}.{method.name}" if fd.package else method.name
            if method.input_type.full_name != f"{prefix}Request":
                problems.append(
                    f"rpc {method.full_name}: request type is {method.input_type.full_name}, "
                    f"expected {prefix}Request"
                )
            if method.output_type.full_name != f"{prefix}Response":
                problems.append(
                    f"rpc {method.full_name}: response type is {method.output_type.full_name}, "
                    f"expected {prefix}Response"
                )
    return problems


def check_rpc_request_response_unique(fd) -> list[str]:
    used_by: dict[str, list[str]] = {}
    for service in fd.services_by_name.values():
        for method in service.methods:
            used_by.setdefault(method.input_type.full_name, []).append(f"{method.full_name} (request)")
            used_by.setdefault(method.output_type.full_name, []).append(f"{method.full_name} (response)")
    return [
        f"message {name} is used by more than one RPC: {', '.join(users)}"
        for name, users in sorted(used_by.items())
        if len(users) > 1
    ]


def check_message_names(fd) -> list[str]:
    return [
        f"message {message.full_name}: name is not PascalCase"
        for message in iter_messages(fd)
        if not PASCAL_CASE.match(message.name)
    ]


def check_field_names(fd) -> list[str]:
    return [
        f"field {field.full_name}: name is not lower_snake_case"
        for message in iter_messages(fd)
        for field in message.fields
        if not LOWER_SNAKE_CASE.match(field.name)
    ]


def check_oneof_names(fd) -> list[str]:
    # proto3 `optional` fields get a synthetic oneof named `_<field>`; buf skips those too.
    fdp = to_proto(fd)
    problems = []
    for message_name, message in iter_message_protos(fdp):
        synthetic = {field.oneof_index for field in message.field if field.proto3_optional}
        for index, oneof in enumerate(message.oneof_decl):
            if index not in synthetic and not LOWER_SNAKE_CASE.match(oneof.name):
                problems.append(f"oneof {message_name}.{oneof.name}: name is not lower_snake_case")
    return problems


def check_enum_names(fd) -> list[str]:
    return [f"enum {enum.full_name}: name is not PascalCase" for enum in iter_enums(fd) if not PASCAL_CASE.match(enum.name)]


def check_enum_values(fd) -> list[str]:
    problems = []
    for enum in iter_enums(fd):
        prefix = upper_snake(enum.name) + "_"
        if enum.GetOptions().allow_alias:
            problems.append(f"enum {enum.full_name}: allow_alias is not allowed")
        for value in enum.values:
            if not UPPER_SNAKE_CASE.match(value.name):
                problems.append(f"enum value {enum.full_name}.{value.name}: name is not UPPER_SNAKE_CASE")
            if not value.name.startswith(prefix) or value.name == prefix:
                problems.append(f"enum value {enum.full_name}.{value.name}: name must start with {prefix!r}")
        zero = [value for value in enum.values if value.number == 0]
        expected_zero = f"{prefix}UNSPECIFIED"
        if not zero:
            problems.append(f"enum {enum.full_name}: has no value 0 (expected {expected_zero} = 0)")
        elif zero[0].name != expected_zero:
            problems.append(f"enum {enum.full_name}: value 0 is {zero[0].name}, expected {expected_zero}")
        if enum.values and enum.values[0].number != 0:
            problems.append(f"enum {enum.full_name}: the first value must be {expected_zero} = 0")
    return problems


def check_timestamp_field_names(fd) -> list[str]:
    return [
        f"field {field.full_name}: google.protobuf.Timestamp fields must be named *_time"
        for message in iter_messages(fd)
        for field in message.fields
        if field.message_type is not None and field.message_type.full_name == TIMESTAMP and not field.name.endswith("_time")
    ]


def field_number_problems(fdp: descriptor_pb2.FileDescriptorProto) -> list[str]:
    """Duplicate or out-of-range field numbers, and duplicate field names."""
    problems = []
    for message_name, message in iter_message_protos(fdp):
        seen_numbers: dict[int, str] = {}
        seen_names: set[str] = set()
        for field in message.field:
            if field.number in seen_numbers:
                problems.append(
                    f"message {message_name}: field number {field.number} is used by both "
                    f"{seen_numbers[field.number]} and {field.name}"
                )
            seen_numbers.setdefault(field.number, field.name)
            if field.name in seen_names:
                problems.append(f"message {message_name}: field name {field.name} is declared twice")
            seen_names.add(field.name)
            if not 1 <= field.number <= MAX_FIELD_NUMBER:
                problems.append(f"field {message_name}.{field.name}: number {field.number} is out of range")
            elif field.number in IMPLEMENTATION_RESERVED:
                problems.append(
                    f"field {message_name}.{field.name}: number {field.number} is in 19000-19999, "
                    "reserved for the protobuf implementation"
                )
    for enum_name, enum in iter_enum_protos(fdp):
        if enum.options.allow_alias:
            continue  # reported by check_enum_values
        seen: dict[int, str] = {}
        for value in enum.value:
            if value.number in seen:
                problems.append(
                    f"enum {enum_name}: number {value.number} is used by both {seen[value.number]} and {value.name}"
                )
            seen.setdefault(value.number, value.name)
    return problems


def reserved_problems(fdp: descriptor_pb2.FileDescriptorProto) -> list[str]:
    """Fields and enum values that use a reserved number or name."""
    problems = []
    for message_name, message in iter_message_protos(fdp):
        reserved_names = set(message.reserved_name)
        for field in message.field:
            for reserved in message.reserved_range:  # [start, end)
                if reserved.start <= field.number < reserved.end:
                    problems.append(
                        f"field {message_name}.{field.name}: number {field.number} is reserved "
                        f"({_range_text(reserved.start, reserved.end - 1)})"
                    )
            if field.name in reserved_names:
                problems.append(f"field {message_name}.{field.name}: the name {field.name!r} is reserved")
    for enum_name, enum in iter_enum_protos(fdp):
        reserved_names = set(enum.reserved_name)
        for value in enum.value:
            for reserved in enum.reserved_range:  # [start, end]
                if reserved.start <= value.number <= reserved.end:
                    problems.append(
                        f"enum value {enum_name}.{value.name}: number {value.number} is reserved "
                        f"({_range_text(reserved.start, reserved.end)})"
                    )
            if value.name in reserved_names:
                problems.append(f"enum value {enum_name}.{value.name}: the name {value.name!r} is reserved")
    return problems


def _range_text(first: int, last: int) -> str:
    return f"reserved {first}" if first == last else f"reserved {first} to {last}"


def _fail_on(problems: list[str], rule: str) -> None:
    assert not problems, f"{rule}:\n  " + "\n  ".join(problems)


# --------------------------------------------------------------------------------------------
# Lint tests over the real API
# --------------------------------------------------------------------------------------------


def test_descriptor_is_the_public_api_file():
    assert DESCRIPTOR.name == PROTO_FILE
    assert (PROTO_ROOT / DESCRIPTOR.name).is_file(), f"{DESCRIPTOR.name} not found under {PROTO_ROOT}"
    assert DESCRIPTOR.package == "tastemaker.v1"
    assert DESCRIPTOR.services_by_name, "the file declares no service"


def test_package_is_versioned():
    _fail_on(check_package_versioned(DESCRIPTOR), "PACKAGE_VERSION_SUFFIX / PACKAGE_LOWER_SNAKE_CASE")


def test_package_matches_directory():
    _fail_on(check_package_matches_directory(DESCRIPTOR), "PACKAGE_DIRECTORY_MATCH")


def test_file_name_is_lower_snake_case():
    _fail_on(check_file_name(DESCRIPTOR), "FILE_LOWER_SNAKE_CASE")


def test_service_names_end_in_service():
    _fail_on(check_service_names(DESCRIPTOR), "SERVICE_SUFFIX / SERVICE_PASCAL_CASE")


def test_rpc_names_are_pascal_case():
    _fail_on(check_rpc_names(DESCRIPTOR), "RPC_PASCAL_CASE")


def test_rpc_request_and_response_are_named_after_the_rpc():
    _fail_on(check_rpc_request_response_names(DESCRIPTOR), "RPC_REQUEST_STANDARD_NAME / RPC_RESPONSE_STANDARD_NAME")


def test_rpc_request_and_response_messages_are_unique():
    _fail_on(check_rpc_request_response_unique(DESCRIPTOR), "RPC_REQUEST_RESPONSE_UNIQUE")


def test_message_names_are_pascal_case():
    _fail_on(check_message_names(DESCRIPTOR), "MESSAGE_PASCAL_CASE")


def test_field_names_are_lower_snake_case():
    _fail_on(check_field_names(DESCRIPTOR), "FIELD_LOWER_SNAKE_CASE")


def test_oneof_names_are_lower_snake_case():
    _fail_on(check_oneof_names(DESCRIPTOR), "ONEOF_LOWER_SNAKE_CASE")


def test_enum_names_are_pascal_case():
    _fail_on(check_enum_names(DESCRIPTOR), "ENUM_PASCAL_CASE")


def test_enum_values_are_prefixed_upper_snake_with_unspecified_zero():
    _fail_on(
        check_enum_values(DESCRIPTOR),
        "ENUM_VALUE_UPPER_SNAKE_CASE / ENUM_VALUE_PREFIX / ENUM_ZERO_VALUE_SUFFIX / ENUM_NO_ALLOW_ALIAS",
    )


def test_timestamp_fields_are_named_time():
    _fail_on(check_timestamp_field_names(DESCRIPTOR), "Timestamp fields are named *_time")


def test_field_numbers_are_not_reused():
    _fail_on(field_number_problems(to_proto(DESCRIPTOR)), "field numbers unique and in range")


def test_reserved_numbers_and_names_are_respected():
    _fail_on(reserved_problems(to_proto(DESCRIPTOR)), "reserved ranges and names")


# --------------------------------------------------------------------------------------------
# Freshness: the committed generated code matches the .proto
# --------------------------------------------------------------------------------------------


def _generated_files(root: Path) -> dict[str, bytes]:
    out_dir = root / "tastemaker" / "v1"
    return {
        path.name: path.read_bytes()
        for path in sorted(out_dir.iterdir())
        if path.is_file() and path.name.startswith("recommender_service_pb2")
    }


def test_generated_code_is_up_to_date(tmp_path):
    # Exactly what scripts/gen_protos.sh runs, from the repo root so the embedded paths match.
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-Iprotos",
            f"--python_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            f"protos/{PROTO_FILE}",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, f"protoc failed:\n{result.stdout}\n{result.stderr}"

    fresh = _generated_files(tmp_path)
    committed = _generated_files(GENERATED_ROOT)
    assert fresh, "protoc generated nothing"
    hint = "the committed code in services/tastemaker/v1/ is stale: run scripts/gen_protos.sh and commit the result"
    assert sorted(committed) == sorted(fresh), f"{hint}\n  generated: {sorted(fresh)}\n  committed: {sorted(committed)}"

    stale = []
    for name, content in fresh.items():
        if committed[name] != content:
            diff = difflib.unified_diff(
                committed[name].decode(errors="replace").splitlines(),
                content.decode(errors="replace").splitlines(),
                f"committed/{name}",
                f"generated/{name}",
                lineterm="",
                n=1,
            )
            shown = [line if len(line) <= 160 else line[:157] + "..." for line in list(diff)[:30]]
            stale.append(f"{name} differs:\n" + "\n".join(shown))
    assert not stale, (
        f"{hint}. (If only version numbers differ, your grpcio-tools differs from the one pinned in "
        "pyproject.toml.)\n" + "\n".join(stale)
    )


# --------------------------------------------------------------------------------------------
# Wire compatibility: no field is removed, renumbered or retyped
# --------------------------------------------------------------------------------------------

LOCK_ADVICE = (
    "Never reuse or change a field number; add new fields with new numbers and update the lock file "
    "with scripts/update_proto_lock.py. To delete a field, `reserved` its number (and name) in the "
    "message instead of reusing it."
)


def _parse_lock_line(line: str) -> tuple[str, str, int, str]:
    message, field, number, type_ = line.split(" ", 3)
    return message, field, int(number), type_


def lock_problems(locked: list[str], current: list[str], reserved: dict[str, list[tuple[int, int]]]) -> list[str]:
    """Locked lines that are gone from `current`, explained. A removed field is fine only when its
    message still exists and now reserves the field's number, so it can never be reused."""
    current_set = set(current)
    by_name: dict[tuple[str, str], str] = {}
    by_number: dict[tuple[str, int], str] = {}
    for line in current:
        message, field, number, _ = _parse_lock_line(line)
        by_name[(message, field)] = line
        by_number[(message, number)] = line

    problems = []
    for line in locked:
        if line in current_set:
            continue
        message, field, number, type_ = _parse_lock_line(line)
        same_name, same_number = by_name.get((message, field)), by_number.get((message, number))
        if same_name is not None:
            _, _, new_number, new_type = _parse_lock_line(same_name)
            if new_number != number:
                problems.append(f"{message}.{field} was renumbered {number} -> {new_number}")
            if new_type != type_:
                problems.append(f"{message}.{field} (= {number}) changed type {type_!r} -> {new_type!r}")
        if same_number is not None:
            _, new_field, _, new_type = _parse_lock_line(same_number)
            if new_field != field:
                change = f" (type {type_!r} -> {new_type!r})" if new_type != type_ else ""
                problems.append(f"{message}: field number {number} was {field}, is now reused by {new_field}{change}")
        if same_name is not None or same_number is not None:
            continue
        if message not in reserved:
            problems.append(f"{message}.{field} (= {number}) was removed, along with its whole message {message}")
        elif not any(start <= number < end for start, end in reserved[message]):
            problems.append(f"{message}.{field} (= {number}) was removed without `reserved {number};`")
    return problems


def test_lock_file_is_sorted_and_well_formed():
    locked = proto_lock.read_lock(LOCK_PATH)
    assert locked, f"{LOCK_PATH} is missing or empty: run scripts/update_proto_lock.py"
    assert locked == sorted(locked), f"{LOCK_PATH.name} is not sorted: run scripts/update_proto_lock.py"
    assert len(set(locked)) == len(locked), f"{LOCK_PATH.name} has duplicate lines"
    for line in locked:
        try:
            _parse_lock_line(line)
        except ValueError:
            pytest.fail(f"{LOCK_PATH.name}: malformed line {line!r}")


def test_no_locked_field_was_removed_renumbered_or_retyped():
    locked = proto_lock.read_lock(LOCK_PATH)
    current = proto_lock.lock_lines(DESCRIPTOR)
    problems = lock_problems(locked, current, proto_lock.reserved_field_numbers(DESCRIPTOR))
    assert not problems, (
        "Wire-incompatible change to the public API (clients already deployed would misread these fields):\n  "
        + "\n  ".join(problems)
        + f"\n{LOCK_ADVICE}"
    )
    new = sorted(set(current) - set(locked))
    if new:
        warnings.warn(
            f"{len(new)} field(s) are not yet in {LOCK_PATH.name} (run scripts/update_proto_lock.py): " + "; ".join(new),
            stacklevel=1,
        )


# --------------------------------------------------------------------------------------------
# The rules bite: lint a deliberately bad file
# --------------------------------------------------------------------------------------------


def _bad_file():
    """A file that breaks every rule, built in a private pool so it cannot clash with the real one."""
    F = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(
        name="elsewhere/Bad-File.proto", package="acme", syntax="proto2", dependency=["google/protobuf/timestamp.proto"]
    )
    thing = fdp.message_type.add(name="thing_msg")
    thing.field.add(name="BadName", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    thing.field.add(name="created", number=2, type=F.TYPE_MESSAGE, label=F.LABEL_OPTIONAL, type_name=".google.protobuf.Timestamp")
    thing.field.add(name="choice_a", number=3, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL, oneof_index=0)
    thing.oneof_decl.add(name="BadOneof")
    fdp.message_type.add(name="GetRequest")
    color = fdp.enum_type.add(name="color")
    color.value.add(name="RED", number=0)
    color.value.add(name="COLOR_blue", number=1)
    status = fdp.enum_type.add(name="Status")
    status.value.add(name="STATUS_OK", number=1)
    status.value.add(name="STATUS_UNKNOWN", number=0)
    service = fdp.service.add(name="Recommender")
    service.method.add(name="get", input_type=".acme.thing_msg", output_type=".acme.thing_msg")
    service.method.add(name="Get", input_type=".acme.GetRequest", output_type=".acme.thing_msg")

    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(timestamp_pb2.DESCRIPTOR.serialized_pb)
    pool.AddSerializedFile(fdp.SerializeToString())
    return pool.FindFileByName(fdp.name)


@pytest.fixture(scope="module")
def bad():
    return _bad_file()


class TestRulesBite:
    @pytest.mark.parametrize(
        "check, offenders",
        [
            (check_package_versioned, ["'acme'"]),
            (check_package_matches_directory, ["'elsewhere'"]),
            (check_file_name, ["Bad-File.proto"]),
            (check_service_names, ["acme.Recommender"]),
            (check_rpc_names, ["acme.Recommender.get"]),
            (check_rpc_request_response_names, ["expected acme.getRequest", "expected acme.GetResponse"]),
            (check_rpc_request_response_unique, ["acme.thing_msg"]),
            (check_message_names, ["acme.thing_msg"]),
            (check_field_names, ["acme.thing_msg.BadName"]),
            (check_oneof_names, ["acme.thing_msg.BadOneof"]),
            (check_enum_names, ["acme.color"]),
            (check_enum_values, ["acme.color.RED", "acme.color.COLOR_blue", "COLOR_UNSPECIFIED", "STATUS_UNSPECIFIED"]),
            (check_timestamp_field_names, ["acme.thing_msg.created"]),
        ],
        ids=lambda value: getattr(value, "__name__", None),
    )
    def test_rule_reports_offender(self, bad, check, offenders):
        report = "\n".join(check(bad))
        for offender in offenders:
            assert offender in report, f"{check.__name__} did not report {offender!r}; it said:\n{report}"

    def test_duplicate_numbers_and_reserved_use_are_reported(self):
        # protoc refuses these files outright; check the rules on the FileDescriptorProto form.
        F = descriptor_pb2.FieldDescriptorProto
        fdp = descriptor_pb2.FileDescriptorProto(name="acme/v1/x.proto", package="acme.v1")
        message = fdp.message_type.add(name="Thing")
        message.field.add(name="a", number=1, type=F.TYPE_STRING)
        message.field.add(name="b", number=1, type=F.TYPE_STRING)
        message.field.add(name="c", number=5, type=F.TYPE_STRING)
        message.field.add(name="old", number=19500, type=F.TYPE_STRING)
        message.reserved_range.add(start=4, end=7)  # reserved 4 to 6;
        message.reserved_name.append("old")
        enum = fdp.enum_type.add(name="Kind")
        enum.value.add(name="KIND_UNSPECIFIED", number=0)
        enum.value.add(name="KIND_A", number=2)
        enum.value.add(name="KIND_B", number=2)
        enum.reserved_range.add(start=2, end=2)  # reserved 2;

        numbers = "\n".join(field_number_problems(fdp))
        assert "field number 1 is used by both a and b" in numbers
        assert "acme.v1.Thing.old: number 19500" in numbers
        assert "number 2 is used by both KIND_A and KIND_B" in numbers

        reserved = "\n".join(reserved_problems(fdp))
        assert "acme.v1.Thing.c: number 5 is reserved (reserved 4 to 6)" in reserved
        assert "acme.v1.Thing.old: the name 'old' is reserved" in reserved
        assert "acme.v1.Kind.KIND_A: number 2 is reserved (reserved 2)" in reserved

    def test_lock_comparison(self):
        locked = [
            "p.A gone 4 string",
            "p.A kept 1 string",
            "p.A moved 2 int64",
            "p.A retyped 3 int32",
            "p.A tombstoned 5 string",
            "p.B only 1 string",
        ]
        current = [
            "p.A kept 1 string",
            "p.A moved 7 int64",
            "p.A retyped 3 int64",
            "p.A brand_new 8 string",  # additions are fine
            "p.A reuser 2 bool",
        ]
        problems = lock_problems(locked, current, {"p.A": [(5, 6)]})
        report = "\n".join(problems)
        assert "p.A.moved was renumbered 2 -> 7" in report
        assert "p.A: field number 2 was moved, is now reused by reuser (type 'int64' -> 'bool')" in report
        assert "p.A.retyped (= 3) changed type 'int32' -> 'int64'" in report
        assert "p.A.gone (= 4) was removed without `reserved 4;`" in report
        assert "p.B.only (= 1) was removed, along with its whole message p.B" in report
        assert "tombstoned" not in report  # deleted and reserved: allowed
        assert "brand_new" not in report and "kept" not in report
        assert len(problems) == 5, report

    def test_lock_lines_format(self):
        lines = proto_lock.lock_lines(DESCRIPTOR)
        assert "tastemaker.v1.Item item_id 1 string" in lines
        assert "tastemaker.v1.Item attributes 5 map<string, string>" in lines
        assert "tastemaker.v1.Item update_time 6 google.protobuf.Timestamp" in lines
        assert "tastemaker.v1.RecommendedItem sources 4 repeated tastemaker.v1.CandidateSource" in lines
        assert not any("AttributesEntry" in line for line in lines)
