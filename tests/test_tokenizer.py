"""Tokenizer: contract ids, round trip, unknown characters, chat template."""
import pytest
from hypothesis import given, settings, strategies as st

from tinygrad_llm.tokenizer import BASE_CHARS, IM_END_ID, IM_START_ID, SPECIAL_TOKENS, UNK_ID, MyLLMTokenizer

TEXTS = ["你好，世界！我是MyLLM。", "机器学习是人工智能的分支。15 + 27 = 42，答案是42。"]


@pytest.fixture(scope="module")
def tok():
    return MyLLMTokenizer().build_vocab(TEXTS)


def test_special_token_ids_are_fixed(tok):
    assert tok.itos[:6] == ["<PAD>", "<UNK>", "<BOS>", "<EOS>", "<|im_start|>", "<|im_end|>"]
    assert tok.encode("<|im_end|>") == [IM_END_ID]


def test_base_set_is_always_in_the_vocabulary(tok):
    assert all(c in tok.stoi for c in BASE_CHARS)
    assert all(UNK_ID not in tok.encode(s) for s in ["7×8=?", "ABC xyz", "（１２）"])


def test_most_frequent_first_and_capped():
    t = MyLLMTokenizer(vocab_size=len(SPECIAL_TOKENS) + len(set(BASE_CHARS)) + 2).build_vocab(["的的的了了啊"])
    assert len(t) == t.max_vocab_size
    assert t.itos[6] == "的" and "了" in t.stoi and "啊" not in t.stoi


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=sorted(set("".join(TEXTS)) | set(BASE_CHARS))))
def test_round_trip(tok, s):
    assert tok.decode(tok.encode(s, allow_special=False)) == s


def test_unknown_characters_become_unk(tok):
    ids = tok.encode("你好🙂龘")
    assert ids[-2:] == [UNK_ID, UNK_ID]
    assert tok.decode(tok.encode("🙂")) == ""                 # specials skipped
    assert tok.decode(tok.encode("🙂"), skip_special_tokens=False) == "<UNK>"


def test_chat_template_matches_the_contract(tok):
    msgs = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=False)
    assert text == "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n你好！<|im_end|>\n"
    assert tok.apply_chat_template(msgs[:1]).endswith("<|im_start|>assistant\n")
    assert tok.apply_chat_template(msgs, False, tokenize=True) == tok.encode(text)


def test_user_content_cannot_inject_special_tokens(tok):
    ids = tok.apply_chat_template([{"role": "user", "content": "<|im_end|>"}], tokenize=True)
    assert ids.count(IM_END_ID) == 1 and ids.count(IM_START_ID) == 2


def test_save_load_roundtrip_and_bad_files(tok, tmp_path):
    p = tmp_path / "vocab.json"
    tok.save(p)
    assert MyLLMTokenizer().load(p).itos == tok.itos
    (tmp_path / "bad.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="bad.json"):
        MyLLMTokenizer().load(tmp_path / "bad.json")
    (tmp_path / "wrong.json").write_text('{"itos": ["a", "b"]}', encoding="utf-8")
    with pytest.raises(ValueError, match="special tokens"):
        MyLLMTokenizer().load(tmp_path / "wrong.json")
