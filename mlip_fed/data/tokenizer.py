"""The shared WordPiece tokenizer, built from public text only.

The packaged ``vocab.txt`` is trained on the knowledge base (concept names, synonyms,
abbreviations, definitions, category descriptions, zero-shot prompts) plus a hand-written list of
common radiology report phrases below. A site's private reports never shape the vocabulary: the
vocabulary is part of the model every site shares, and word pieces learned from one hospital's
reports would leak its rare terms (names, places, unusual findings) to every other site and to
anyone holding the weights. Regenerate with ``python -m mlip_fed.data.tokenizer [out_path]``.

A pretrained text model (a local folder or a hub id in the local Hugging Face cache, e.g.
Bio_ClinicalBERT) brings its own tokenizer instead.
"""

from __future__ import annotations

import string
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from importlib import resources
from pathlib import Path

from transformers import AutoTokenizer, BertTokenizerFast, PreTrainedTokenizerBase

from mlip_fed.hf_cache import hub_snapshot, looks_like_hub_id
from mlip_fed.knowledge.kb import KnowledgeBase, load_knowledge_base

DEFAULT_VOCAB_FILE = "vocab.txt"
DEFAULT_VOCAB_SIZE = 3000
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

#: Common, public radiology report language (our own list; no site text). Sentences rather than bare words,
#: so WordPiece sees words in realistic frequency and context.
RADIOLOGY_PHRASES: tuple[str, ...] = (
    "findings: pa and lateral views of the chest were obtained.",
    "impression: no acute cardiopulmonary process.",
    "frontal and lateral chest radiographs demonstrate clear lungs.",
    "single portable ap upright view of the chest.",
    "the lungs are clear without focal consolidation, effusion, or pneumothorax.",
    "there is no pleural effusion or pneumothorax.",
    "heart size is normal. the mediastinal and hilar contours are unremarkable.",
    "the cardiomediastinal silhouette is within normal limits.",
    "the cardiac silhouette is mildly enlarged.",
    "moderate cardiomegaly is unchanged compared to the prior study.",
    "small bilateral pleural effusions with adjacent atelectasis.",
    "left basilar opacity may reflect atelectasis, though infection is not excluded.",
    "right lower lobe consolidation concerning for pneumonia.",
    "patchy airspace opacities in the right upper lobe and left lingula.",
    "mild pulmonary vascular congestion and interstitial edema.",
    "there is mild pulmonary edema, improved since the previous examination.",
    "a small right apical pneumothorax is present.",
    "no evidence of pneumothorax following chest tube removal.",
    "endotracheal tube terminates approximately 4 cm above the carina.",
    "nasogastric tube courses below the diaphragm with the tip in the stomach.",
    "right internal jugular central venous catheter tip in the mid svc.",
    "left subclavian picc line terminates in the lower superior vena cava.",
    "a left chest wall pacemaker with leads in the right atrium and right ventricle.",
    "sternotomy wires and mediastinal clips are intact.",
    "healed fracture of the left posterior sixth rib.",
    "acute displaced fractures of the right lateral ribs.",
    "degenerative changes of the thoracic spine.",
    "a 1.5 cm nodule in the left mid lung; recommend ct for further evaluation.",
    "a spiculated mass in the right upper lobe is concerning for malignancy.",
    "blunting of the left costophrenic angle suggests a small effusion.",
    "pleural thickening and calcified pleural plaques.",
    "low lung volumes with bibasilar linear atelectasis.",
    "hyperinflated lungs consistent with copd and emphysema.",
    "the aorta is tortuous and calcified.",
    "widening of the mediastinum, possibly due to projection.",
    "the trachea is midline. osseous structures are intact.",
    "elevated right hemidiaphragm. no free air beneath the diaphragm.",
    "subcutaneous emphysema along the right chest wall.",
    "stable appearance of the chest compared with the radiograph from yesterday.",
    "interval improvement of the left lower lobe opacity.",
    "new right perihilar opacity, worsened since prior.",
    "no significant change. lines and tubes are unchanged in position.",
    "possible early pneumonia cannot be excluded. clinical correlation is recommended.",
    "findings are likely chronic; no acute osseous abnormality.",
    "mild, moderate, severe, large, small, trace, minimal, extensive, diffuse, focal, multifocal.",
    "upper, middle, lower, lobe, zone, base, apex, hilum, perihilar, retrocardiac, lingula.",
    "left, right, bilateral, unilateral, anterior, posterior, lateral, medial, basal, apical.",
    "increased, decreased, stable, unchanged, improved, worsened, resolved, persistent, new.",
    "is, are, was, were, there, with, without, and, or, of, the, a, an, in, on, at, to, from, by, for.",
    "no, not, none, negative, absent, free, clear, normal, unremarkable, likely, possibly, probable, suggest.",
    "consistent with, compatible with, concerning for, suspicious for, may represent, cannot exclude.",
    "0 1 2 3 4 5 6 7 8 9 10 cm mm",
)


