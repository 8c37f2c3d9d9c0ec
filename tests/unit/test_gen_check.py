"""`make check-gen` passes on the committed tree and fails once a proto changes without regenerating."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "gen_protos.py"


def _check(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), "--check", "--root", str(root)], capture_output=True, text=True)


def test_check_gen_fails_after_a_proto_edit(tmp_path: Path) -> None:
    for part in ("proto", "gen"):
        shutil.copytree(REPO / part, tmp_path / part)
    assert _check(tmp_path).returncode == 0, "the committed gen/ matches the committed protos"

    proto = tmp_path / "proto" / "servegrid" / "gateway" / "v1" / "gateway.proto"
    text = proto.read_text()
    added = "  string request_id = 5;\n  // Added.\n  bool trace = 6;"
    proto.write_text(text.replace("  string request_id = 5;", added))
    result = _check(tmp_path)
    assert result.returncode == 1
    assert "gen/python/servegrid/gateway/v1/gateway_pb2.py" in result.stderr
    assert "gen/python/servegrid/descriptors.binpb" in result.stderr


def test_check_gen_fails_when_the_openapi_document_is_stale(tmp_path: Path) -> None:
    for part in ("proto", "gen"):
        shutil.copytree(REPO / part, tmp_path / part)
    # A comment is an operation's description: the document goes stale though Envoy's descriptor set does not.
    proto = tmp_path / "proto" / "servegrid" / "gateway" / "v1" / "gateway.proto"
    proto.write_text(proto.read_text().replace("// Runs one inference.", "// Runs exactly one inference."))
    result = _check(tmp_path)
    assert result.returncode == 1
    assert "gen/python/servegrid/openapi/servegrid.openapi.json" in result.stderr
    assert "gen/python/servegrid/descriptors.binpb" not in result.stderr
