"""Data roles are enforced: disjoint, large enough, mapping valid; the slide split is by slide and seeded."""

from __future__ import annotations

import pytest

from pixcell_fed.audit.roles import build_roles, list_tiles, split_slides
from pixcell_fed.errors import AuditError, ExitCode, UsageError
from pixcell_fed.testing.audit_tiles import region_tiles, write_tiles


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("roles")
    tiles, _ = region_tiles(1000, 2967, stride=256)
    t = write_tiles(root / "T", tiles[:8], "t")
    h = write_tiles(root / "H", tiles[8:16], "h")
    s = write_tiles(root / "S", tiles[16:20], "s")
    return root, s, t, h


def test_split_slides_is_by_slide_deterministic_and_disjoint():
    keys = [f"slide{i:02d}" for i in range(10)]
    t, h = split_slides(keys, 0.34, seed=3)
    assert set(t).isdisjoint(h) and sorted(t + h) == keys and len(h) == 3
    assert split_slides(list(reversed(keys)), 0.34, seed=3) == (t, h)
    assert split_slides(keys, 0.34, seed=4) != (t, h)
    assert split_slides(["a", "b"], 0.9, seed=0)[0] == ["a"] or split_slides(["a", "b"], 0.9, seed=0)[0] == ["b"]
    with pytest.raises(AuditError, match="at least 2 slides"):
        split_slides(["only"], 0.5, seed=0)
    with pytest.raises(AuditError, match="duplicate"):
        split_slides(["a", "a", "b"], 0.5, seed=0)


def test_roles_accept_a_valid_set_and_resolve_the_mapping(folders):
    _, s, t, h = folders
    roles = build_roles(s, t, h, source_of={s[0].name: t[2].stem, str(s[1]): t[3].name}, min_holdout=4,
                        min_holdout_ratio=0.5)
    assert roles.sizes() == {"S": 4, "T": 8, "H": 8}
    assert dict(roles.source_index) == {0: 2, 1: 3}


@pytest.mark.parametrize("case, message", [
    ("overlap", "in both T and H"),
    ("identical_bytes", "byte-identical"),
    ("small_holdout", "needs at least"),
    ("ratio", "smaller than"),
    ("bad_source", "not in T"),
    ("bad_synthetic", "not in S"),
    ("empty", "empty"),
])
def test_role_violations_are_refused(folders, case, message):
    root, s, t, h = folders
    kwargs = dict(source_of=None, min_holdout=4, min_holdout_ratio=0.5)
    if case == "overlap":
        args = (s, t, h + [t[0]])
    elif case == "identical_bytes":
        copy = root / "H" / "dup.png"
        copy.write_bytes(t[0].read_bytes())
        args = (s, t, h + [copy])
    elif case == "small_holdout":
        args, kwargs["min_holdout"] = (s, t, h[:3]), 4
    elif case == "ratio":
        args, kwargs["min_holdout"] = (s, t, h[:3]), 2
    elif case == "bad_source":
        args, kwargs["source_of"] = (s, t, h), {s[0].name: "nope.png"}
    elif case == "bad_synthetic":
        args, kwargs["source_of"] = (s, t, h), {"nope.png": t[0].name}
    else:
        args = ([], t, h)
    with pytest.raises(AuditError, match=message) as info:
        build_roles(*args, **kwargs)
    assert info.value.hint
    if case == "identical_bytes":
        (root / "H" / "dup.png").unlink()


def test_list_tiles_is_a_usage_error_for_missing_or_empty_folders(tmp_path):
    with pytest.raises(UsageError) as info:
        list_tiles(tmp_path / "missing", role="holdout")
    assert info.value.exit_code == ExitCode.USAGE
    with pytest.raises(UsageError, match="no PNG"):
        list_tiles(tmp_path, role="holdout")
