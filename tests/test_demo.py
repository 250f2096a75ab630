"""The demo's pieces (``lub_fast.demo``): the held-out sentences its fill-mask shows."""

from lub_fast import demo


def test_demo_sentences_mask_the_middle_chinese_character_of_held_out_sentences(tmp_path):
    text = tmp_path / "heldout.txt"
    text.write_text("短句。今天天气很好我们去公园散步。\n\n这家店的服务非常周到下次还来！太长" + "长" * 40 + "。\n", encoding="utf-8")
    vocab = set("今天气很好我们去公园散步这家店的服务非常周到下次还来短句长。！")
    picked = demo.demo_sentences(text, vocab, count=4)
    assert picked == [("今天天气很好我们去公园散步。", 6), ("这家店的服务非常周到下次还来！", 7)], picked
    assert demo.demo_sentences(text, vocab - {"公"}, count=1) == [("这家店的服务非常周到下次还来！", 7)]
