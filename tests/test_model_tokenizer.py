"""The packaged public-text vocabulary and its builder."""

from __future__ import annotations

from pathlib import Path

from mlip_fed.data.tokenizer import build_vocab, load_tokenizer


def test_build_vocab_is_deterministic_and_matches_packaged(tmp_path: Path) -> None:
    a = build_vocab(tmp_path / "a.txt").read_text()
    b = build_vocab(tmp_path / "b.txt").read_text()
    assert a == b
    assert a.splitlines()[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def test_packaged_vocab_covers_the_knowledge_base() -> None:
    # The KB may gain words after the vocabulary was built; most must still be whole tokens, otherwise
    # regenerate with `python -m mlip_fed.data.tokenizer`.
    from tokenizers.normalizers import BertNormalizer
    from tokenizers.pre_tokenizers import BertPreTokenizer

    from mlip_fed.data.tokenizer import public_corpus

    vocab = set(load_tokenizer().get_vocab())
    norm, pre = BertNormalizer(lowercase=True), BertPreTokenizer()
    words = {w for text in public_corpus() for w, _ in pre.pre_tokenize_str(norm.normalize_str(text))}
    covered = sum(w in vocab for w in words) / len(words)
    assert covered >= 0.95, f"packaged vocab.txt covers only {covered:.0%} of the KB words: regenerate it"


def test_tokenizer_keeps_kb_terms_whole_and_never_all_unk(tmp_path: Path) -> None:
    tok = load_tokenizer()
    pieces = tok.tokenize("Small left pleural effusion, cardiomegaly; Dr Xylophonist reviewed.")
    assert pieces[:5] == ["small", "left", "pleural", "effusion", ","]
    assert "cardiomegaly" in pieces
    assert "[UNK]" not in pieces  # unseen words fall back to suffixes and characters
    small = build_vocab(tmp_path / "small.txt", vocab_size=200)
    assert len(small.read_text().splitlines()) == 200
    assert len(load_tokenizer(small)) == 200
