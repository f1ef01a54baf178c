"""learnable_memory.batch.sources: every kind of input as one ordered listing, the refusals, and shards."""

from __future__ import annotations

import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from learnable_memory.batch.sources import Listing, list_images, parse_shard
from tests.helpers import fashion_files


@pytest.fixture
def tree(tmp_path):
    """``imgs/`` with 4 images at two depths and two files that are not images."""
    root = tmp_path / "imgs"
    fashion_files(root, 2)
    fashion_files(root / "sub" / "deeper", 2, start=2)
    (root / "notes.txt").write_text("not an image")
    (root / "sub" / "README").write_text("nor this")
    return root


def test_folders_are_searched_recursively_by_extension_in_sorted_order(tree):
    listing = list_images(tree)
    assert listing.paths == tuple(sorted(str(p) for p in tree.rglob("*.*g")))
    assert len(listing) == 4 and listing.ids == {}


def test_files_globs_and_lists_keep_the_order_given(tree, tmp_path):
    files = sorted(tree.rglob("*.*g"))
    listing = list_images([files[3], str(tree / "*.png"), files[0]])
    assert listing.paths == (str(files[3]), *sorted(str(p) for p in tree.glob("*.png")), str(files[0]))
    (tmp_path / "lists").mkdir()
    text = f"# two images\n../imgs/{files[1].relative_to(tree)}\n\n{files[2]}\n"  # relative to the list, absolute
    (tmp_path / "lists" / "todo.txt").write_text(text)
    listing = list_images(f"@{tmp_path / 'lists' / 'todo.txt'}")
    assert [str(p).replace("lists/../", "") for p in listing.paths] == [str(files[1]), str(files[2])]
    assert all(p.endswith(("png", "jpg")) for p in listing.paths)


def test_csv_and_parquet_carry_their_other_columns_as_ids(tree, tmp_path):
    files = sorted(tree.rglob("*.*g"))
    (tmp_path / "index.csv").write_text("path,sku\n" + "".join(f"imgs/{f.relative_to(tree)},{i}\n"
                                                                for i, f in enumerate(files)))
    listing = list_images(tmp_path / "index.csv")
    assert listing.paths == tuple(map(str, files)) and listing.ids == {"sku": ["0", "1", "2", "3"]}
    pq.write_table(pa.table({"path": [str(f) for f in files[:2]], "sku": [7, 8], "shop": ["a", "b"]}),
                   tmp_path / "index.parquet")
    listing = list_images(tmp_path / "index.parquet")
    assert listing.ids == {"sku": [7, 8], "shop": ["a", "b"]}  # types kept
    assert listing.row_ids(1) == {"sku": 8, "shop": "b"}


def test_tar_shards_list_their_image_members(tree, tmp_path):
    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as tar:
        for f in sorted(tree.rglob("*")):
            tar.add(f, arcname=str(f.relative_to(tree)), recursive=False)
    listing = list_images(shard)
    assert listing.paths == tuple(f"{shard}/{f.relative_to(tree)}" for f in sorted(tree.rglob("*.*g")))


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "missing.png", "not found"),
    (lambda d: d, "no images found"),
    (lambda d: f"{d}/*.webp", "no file matches"),
    (lambda d: f"@{d / 'no-list.txt'}", "can not be read"),
    (lambda d: (d / "i.csv").write_text("file,sku\nx.png,1\n") and d / "i.csv", "no 'path' column"),
    (lambda d: (d / "i.csv").write_text("path,error\nx.png,1\n") and d / "i.csv", "clashes"),
    (lambda d: (d / "i.csv").write_text("path,shoes.label\nx.png,1\n") and d / "i.csv", "clashes"),
    (lambda d: (d / "x.tar").write_text("not a tar") and d / "x.tar", "not a readable .tar"),
    (lambda d: [], "no images given"),
])
def test_bad_sources_are_refused_naming_what_is_wrong(make, message, tmp_path):
    (tmp_path / "notes.txt").write_text("only text here")
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        list_images(make(tmp_path))


def test_shards_are_disjoint_cover_the_listing_and_are_deterministic():
    listing = Listing(tuple(f"{i}.png" for i in range(10)), {"n": list(range(10))})
    shards = [listing.shard(i, 3) for i in range(3)]
    assert [len(s) for s in shards] == [3, 3, 4]
    assert sum((s.paths for s in shards), ()) == listing.paths
    assert sum((s.ids["n"] for s in shards), []) == listing.ids["n"]
    assert listing.shard(1, 3) == shards[1]
    assert len(Listing(("a.png",)).shard(1, 4)) == 0  # more shards than images: some are empty
    assert parse_shard("2/8") == (2, 8)
    for bad in ("8/8", "-1/2", "1", "a/b"):
        with pytest.raises(ValueError, match="I/N"):
            parse_shard(bad)


def test_the_digest_changes_with_any_path_or_id():
    a = Listing(("a.png", "b.png"), {"n": [1, 2]})
    assert a.digest() == Listing(("a.png", "b.png"), {"n": [1, 2]}).digest()
    assert a.digest() != Listing(("a.png", "c.png"), {"n": [1, 2]}).digest()
    assert a.digest() != Listing(("a.png", "b.png"), {"n": [1, 3]}).digest()
    assert a.digest() != Listing(("b.png", "a.png"), {"n": [2, 1]}).digest()