def public_corpus(kb: KnowledgeBase | None = None, extra_texts: Iterable[str] = ()) -> Iterator[str]:
    """Every public text the vocabulary is trained on, in a fixed order (so the vocabulary is reproducible)."""
    kb = kb or load_knowledge_base()
    for concept in kb.concepts:
        yield concept.name
        yield from concept.synonyms
        yield from concept.abbreviations
        yield concept.knowledge_text
        for values in concept.attributes.values():
            yield " ".join(values)
    for category in sorted(kb.category_descriptions):
        yield kb.category_text(category)
    for prompts in (kb.prompts_positive, kb.prompts_negative):
        for category in sorted(prompts):
            yield from prompts[category]
    yield from RADIOLOGY_PHRASES
    yield from extra_texts


def build_vocab(out_path: str | Path, *, vocab_size: int = DEFAULT_VOCAB_SIZE, extra_texts: Iterable[str] = ()) -> Path:
    """Write a lower-cased WordPiece ``vocab.txt`` built from ``public_corpus`` to ``out_path``.

    Deterministic by construction (the ``tokenizers`` trainer breaks merge ties differently from run to
    run): special tokens, every character (word-initial and ``##`` continuation), every corpus word by
    descending frequency, then ``##`` suffixes shared by at least two corpus words, truncated to
    ``vocab_size``. Unseen words still tokenize (into suffixes and characters), never into [UNK] only.
    ``extra_texts`` must be public too (e.g. synthetic report templates); never pass a site's reports.
    """
    from tokenizers.normalizers import BertNormalizer
    from tokenizers.pre_tokenizers import BertPreTokenizer

    normalizer = BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=True, lowercase=True)
    pre = BertPreTokenizer()
    counts: Counter[str] = Counter()
    for text in public_corpus(extra_texts=extra_texts):
        counts.update(word for word, _ in pre.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({ch for word in counts for ch in word} | set(string.ascii_lowercase + string.digits))
    words = sorted(counts, key=lambda w: (-counts[w], w))
    suffix_words: Counter[str] = Counter()
    for word in counts:
        for n in range(2, min(6, len(word))):
            suffix_words[word[-n:]] += 1
    suffixes = sorted((s for s, c in suffix_words.items() if c >= 2), key=lambda s: (-suffix_words[s], s))
    vocab: dict[str, None] = dict.fromkeys(SPECIAL_TOKENS)
    vocab.update(dict.fromkeys(chars))
    vocab.update(dict.fromkeys(f"##{ch}" for ch in chars))
    vocab.update(dict.fromkeys(words))
    vocab.update(dict.fromkeys(f"##{s}" for s in suffixes))
    tokens = list(vocab)[:vocab_size]
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(f"{token}\n" for token in tokens), encoding="utf-8")
    return out


def load_tokenizer(vocab_path: str | Path | None = None, *, field: str = "tokenizer") -> PreTrainedTokenizerBase:
    """The packaged tokenizer, a ``vocab.txt`` file, or the tokenizer of a checkpoint folder or cached hub id.

    A hub id (``org/name``) is looked up in the local Hugging Face cache only; ``field`` names the config key
    in the error when it is not there.
    """
    if vocab_path is None:
        path = Path(str(resources.files("mlip_fed.data").joinpath(DEFAULT_VOCAB_FILE)))
        if not path.is_file():
            raise FileNotFoundError(
                f"packaged vocabulary {path} is missing; regenerate it with `python -m mlip_fed.data.tokenizer`"
            )
    else:
        path = Path(vocab_path)
        if not path.exists() and looks_like_hub_id(str(vocab_path)):
            path = hub_snapshot(str(vocab_path), field=field)
    if path.is_dir():
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer vocabulary: no such file or directory {path}")
    vocab = {token: i for i, token in enumerate(path.read_text(encoding="utf-8").splitlines())}
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
        raise ValueError(f"tokenizer vocabulary {path}: missing special tokens {missing}")
    return BertTokenizerFast(vocab=vocab, do_lower_case=True, strip_accents=True)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    default = Path(__file__).with_name(DEFAULT_VOCAB_FILE)
    out = build_vocab(args[0] if args else default)
    print(f"wrote {out} ({sum(1 for _ in out.open(encoding='utf-8'))} tokens)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
