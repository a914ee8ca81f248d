"""protos/ under buf (buf.yaml; PyPI buf-bin): lint clean, no breaking change against the
previous commit, and every element documented, read from the descriptors' source info.

`buf breaking` compares the working tree with the commit before HEAD (HEAD~1, its first parent
for a merge), read with `git archive` (local, no network, works in a worktree). On a clean
checkout, as in .ci/run, the working tree is HEAD, so comparing with HEAD would check nothing;
HEAD~1 checks the last commit (a merge: everything the merged branch changed), and on a
developer's tree the uncommitted changes too. A parent without buf.yaml predates buf here and
is not compared (the commit that adopted buf also added the go/java options, which FILE counts
as changes). A breaking change made on purpose lists its rule under `breaking.ignore_only` in
buf.yaml for that commit.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parent.parent
BUF = Path(sys.executable).parent / "buf"


def buf(*args: str, cwd: Path = ROOT, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(BUF), *args], cwd=cwd, input=stdin, capture_output=True, timeout=120)


def git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, timeout=60)


def test_buf_lint_is_clean() -> None:
    done = buf("lint")
    assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()


def previous_commit_tar() -> bytes:
    """protos/ and buf.yaml of HEAD~1 as a tar; skips when there is none to compare with."""
    if shutil.which("git") is None or git("rev-parse", "--git-dir").returncode != 0:
        pytest.skip("not a git checkout: nothing to compare with")
    if git("rev-parse", "--verify", "--quiet", "HEAD~1^{commit}").returncode != 0:
        pytest.skip("HEAD has no parent here (a first commit or a shallow clone)")
    if git("cat-file", "-e", "HEAD~1:buf.yaml").returncode != 0:
        pytest.skip("HEAD~1 predates buf.yaml")
    archive = git("archive", "--format=tar", "HEAD~1", "--", "buf.yaml", "protos")
    assert archive.returncode == 0, archive.stderr.decode()
    return archive.stdout


def test_no_breaking_change_against_the_previous_commit() -> None:
    done = buf("breaking", "--against", "-#format=tar", stdin=previous_commit_tar())
    assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()


def test_buf_breaking_catches_a_removed_field_and_a_renamed_method(tmp_path: Path) -> None:
    """The check above can fail: a field removed without `reserved` and a renamed RPC are
    reported against the tree as it is."""
    changed = tmp_path / "changed"
    shutil.copytree(ROOT / "protos", changed / "protos")
    shutil.copy(ROOT / "buf.yaml", changed / "buf.yaml")
    proto = changed / "protos/linkedblob/v1/registry.proto"
    text = proto.read_text()
    text = text.replace("  int64 length = 4;\n", "", 1)
    text = text.replace("rpc StatBlob(", "rpc StatTheBlob(", 1)
    proto.write_text(text)
    done = buf("breaking", "--against", str(ROOT), cwd=changed)
    report = done.stdout.decode()
    assert done.returncode != 0
    assert 'Previously present field "4" with name "length"' in report, report
    assert 'Previously present RPC "StatBlob"' in report, report


# --- documentation, from the descriptors -------------------------------------------------------

# Field numbers in descriptor.proto, for SourceCodeInfo paths.
_FILE_MESSAGE, _FILE_ENUM, _FILE_SERVICE = 4, 5, 6
_MESSAGE_FIELD, _MESSAGE_NESTED, _MESSAGE_ENUM, _MESSAGE_ONEOF = 2, 3, 4, 8
_ENUM_VALUE = 2
_SERVICE_METHOD = 2


def _enum_elements(
    enum: descriptor_pb2.EnumDescriptorProto, path: tuple[int, ...], prefix: str
) -> list[tuple[str, tuple[int, ...]]]:
    name = f"{prefix}.{enum.name}"
    out = [(f"enum {name}", path)]
    for i, value in enumerate(enum.value):
        out.append((f"enum value {name}.{value.name}", (*path, _ENUM_VALUE, i)))
    return out


def _message_elements(
    msg: descriptor_pb2.DescriptorProto, path: tuple[int, ...], prefix: str
) -> list[tuple[str, tuple[int, ...]]]:
    name = f"{prefix}.{msg.name}"
    out = [(f"message {name}", path)]
    for i, field in enumerate(msg.field):
        out.append((f"field {name}.{field.name}", (*path, _MESSAGE_FIELD, i)))
    for i, oneof in enumerate(msg.oneof_decl):
        if not oneof.name.startswith("_"):  # proto3 `optional` makes a synthetic oneof
            out.append((f"oneof {name}.{oneof.name}", (*path, _MESSAGE_ONEOF, i)))
    for i, nested in enumerate(msg.nested_type):
        out += _message_elements(nested, (*path, _MESSAGE_NESTED, i), name)
    for i, enum in enumerate(msg.enum_type):
        out += _enum_elements(enum, (*path, _MESSAGE_ENUM, i), name)
    return out


def elements(file: descriptor_pb2.FileDescriptorProto) -> list[tuple[str, tuple[int, ...]]]:
    """Every service, method, message, field, oneof, enum and enum value, with its path."""
    out: list[tuple[str, tuple[int, ...]]] = []
    for i, msg in enumerate(file.message_type):
        out += _message_elements(msg, (_FILE_MESSAGE, i), file.package)
    for i, enum in enumerate(file.enum_type):
        out += _enum_elements(enum, (_FILE_ENUM, i), file.package)
    for i, service in enumerate(file.service):
        name = f"{file.package}.{service.name}"
        out.append((f"service {name}", (_FILE_SERVICE, i)))
        for j, method in enumerate(service.method):
            out.append((f"rpc {name}.{method.name}", (_FILE_SERVICE, i, _SERVICE_METHOD, j)))
    return out


def test_every_element_has_a_leading_comment(tmp_path: Path) -> None:
    image = tmp_path / "image.binpb"
    done = buf("build", "--exclude-imports", "-o", str(image))
    assert done.returncode == 0, done.stderr.decode()
    files = descriptor_pb2.FileDescriptorSet.FromString(image.read_bytes()).file
    assert {f.name for f in files} == {
        str(p.relative_to(ROOT / "protos")) for p in (ROOT / "protos").rglob("*.proto")
    }
    undocumented = []
    counted = 0
    for file in files:
        comments = {
            tuple(loc.path): loc.leading_comments.strip() for loc in file.source_code_info.location
        }
        for what, path in elements(file):
            counted += 1
            if not comments.get(path):
                undocumented.append(f"{file.name}: {what}")
        assert file.options.go_package and file.options.java_package, file.name
        assert file.options.java_multiple_files, file.name
    assert counted > 350  # the walk found the elements (396 today)
    assert not undocumented, "\n".join(undocumented)
