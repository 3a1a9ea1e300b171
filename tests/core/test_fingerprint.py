"""Run identity: a changed training source is a different run, the same source the same one."""

import shutil

import pytest

from cellcontrast.core import fingerprint as fp


def test_code_digest_is_stable_and_covers_the_training_code():
    assert fp.code_digest(*fp.TRAINING_CODE) == fp.code_digest(*fp.TRAINING_CODE)
    assert len(fp.code_digest(*fp.TRAINING_CODE)) == 16
    for rel in fp.TRAINING_CODE:  # each named source exists (a renamed module would silently drop out)
        assert (fp.PACKAGE_ROOT / rel).exists(), rel
    assert fp.code_digest("train") != fp.code_digest("nn")


def test_code_digest_changes_with_any_training_file(tmp_path, monkeypatch):
    root = tmp_path / "pkg"
    shutil.copytree(fp.PACKAGE_ROOT / "train", root / "train")
    monkeypatch.setattr(fp, "PACKAGE_ROOT", root)
    fp.code_digest.cache_clear()
    try:
        before = fp.code_digest("train")
        (root / "train" / "loops.py").write_text((root / "train" / "loops.py").read_text() + "\n# changed\n")
        fp.code_digest.cache_clear()
        assert fp.code_digest("train") != before
    finally:
        fp.code_digest.cache_clear()


@pytest.mark.parametrize("parts", [({"a": 1, "b": 2},), ([1, 2], "x")])
def test_fingerprint_ignores_key_order_only(parts):
    assert fp.fingerprint(*parts) == fp.fingerprint(*parts)
    reordered = tuple(dict(reversed(list(p.items()))) if isinstance(p, dict) else p for p in parts)
    assert fp.fingerprint(*reordered) == fp.fingerprint(*parts)
    assert fp.fingerprint(*parts, "more") != fp.fingerprint(*parts)
