"""`--class` lookup in the ImageNet-1k table and in a checkpoint's own names; the progress bar module."""

import io

import pytest
from rich.console import Console

from ditcli.cli.progress import ProgressBar
from ditcli.data.classes import ClassTable, class_table, slug
from ditcli.errors import UserError

FASHION = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


@pytest.fixture(scope="module")
def imagenet():
    return ClassTable.imagenet()


def test_imagenet_table_has_the_released_label_order(imagenet):
    assert len(imagenet) == 1000
    assert (imagenet.classes[0].wnid, imagenet.name(0)) == ("n01440764", "tench")
    assert (imagenet.classes[207].wnid, imagenet.name(207)) == ("n02099601", "golden retriever")
    assert (imagenet.classes[999].wnid, imagenet.name(999)) == ("n15075141", "toilet tissue")
    wnids = [c.wnid for c in imagenet.classes]
    assert wnids == sorted(wnids) and len(set(wnids)) == 1000


@pytest.mark.parametrize("text, expected", [
    ("207", 207), (" 207 ", 207), ("golden retriever", 207), ("Golden_Retriever", 207), ("N02099601", 207),
    ("tabby cat", 281), ("Persian cat", 283), ("killer whale", 148), ("orca", 148), ("great-white-shark", 2),
])
def test_imagenet_names_synonyms_and_wordnet_ids(imagenet, text, expected):
    assert imagenet.resolve(text) == expected


def test_ambiguous_name_lists_each_class(imagenet):
    with pytest.raises(UserError, match=r"'crane' is ambiguous: it names 134 \(crane, n02012849\), 517 \(crane, n03"):
        imagenet.resolve("crane")


def test_unknown_name_suggests_close_matches(imagenet):
    with pytest.raises(UserError, match=r"unknown class 'golden retreiver' \(close matches: golden retriever \(207\)"):
        imagenet.resolve("golden retreiver")


@pytest.mark.parametrize("text", ["1000", "-1"])
def test_out_of_range_id(imagenet, text):
    with pytest.raises(UserError, match="out of range"):
        imagenet.resolve(text)


def test_checkpoint_names_replace_imagenet():
    table = class_table(10, FASHION)
    assert table.resolve("sneaker") == 7 and table.resolve("t-shirt/top") == 0 and table.resolve("ANKLE BOOT") == 9
    with pytest.raises(UserError, match="close matches: Sneaker"):
        table.resolve("sneakers")
    with pytest.raises(UserError, match="lists 3 class names for 10 classes"):
        class_table(10, FASHION[:3])


def test_models_without_names_take_ids_only():
    assert class_table(1000).source == "ImageNet-1k"
    numbered = class_table(5)
    assert numbered.resolve("4") == 4 and numbered.name(4) == "class 4"
    with pytest.raises(UserError, match="ids 0 to 4"):
        numbered.resolve("5")


def test_search_matches_names_and_wordnet_ids(imagenet):
    assert [c.id for c in imagenet.search("retriever")] == [205, 206, 207, 208, 209]
    assert [c.id for c in imagenet.search("n0209960")] == [207]


def test_file_name_slugs():
    assert slug("T-shirt/top") == "t-shirt-top" and slug("golden retriever") == "golden-retriever"


def test_progress_bar_shows_counts_rate_and_substatus():
    stream = io.StringIO()
    console = Console(file=stream, force_terminal=False, width=150)
    with ProgressBar(8, "sampling", unit="img", console=console) as bar:
        bar.step(2, 25)
        bar.advance(8, nfe=25)
    text = stream.getvalue()
    assert "sampling" in text and "8/8" in text and "img/s" in text and "nfe=25" in text


def test_disabled_progress_bar_accepts_the_same_calls():
    stream = io.StringIO()
    with ProgressBar(4, "x", enabled=False, console=Console(file=stream)) as bar:
        bar.advance(1, loss=0.5)
        bar.update(3, total=4)
        bar.substatus("step 1/2")
    assert stream.getvalue() == ""
