"""A vLLM instance's private directory and key (engines/vllm/instance.py), without vLLM."""

from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path

import pytest

from resilient_ep.engines.vllm import instance as inst
from resilient_ep.transport import wire


@pytest.fixture
def tmpdir_env(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    yield tmp_path
    wire.set_key(None)


def test_directories_are_private_and_the_key_is_shared(tmpdir_env):
    name = uuid.uuid4().hex[:12]
    root = inst.instance_dir(name)
    for d in (root.parent, root):
        assert (os.stat(d).st_mode & 0o777) == 0o700
    assert not (root / "instance.key").exists(), "only joining makes a key"
    assert inst.join_instance(name) == root
    key = wire.load_key(root / "instance.key")
    inst._keyed.discard(name)  # another process of the instance joins: the same key
    inst.join_instance(name)
    assert wire.load_key(root / "instance.key") == key
    assert wire.process_key() == key, "this process now speaks for the instance"
    from resilient_ep.transport import curve

    if curve.enabled():  # CURVE authenticates every byte of its sockets: no tag on top
        assert wire.decode_header(wire.encode_header({"t": "x"}), key=None) == {"t": "x"}
    else:  # the tag does
        frame = wire.encode_header({"t": "x"})
        assert wire.decode_header(frame, key=key) == {"t": "x"}


def test_a_loose_directory_is_tightened_and_a_link_refused(tmpdir_env):
    base = Path(tempfile.gettempdir()) / f"resilient-ep-{os.getuid()}"
    base.mkdir(mode=0o755)
    os.chmod(base, 0o755)
    name = uuid.uuid4().hex[:12]
    inst.instance_dir(name)
    assert (os.stat(base).st_mode & 0o777) == 0o700
    elsewhere = tmpdir_env / "elsewhere"
    elsewhere.mkdir()
    (base / "planted").symlink_to(elsewhere)
    with pytest.raises(PermissionError, match="not a directory"):
        inst.instance_dir("planted")
    for bad in ("", "../x", ".hidden", "a/b"):
        with pytest.raises(ValueError, match="plain name"):
            inst.instance_dir(bad)
