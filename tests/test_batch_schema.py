"""learnable_memory.batch.schema: the documented columns, read back with pyarrow and pandas."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.dataset as ds
import pytest
import torch

from learnable_memory import predict_dataset
from learnable_memory.batch.schema import Schema
from tests.helpers import demo_model, fashion_files, read_dataset


@pytest.fixture
def labelled(tmp_path):
    """A dataset of 5 images (one unreadable) from a CSV with id columns, with logits and features."""
    paths = fashion_files(tmp_path / "imgs", 4)
    (tmp_path / "imgs" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    rows = [f"imgs/{p.name},{i},shop{i % 2}" for i, p in enumerate(paths)] + ["imgs/broken.jpg,9,shop1"]
    (tmp_path / "index.csv").write_text("path,sku,shop\n" + "\n".join(rows) + "\n")
    model = demo_model()
    summary = predict_dataset(model, tmp_path / "index.csv", tmp_path / "out", top_k=2, batch_size=2, logits=True,
                              features=True, progress=False)
    return model, tmp_path / "out", summary


def test_the_columns_and_their_arrow_types(labelled):
    model, out, summary = labelled
    table = ds.dataset(out, format="parquet").to_table()
    assert summary.images == 5 and summary.errors == 1 and table.num_rows == 5
    top = pa.list_(pa.struct([("label", pa.string()), ("index", pa.int64()), ("prob", pa.float32())]))
    want = [("path", pa.string()), ("sku", pa.string()), ("shop", pa.string())]
    for task, classes in (("base", 5), ("shoes", 3), ("digits", 4)):
        want += [(f"{task}.label", pa.string()), (f"{task}.index", pa.int64()), (f"{task}.prob", pa.float32()),
                 (f"{task}.topk", top), (f"{task}.logits", pa.list_(pa.float32(), classes)),
                 (f"{task}.features", pa.list_(pa.float32(), 128))]
    assert [(f.name, f.type) for f in table.schema] == [*want, ("error", pa.string())]
    assert Schema.of(model, ["base", "shoes", "digits"], ["sku", "shop"], logits=True,
                     features=True).columns() == [n for n, _ in want] + ["error"]


def test_rows_read_back_with_pandas(labelled):
    model, out, _ = labelled
    df = read_dataset(out)
    assert df["sku"].tolist() == ["0", "1", "2", "3", "9"]  # imgs/broken.jpg sorts last
    bad, good = df.iloc[-1], df.iloc[:-1]
    assert "can not be read" in bad["error"] and bad[["shoes.label", "shoes.topk", "base.logits"]].isna().all()
    assert good["error"].isna().all()
    assert set(good["shoes.label"]) <= {"sandal", "sneaker", "boot"} and set(good["digits.label"]) <= set("0123")
    for _, row in good.iterrows():
        topk = list(row["shoes.topk"])
        assert len(topk) == 2 and topk[0]["prob"] >= topk[1]["prob"]
        assert (topk[0]["label"], topk[0]["index"]) == (row["shoes.label"], row["shoes.index"])
        assert row["shoes.prob"] == pytest.approx(topk[0]["prob"])
        logits = torch.tensor(list(row["shoes.logits"]))
        assert int(logits.argmax()) == row["shoes.index"]
        assert float(logits.softmax(-1).max()) == pytest.approx(row["shoes.prob"], abs=1e-6)
        head = model.tasks["shoes"].head(torch.tensor(list(row["shoes.features"])))
        assert torch.allclose(head, logits, atol=1e-4)
