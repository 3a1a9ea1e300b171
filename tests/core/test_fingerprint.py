"""Run identity: a changed training source is a different run, the same source the same one."""

import shutil

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


def test_fingerprint_ignores_key_order_but_not_content():
    assert fp.fingerprint({"a": 1, "b": 2}, "x") == fp.fingerprint({"b": 2, "a": 1}, "x")
    assert fp.fingerprint({"a": 1, "b": 2}, "x") != fp.fingerprint({"a": 1, "b": 3}, "x")
    assert fp.fingerprint({"a": 1}, "x") != fp.fingerprint({"a": 1}, "x", "more")
